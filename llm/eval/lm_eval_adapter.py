"""lm-evaluation-harness on a checkpoint, in process (no export): CheckpointLM is an lm-eval `LM` over our models.

    python -m llm.eval lm_eval --ckpt out/run --tasks hellaswag,lambada_openai [--limit 100] [--json results.json]
    python -m llm.eval lm_eval --ckpt out/run --tasks my_task --include_path my_tasks/    # YAML tasks of your own

Requests are handled as lm-eval's hf backend handles them, with block_size as the model's maximum length:
- loglikelihood: (context, continuation) encoded together and split after the context's tokens; contexts lose
  tokens from the left to fit, and an empty context is the prefix token (end-of-text, a sequence tokenizer's begin
  token, else the newline of a char vocabulary);
- loglikelihood_rolling: a whole document in windows of block_size tokens, each token predicted once, the first
  after the prefix token;
- generate_until: with the generation cache, left-padded batches, greedy unless the task asks to sample; each
  context keeps its last block_size - max_gen_toks tokens (when max_gen_toks >= block_size, its last block_size and
  the window slides); text stops at end-of-text or at the first of the `until` strings.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, make_table

from ..config import ConfigError, exit_on_user_error
from ..data.tokenizers import SEQUENCE_TOKENIZERS
from ..generate import generate
from ..plugins import Imports, import_modules
from .scoring import continuation_logprobs, load_causal, prefix_token, write_json

DEFAULT_MAX_GEN_TOKS = 256  # as lm-eval's hf backend, for tasks that do not set max_gen_toks
RESULT_KEYS = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples")


@dataclass
class LmEvalArgs:
    """Run lm-evaluation-harness tasks on a checkpoint, in this process."""

    ckpt: str
    """A run folder (its best checkpoint, else its newest) or a checkpoint folder."""
    tasks: str
    """Comma-separated lm-eval task, group or tag names (glob patterns such as mmlu_* too), or YAML files."""
    include_path: str | None = None
    """A folder of task YAML files of your own, looked up before lm-eval's own tasks."""
    limit: int | None = None
    """Evaluate only the first N documents of each task."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt (default: each task's own, else 0)."""
    batch_size: int = 16
    """Requests per forward pass."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    seed: int = 1234
    """The seed of generation for tasks that sample."""
    bootstrap_iters: int = 100000
    """Bootstrap resamples for the standard errors of metrics that need them (0: none)."""
    json: str | None = None
    """Also write the results to this JSON file."""
    imports: Imports = field(default_factory=list)
    """--import MODULE (repeatable): a module to import first, e.g. one that registers kinds of its own with
    llm.model.register_arch; looked up on sys.path and in the working directory."""


class Stopped(Exception):
    """Raised by StopWatch to end generation once every row has stopped."""


class StopWatch:
    """generate's on_step: collects each row's new tokens and ends generation once every row has reached
    end-of-text or written one of the stop strings."""

    def __init__(self, tokenizer, rows: int, until: list[str]):
        self.tokenizer, self.until = tokenizer, until
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.done = [False] * rows

    def __call__(self, logits: torch.Tensor, new: list[int | None]) -> None:
        for row, token in enumerate(new):
            if self.done[row] or token is None:
                self.done[row] = True
                continue
            self.tokens[row].append(token)
            text = self.tokenizer.decode(self.tokens[row])
            self.done[row] = any(stop in text for stop in self.until)
        if all(self.done):
            raise Stopped


class CheckpointLM(TemplateLM):
    """An lm-eval language model over one of our causal models and its tokenizer (see the module docstring)."""

    def __init__(self, model, tokenizer, tokenizer_meta: dict, batch_size: int = 16, seed: int = 1234):
        super().__init__()
        self.model, self.tokenizer, self.batch_size, self.seed = model.eval(), tokenizer, batch_size, seed
        self._device = model.tok_emb.weight.device
        self.prefix = prefix_token(tokenizer, tokenizer_meta)
        self.eot = tokenizer.eos if tokenizer_meta["tokenizer"] in SEQUENCE_TOKENIZERS else tokenizer.eot

    @property
    def eot_token_id(self) -> int | None:
        """The token that ends a text (None for a char vocabulary of one document)."""
        return self.eot

    @property
    def prefix_token_id(self) -> int:
        """The token before a text without context."""
        return self.prefix

    @property
    def max_length(self) -> int:
        """The most tokens the model reads: block_size."""
        return self.model.config.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The text's ids (no special tokens are added)."""
        return self.tokenizer.encode(string)

    def _loglikelihood_tokens(self, requests: list, **kwargs) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each ((context, continuation), context ids, continuation ids) request."""
        pairs = [(context, continuation) for _, context, continuation in requests]
        return continuation_logprobs(self.model, pairs, self.device, self.batch_size,
                                     name=lambda i: f"request {requests[i][0]!r}"[:200])

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole document, scored in disjoint windows of up to block_size tokens."""
        windows, owners = [], []
        for i, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for window in get_rolling_token_windows(tokens, self.prefix, self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (total, _) in zip(owners, continuation_logprobs(self.model, windows, self.device,
                                                                   self.batch_size)):
            totals[owner] += total
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """The text generated after each context, up to its first stop string; requests are batched by their
        generation settings, longest context first."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        texts = [""] * len(requests)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], DEFAULT_MAX_GEN_TOKS)
            new_tokens = kwargs["max_gen_toks"]
            keep = self.max_length - new_tokens if new_tokens < self.max_length else self.max_length
            prompts = {i: self.tok_encode(requests[i].args[0])[-keep:] or [self.prefix] for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                for i, text in zip(chunk, self.generate_texts([prompts[i] for i in chunk], kwargs)):
                    texts[i] = text
        return texts

    def generate_texts(self, prompts: list[list[int]], kwargs: dict) -> list[str]:
        """The texts generated after one batch of prompts with lm-eval's normalised generation settings."""
        until = kwargs["until"]
        temperature = float(kwargs.get("temperature", 1.0)) if kwargs["do_sample"] else 0.0  # 0: greedy
        watch = StopWatch(self.tokenizer, len(prompts), until)
        generator = torch.Generator(self.device).manual_seed(self.seed)
        try:
            generate(self.model, prompts, kwargs["max_gen_toks"], temperature, kwargs.get("top_k"),
                     kwargs.get("top_p"), self.eot, generator, on_step=watch)
        except Stopped:
            pass
        return [postprocess_generated_text(self.tokenizer.decode(tokens), until, None) for tokens in watch.tokens]


def task_manager(names: list[str], include_path: str | None) -> tuple[TaskManager, list[str]]:
    """A TaskManager that knows every name, and the task names they expand to. The tasks of include_path are
    looked up alone first: lm-eval's own index takes seconds to build and is read only when a name is not there."""
    def resolve(manager: TaskManager) -> tuple[list[str], list[str]]:
        found, missing = [], []
        for name in names:
            matches = [name] if name.endswith((".yaml", ".yml")) and Path(name).is_file() else \
                manager.match_tasks([name])
            found += [m for m in matches if m not in found]
            missing += [] if matches else [name]
        return found, missing

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        found, missing = resolve(local)
        if not missing:
            return local, found
    manager = TaskManager(include_path=include_path)
    found, missing = resolve(manager)
    if missing:
        where = f"lm-eval's tasks or --include_path={include_path}" if include_path else "lm-eval's tasks"
        raise ConfigError(f"--tasks: {', '.join(missing)} is not among {where}; list them with `lm-eval ls tasks`, "
                          "or pass --include_path DIR holding the task's YAML")
    return manager, found


def evaluate_lm_eval(args: LmEvalArgs) -> dict:
    """Runs the tasks on the checkpoint with lm-eval's simple_evaluate, prints its table and returns the results."""
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not names:
        raise ConfigError("--tasks is empty; pass task names separated by commas, e.g. --tasks hellaswag,piqa")
    for flag, value in (("limit", args.limit), ("batch_size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"--{flag}={value} must be >= 1")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise ConfigError(f"--include_path={args.include_path}: no such folder; pass a folder of task YAML files")
    manager, tasks = task_manager(names, args.include_path)
    folder, model, tokenizer, meta = load_causal(args.ckpt, args.device)
    lm = CheckpointLM(model, tokenizer, meta, args.batch_size, args.seed)
    try:
        results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit,
                                  num_fewshot=args.num_fewshot, bootstrap_iters=args.bootstrap_iters,
                                  log_samples=False)
    except (ConnectionError, FileNotFoundError) as e:  # a dataset that is neither local nor cached, offline
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"--tasks={args.tasks}: lm-eval could not load a task's data ({type(e).__name__}: "
                          f"{reason}); connect to the Hugging Face Hub once to cache it, or point the task's "
                          "YAML at local files") from None
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    return {"checkpoint": str(folder), "tasks": tasks, **{k: results[k] for k in RESULT_KEYS if k in results}}


def main(argv: list[str]) -> dict:
    """`python -m llm.eval lm_eval ...` (argv without the word lm_eval)."""
    args = tyro.cli(LmEvalArgs, args=argv, use_underscores=True, prog="python -m llm.eval lm_eval")
    with exit_on_user_error():
        import_modules(args.imports)
        result = evaluate_lm_eval(args)
        write_json(args.json, result)
    return result

"""Score a checkpoint on a prepared dataset's split, as validation does in training.

    python -m llm.eval data --ckpt out/run [--dataset shakespeare_char] [--split val] [--batches 200] [--json r.json]

The rows are drawn as in training (random windows of block_size, from --seed) and turned into inputs and targets by
the model's objective: next-token loss for a causal model; masked tokens for a masked LM; for a diffusion model
(mdlm, sedd, d3pm) the NELBO per token, a Monte-Carlo estimate of an upper bound on the negative log-likelihood
whose standard error over the batches is reported with it, and the perplexity bound. Bits per byte follow when the
dataset records its bytes per token and the loss is a likelihood (or its bound).
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import tyro

from ..config import ConfigError, Trainconfig, exit_on_user_error
from ..data.labels import label_rules
from ..data.loader import TokenLoader, read_meta
from ..data.tokenizers import SEQUENCE_TOKENIZERS, tokenizer_from_meta
from ..model.registry import OBJECTIVES
from ..plugins import Imports, import_modules
from ..targets import extra_names


@dataclass
class DataArgs:
    """The objective's validation figures of a checkpoint on a prepared dataset's split."""

    task: tyro.conf.Positional[Literal["data"]]
    """What to evaluate: data (a prepared dataset)."""
    ckpt: str
    """A run directory or checkpoint folder."""
    dataset: str | None = None
    """The prepared dataset (a folder under data_dir); unset: the one the run trained on."""
    data_dir: str | None = None
    """The folder holding prepared datasets; unset: the run's."""
    split: Literal["train", "val"] = "val"
    """Which split to score."""
    batches: int = 100
    """Batches of the run's batch_size rows to average over."""
    seed: int = 0
    """Seed of the windows drawn and of any noise the objective draws (masking, diffusion times)."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    json: str | None = None
    """Also write the results to this JSON file."""
    imports: Imports = field(default_factory=list)
    """--import MODULE (repeatable): a module to import first, e.g. one that registers kinds of its own."""


@torch.no_grad()
def evaluate_data(args: DataArgs) -> dict:
    """The figures of the objective over `args.batches` batches (see the module docstring)."""
    from ..checkpoint import load_trained
    from ..precision import pick_precision

    if args.batches < 1:
        raise ConfigError(f"--batches={args.batches} must be >= 1")
    folder, model, tokenizer_meta = load_trained(args.ckpt)
    saved = Trainconfig(**{k: v for k, v in json.loads((folder / "config.json").read_text()).get("train", {}).items()
                           if k in Trainconfig.__dataclass_fields__})
    data = Path(args.data_dir or saved.data_dir) / (args.dataset or saved.dataset)
    meta = read_meta(data, args.dataset or saved.dataset)
    if meta["vocab_size"] > model.config.vocab_size:
        raise ConfigError(f"{data} has {meta['vocab_size']} token ids, more than the model's vocab_size="
                          f"{model.config.vocab_size}; score it on data prepared with the run's tokenizer")
    device = pick_precision(args.device, "float32").device
    model.to(device)
    kind = OBJECTIVES[model.config.objective]
    rules = None
    if meta["tokenizer"] in SEQUENCE_TOKENIZERS or kind.needs_rules:
        rules = label_rules(tokenizer_from_meta(meta), saved.loss_mask, saved.uppercase_labels)
    batching = kind.batching(rules, saved, model.config)
    loader = TokenLoader(data / f"{args.split}.bin", meta["dtype"], saved.batch_size, model.config.block_size, device,
                         args.seed, batching=batching)
    sums: dict = {}
    for _ in range(args.batches):
        x, y, *rest = loader.next_batch()
        out = model(x, y, return_logits=model.objective.eval_logits, **dict(zip(extra_names(batching), rest)))
        sums = {k: sums.get(k, 0) + float(v) for k, v in model.objective.eval_sums(out, y).items()}
    figures = model.objective.eval_figures(sums, args.batches)
    if kind.nats_per_token and model.config.loss == "ce" and meta.get("bytes_per_token"):
        figures["bpb"] = figures["loss"] / math.log(2) / meta["bytes_per_token"]
    result = {"checkpoint": str(folder), "dataset": str(data), "split": args.split, "objective": kind.name,
              "batches": args.batches, "tokens": args.batches * saved.batch_size * model.config.block_size, **figures}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def describe(result: dict) -> str:
    """One line: the loss (with its error and the bound when the objective gives them) and bits per byte."""
    line = f"{result['split']} loss {result['loss']:.4f}"
    if "loss_se" in result:
        line += f" ± {result['loss_se']:.4f}"
    if "ppl_bound" in result:
        line += f" (an upper bound on the NLL per token: perplexity <= {result['ppl_bound']:.2f})"
    if "bpb" in result:
        line += f", {result['bpb']:.4f} bits per byte"
    return f"{line} over {result['tokens']:,} tokens ({result['batches']} batches) of {result['dataset']}"


def main(argv: list[str]) -> dict:
    args = tyro.cli(DataArgs, args=argv, use_underscores=True)
    with exit_on_user_error():
        import_modules(args.imports)
        result = evaluate_data(args)
    print(describe(result))
    return result

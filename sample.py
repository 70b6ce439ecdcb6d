"""Generate text from a trained checkpoint.

    python sample.py --ckpt out/run                              # the run's best (else newest) checkpoint
    python sample.py --ckpt out/run --prompt "ROMEO:" --temperature 0 --max_new_tokens 100
    python sample.py --ckpt out/run/checkpoints/step_0000500 --prompt "Once" "Upon a" --num_samples 2
    python sample.py --ckpt out/mtp_run --temperature 0 --speculative   # a model trained with --mtp sequential
    python sample.py --ckpt out/mdlm_run --steps 128 --max_new_tokens 256  # a diffusion model: denoised windows

A prompt longer than the model's block_size keeps its last block_size tokens (with a notice on stderr), or is
refused with --strict_prompt.
"""
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

from llm.config import ConfigError, exit_on_user_error, read_user_text
from llm.plugins import Imports, import_modules


@dataclass
class SampleArgs:
    """Generate text from a checkpoint; its config and tokenizer come with it."""

    ckpt: str
    """A run folder (its best checkpoint, else its newest) or a checkpoint folder."""
    prompt: tuple[str, ...] = ()
    """One or more prompts, generated as one batch (default: the end-of-text token, or a newline)."""
    prompt_file: str | None = None
    """A file whose whole text is one more prompt."""
    strict_prompt: bool = False
    """Refuse a prompt longer than block_size (by default it keeps its last block_size tokens, with a notice)."""
    max_new_tokens: int = 200
    """Tokens to generate per sample (a sample stops early at end-of-text)."""
    temperature: float = 0.8
    """Sampling temperature; 0 is greedy decoding."""
    top_k: int | None = 200
    """Sample among the k most likely tokens only (unset: all)."""
    top_p: float | None = None
    """Sample among the most likely tokens whose probabilities add up to p (nucleus sampling)."""
    num_samples: int = 1
    """Samples per prompt."""
    seed: int = 1337
    """Random seed."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda or cuda:N."""
    cache: bool = True
    """Decode with the key/value cache (--no_cache recomputes the whole context at every step)."""
    speculative: bool = False
    """Greedy speculative decoding: the checkpoint's sequential MTP modules (--mtp sequential) draft tokens that the
    model verifies in one pass; the output equals --temperature 0 decoding (needs --temperature 0 and the cache)."""
    steps: int | None = None
    """Diffusion models (objective mdlm, sedd, d3pm): reverse steps per window; unset: 128 (mdlm, sedd) or T (d3pm)."""
    sampler: str | None = None
    """Diffusion models: the predictor: ddpm_cache (mdlm), euler or analytic (sedd), ancestral (d3pm); unset: the
    first."""
    stride: int | None = None
    """Diffusion models: text longer than block_size continues semi-autoregressively, each next window keeping the
    last block_size - stride tokens; unset: block_size // 2."""
    judge: str | None = None
    """A causal checkpoint of the same tokenizer (a run or checkpoint folder) that scores the samples: their
    generative perplexity under it, and their unigram entropy (low when samples repeat themselves)."""
    imports: Imports = field(default_factory=list)
    """--import MODULE (repeatable): a module to import first, e.g. one that registers kinds of its own with
    llm.model.register_arch; looked up on sys.path and in the working directory."""


def check(args: SampleArgs) -> None:
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise ConfigError(f"--max_new_tokens={args.max_new_tokens} and --num_samples={args.num_samples} must be >= 1")
    if args.temperature < 0:
        raise ConfigError(f"--temperature={args.temperature} must be >= 0 (0 is greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top_k={args.top_k} must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top_p={args.top_p} must be in (0, 1]")
    if args.speculative and (args.temperature != 0 or not args.cache):
        raise ConfigError(f"--speculative decodes greedily with the cache; pass --temperature 0 (got "
                          f"{args.temperature}){'' if args.cache else ' and drop --no_cache'}")


AUTOREGRESSIVE_ONLY = {"temperature": 0.8, "top_k": 200, "top_p": None, "speculative": False, "cache": True}


def check_diffusion(args: SampleArgs, diffusion: bool) -> None:
    """A diffusion model samples by denoising: the left-to-right flags do not apply to it, nor its flags to others."""
    if diffusion:
        changed = [name for name, default in AUTOREGRESSIVE_ONLY.items() if getattr(args, name) != default]
        if changed:
            flag = {"cache": "--no_cache"}.get(changed[0], f"--{changed[0]}")
            raise ConfigError(f"{flag} applies to left-to-right decoding; a diffusion model denoises whole windows "
                              "(--steps, --sampler, --stride); drop it")
        if args.steps is not None and args.steps < 1:
            raise ConfigError(f"--steps={args.steps} must be >= 1")
        return
    given = [name for name in ("steps", "sampler", "stride") if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"--{given[0]} applies to diffusion models (objective mdlm, sedd, d3pm); this checkpoint "
                          "decodes left to right; drop it")


def judged(judge: str, prompts: list[list[int]], outputs: list[list[int]], tokenizer_meta: dict, device) -> str:
    """The line that reports the samples' generative perplexity under the causal checkpoint `judge` (each sample's
    first block_size tokens, after its prompt) and their unigram entropy in nats."""
    import math
    from collections import Counter

    from llm.eval.scoring import continuation_logprobs, load_causal

    folder, model, _, meta = load_causal(judge, str(device))
    if meta != tokenizer_meta:
        raise ConfigError(f"--judge={judge}: its tokenizer differs from the sampled checkpoint's; judge with a model "
                          "trained on the same tokenizer")
    pairs = [(prompt[-model.config.block_size:], output[: model.config.block_size])
             for prompt, output in zip(prompts, outputs) if output]
    scores = continuation_logprobs(model, pairs, device)
    tokens = sum(len(c) for _, c in pairs)
    counts = Counter(token for _, c in pairs for token in c)
    entropy = -sum(n / tokens * math.log(n / tokens) for n in counts.values())
    perplexity = math.exp(-sum(total for total, _ in scores) / tokens)
    return (f"generative perplexity {perplexity:.2f} under {folder} over {tokens} tokens; unigram entropy of the "
            f"samples {entropy:.3f} nats")


def fit_to_block(tokens: list[int], index: int, block_size: int, strict: bool) -> list[int]:
    """The prompt's tokens as the model can take them: a prompt longer than block_size keeps its last block_size
    tokens, with a notice on stderr naming it by `index` (0-based), or is refused when `strict`."""
    if len(tokens) <= block_size:
        return tokens
    too_long = f"prompt {index + 1} has {len(tokens)} tokens, more than block_size={block_size}"
    if strict:
        raise ConfigError(f"--strict_prompt: {too_long}; shorten it, or drop --strict_prompt to keep its last "
                          f"{block_size} tokens")
    print(f"note: {too_long}; keeping its last {block_size}", file=sys.stderr)
    return tokens[-block_size:]


class Printer:
    """Streams the text of a single sample as tokens arrive; several samples are printed when all are done."""

    def __init__(self, tokenizer, streaming: bool):
        self.tokenizer, self.streaming, self.tokens, self.shown = tokenizer, streaming, [], 0

    def __call__(self, logits: torch.Tensor, new: list) -> None:
        if not self.streaming or new[0] is None:
            return
        self.tokens.append(new[0])
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[self.shown:], end="", flush=True)
            self.shown = len(text)


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(SampleArgs, args=argv, use_underscores=True)
    with exit_on_user_error():
        check(args)
        import_modules(args.imports)
        from llm.checkpoint import load_trained
        from llm.data.tokenizers import SEQUENCE_TOKENIZERS, tokenizer_from_meta
        from llm.denoise import default_steps, sample
        from llm.generate import generate
        from llm.model.registry import OBJECTIVES
        from llm.precision import pick_precision
        from llm.speculative import SpeculativeStats, check_speculative, speculative_generate

        folder, model, tokenizer_meta = load_trained(args.ckpt)
        diffusion = OBJECTIVES[model.config.objective].diffusion
        check_diffusion(args, diffusion)
        if args.speculative:
            check_speculative(model)
        if model.generation_refusal() is not None and not diffusion:  # the objective's reason not to generate
            raise ConfigError(f"{folder}: {model.generation_refusal()}")
        tokenizer = tokenizer_from_meta(tokenizer_meta)
        device = pick_precision(args.device, "float32").device
        model.to(device)

        if args.prompt_file is not None and not Path(args.prompt_file).is_file():
            raise ConfigError(f"--prompt_file={args.prompt_file!r}: no such file")
        prompt_file = [read_user_text(Path(args.prompt_file), f"--prompt_file={args.prompt_file!r}")] \
            if args.prompt_file else []
        texts = list(args.prompt) + prompt_file
        if not texts:
            texts = [""]
        if tokenizer_meta["tokenizer"] in SEQUENCE_TOKENIZERS:  # a sequence begins with its begin token
            eot, start = tokenizer.eos, [tokenizer.bos]
        else:
            eot, start = tokenizer.eot, []
        encoded = [fit_to_block(start + tokenizer.encode(t) or ([eot] if eot is not None else tokenizer.encode("\n")),
                                i, model.config.block_size, args.strict_prompt) for i, t in enumerate(texts)]
        prompts = [p for p in encoded for _ in range(args.num_samples)]
        generator = torch.Generator(device=device).manual_seed(args.seed)
        printer = Printer(tokenizer, streaming=len(prompts) == 1 and not diffusion)
        print(f"{folder} ({sum(p.numel() for p in model.parameters()):,} parameters) on {device}", file=sys.stderr)
        if printer.streaming:
            print(texts[0], end="", flush=True)
        start = time.perf_counter()
        stats = SpeculativeStats()
        if diffusion:
            steps = args.steps or default_steps(model)
            outputs, calls = sample(model, prompts, args.max_new_tokens, steps, generator, args.stride, args.sampler)
        elif args.speculative:
            outputs = speculative_generate(model, prompts, args.max_new_tokens, eot, on_step=printer, stats=stats)
        else:
            outputs = generate(model, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, eot,
                               generator, use_cache=args.cache, on_step=printer)
        seconds = time.perf_counter() - start
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        if printer.streaming:
            print()
        else:
            print(f"--- sample {i + 1}\n{tokenizer.decode(prompt)}{tokenizer.decode(output)}")
    n = sum(len(o) for o in outputs)
    how = f"{steps} steps per window, {calls} model evaluations" if diffusion else \
        f"{'with' if args.cache else 'without'} cache"
    print(f"{n} tokens in {seconds:.2f} s ({n / seconds:,.0f} tokens/s, {how})", file=sys.stderr)
    if args.judge:
        with exit_on_user_error():
            print(judged(args.judge, prompts, outputs, tokenizer_meta, device), file=sys.stderr)
    if args.speculative:
        print(f"speculative: {stats.accepted}/{stats.drafted} drafts accepted ({100 * stats.acceptance():.0f}%) in "
              f"{stats.rounds} verification passes", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])

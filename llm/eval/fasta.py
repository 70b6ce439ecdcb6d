"""Evaluate a trained model on sequences, as bionemo's OpenGenome2 recipe does.

    python -m llm.eval fasta --ckpt out/run --fasta test.fa [--max_sequences 100] [--json results.json]

Each record is tokenized without special tokens and truncated to the model's block_size; labels outside ACGT (in
either case: N and other degenerate bases) are left out of the loss. A causal model is scored on next-token
prediction; a masked LM on its masked tokens (masked as in training, with a fixed seed), with their accuracy. One
line per sequence (tokens scored, loss, perplexity), then the token-weighted loss and perplexity over all of them.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import tyro

from ..config import ConfigError, Trainconfig, exit_on_user_error
from ..data.genomic_sources import genomic_corpus
from ..data.labels import label_rules
from ..data.tokenizers import tokenizer_from_meta
from ..model.registry import OBJECTIVES
from ..plugins import Imports, import_modules
from ..targets import IGNORE, Batching


@dataclass
class EvalArgs:
    """Loss and perplexity of a checkpoint on the records of a FASTA (or FASTQ, JSONL, Parquet) file or folder."""

    task: tyro.conf.Positional[Literal["fasta"]]
    """What to evaluate: fasta (sequences)."""
    ckpt: str
    """A run directory or checkpoint folder."""
    fasta: str
    """The sequences: a FASTA/FASTQ (plain or .gz), .jsonl or .parquet file, or a folder of them."""
    max_sequences: int | None = None
    """Evaluate only the first N records."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    seed: int = 0
    """Masked LM: the seed of the masking."""
    json: str | None = None
    """Also write the results to this JSON file."""
    imports: Imports = field(default_factory=list)
    """--import MODULE (repeatable): a module to import first, e.g. one that registers kinds of its own with
    llm.model.register_arch; looked up on sys.path and in the working directory."""


@torch.no_grad()
def score(model, batching: Batching, ids: list[int], generator: torch.Generator,
          device: torch.device) -> tuple[float, int, int]:
    """(summed loss, tokens scored, tokens predicted correctly) of one tokenized sequence."""
    row = torch.tensor([ids])  # (1, n)
    uniforms = torch.rand(batching.draws, 1, row.size(1), generator=generator) if batching.draws else None
    x, y, *_ = batching(row, uniforms)  # (1, T) each; the plain loss, without the objective's token weights
    x, y = x.to(device), y.to(device)
    logits = model(x).logits.float()  # (1, T, V)
    scored = y != IGNORE  # (1, T)
    n = int(scored.sum())
    if n == 0:
        return 0.0, 0, 0
    loss = torch.nn.functional.cross_entropy(logits[scored], y[scored], reduction="sum")
    return loss.item(), n, int((logits[scored].argmax(-1) == y[scored]).sum())


def evaluate_fasta(args: EvalArgs) -> dict:
    """Scores every record and returns {"sequences": [...], "loss", "perplexity", ...}, printing a line for each."""
    from ..checkpoint import load_trained
    from ..precision import pick_precision

    if not Path(args.fasta).exists():
        raise ConfigError(f"--fasta={args.fasta!r}: no such file or folder; pass a FASTA file or a folder of them")
    if args.max_sequences is not None and args.max_sequences < 1:
        raise ConfigError(f"--max_sequences={args.max_sequences} must be >= 1")
    folder, model, tokenizer_meta = load_trained(args.ckpt)
    device = pick_precision(args.device, "float32").device
    model.to(device)
    tokenizer = tokenizer_from_meta(tokenizer_meta)
    saved = json.loads((folder / "config.json").read_text()).get("train", {})
    as_trained = Trainconfig(mask_prob=saved.get("mask_prob", 0.15), mask_strategy=saved.get("mask_strategy", "helm"))
    batching = OBJECTIVES[model.config.objective].batching(label_rules(tokenizer, "acgt"), as_trained,
                                                           model.config)
    generator = torch.Generator().manual_seed(args.seed)
    length = model.config.block_size + batching.extra_tokens  # a causal row holds one more token than it predicts
    rows, total_loss, total_tokens, total_hits = [], 0.0, 0, 0
    corpus = genomic_corpus(args.fasta, part_chars=None)
    for number, piece in enumerate(corpus.train(), start=1):
        if args.max_sequences is not None and number > args.max_sequences:
            break
        ids = tokenizer.encode(piece.text)[:length]
        if len(ids) < 2:
            raise ConfigError(f"{args.fasta}: record {number} has {len(ids)} tokens; at least 2 are needed")
        loss, n, hits = score(model, batching, ids, generator, device)
        row = {"record": number, "tokens": n, "loss": loss / n if n else None,
               "perplexity": math.exp(loss / n) if n else None, "accuracy": hits / n if n else None}
        rows.append(row)
        total_loss, total_tokens, total_hits = total_loss + loss, total_tokens + n, total_hits + hits
        shown = "no ACGT label" if not n else f"loss {row['loss']:.4f} | perplexity {row['perplexity']:.3f}"
        print(f"record {number} | {n} tokens | {shown}")
    if not total_tokens:
        raise ConfigError(f"{args.fasta}: no record has an A, C, G or T label to score")
    loss = total_loss / total_tokens
    result = {"checkpoint": str(folder), "fasta": args.fasta, "objective": model.config.objective,
              "sequences": rows, "tokens": total_tokens, "loss": loss, "perplexity": math.exp(loss),
              "accuracy": total_hits / total_tokens}
    if model.causal and model.config.loss == "ce":  # each scored token is k ACGT letters, of which k - overlap new
        letters = getattr(tokenizer, "k", 1) - getattr(tokenizer, "overlap", 0)
        result["bits_per_base"] = loss / math.log(2) / letters
    print(f"{len(rows)} sequences, {total_tokens:,} tokens | loss {loss:.4f} | perplexity {math.exp(loss):.3f}"
          + (f" | {result['bits_per_base']:.4f} bits per base" if "bits_per_base" in result else "")
          + ("" if model.causal else f" | masked accuracy {result['accuracy']:.4f}"))
    return result


def main(argv: list[str]) -> dict:
    """`python -m llm.eval fasta ...` (argv starts with "fasta"): one `error: ...` line and exit 2 for a user
    mistake."""
    args = tyro.cli(EvalArgs, args=argv, use_underscores=True, prog="python -m llm.eval")
    with exit_on_user_error():
        import_modules(args.imports)
        result = evaluate_fasta(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result

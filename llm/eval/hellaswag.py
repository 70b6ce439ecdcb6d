"""HellaSwag-style multiple choice: each ending scored by the log-likelihood of its tokens after the context.

    python -m llm.eval hellaswag --ckpt out/run --file hellaswag_val.jsonl [--limit 1000] [--json results.json]

Every line of the JSONL file is one example: `endings` (a list of strings), `label` (the index of the right one)
and the context, either as `ctx` or, as the official files have it, as `activity_label`, `ctx_a` and `ctx_b`. The
official fields are read as lm-evaluation-harness's `hellaswag` task reads them: the context is
`activity_label + ": " + ctx_a + " " + ctx_b.capitalize()`, and it and each ending are cleaned of WikiHow's bracket
tags (`preprocess`). A file of your own with `ctx`, `endings` and `label` is read as written.

An ending is scored as the continuation " " + ending (lm-eval's target delimiter). acc counts the examples whose
label has the highest summed log-likelihood; acc_norm divides each by the ending's length in characters first.
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

from ..config import ConfigError, exit_on_user_error
from ..plugins import Imports, import_modules
from .scoring import continuation_logprobs, encode_pair, load_causal, write_json

OFFICIAL_FIELDS = ("activity_label", "ctx_a", "ctx_b")


@dataclass
class HellaswagArgs:
    """Accuracy of a checkpoint on HellaSwag-style multiple-choice examples (acc and length-normalised acc_norm)."""

    ckpt: str
    """A run folder (its best checkpoint, else its newest) or a checkpoint folder."""
    file: str
    """The examples: a JSONL file with endings, label and ctx (or activity_label, ctx_a and ctx_b) on each line."""
    limit: int | None = None
    """Evaluate only the first N examples."""
    batch_size: int = 16
    """Endings scored per forward pass."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    json: str | None = None
    """Also write the results (and every example's scores) to this JSON file."""
    imports: Imports = field(default_factory=list)
    """--import MODULE (repeatable): a module to import first, e.g. one that registers kinds of its own with
    llm.model.register_arch; looked up on sys.path and in the working directory."""


@dataclass
class Example:
    """One multiple-choice example: the context, the endings, the index of the right ending, and where it is."""

    context: str
    endings: list[str]
    label: int
    name: str


def preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleaning: surrounding whitespace stripped, " [title]" read as a full stop,
    other bracket tags removed, double spaces made single."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def parse_example(record: dict, name: str) -> Example:
    """The example of one JSON record, or a one-line error naming it (`name`) and what is missing or wrong."""
    official = all(isinstance(record.get(k), str) for k in OFFICIAL_FIELDS)
    missing = [k for k in ("endings", "label") if k not in record] + ([] if official or "ctx" in record else ["ctx"])
    if missing:
        raise ConfigError(f"{name}: missing field(s) {', '.join(missing)}; each line needs ctx (or activity_label, "
                          "ctx_a and ctx_b), endings and label")
    endings = record["endings"]
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise ConfigError(f"{name}: endings must be a list of at least 2 strings")
    label = record["label"]
    if isinstance(label, str) and label.strip().isdigit():  # the Hugging Face copy stores labels as text
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise ConfigError(f"{name}: label {record['label']!r} is out of range; it must be an index 0 to "
                          f"{len(endings) - 1} into the {len(endings)} endings")
    if official:
        context = preprocess(f"{record['activity_label']}: {record['ctx_a']} {record['ctx_b'].capitalize()}")
        endings = [preprocess(e) for e in endings]
    elif isinstance(record["ctx"], str):
        context = record["ctx"]
    else:
        raise ConfigError(f"{name}: ctx must be a string")
    if not context:
        raise ConfigError(f"{name}: the context is empty")
    empty = [i for i, e in enumerate(endings) if not e]
    if empty:
        raise ConfigError(f"{name}: ending {empty[0]} is empty")
    return Example(context, endings, label, name)


def read_examples(path: str, limit: int | None = None, given_as: str | None = None) -> list[Example]:
    """The examples of a JSONL file (its first `limit`), or a one-line error naming the file and line, and the flag
    that named the file (given_as; default --file=PATH)."""
    given_as = given_as or f"--file={path}"
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{given_as}: no such file; pass a JSONL file of examples")
    examples = []
    with file.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and len(examples) == limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{path}:{number}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{number}: a {type(record).__name__}, not a JSON object")
            examples.append(parse_example(record, f"{path}:{number}"))
    if not examples:
        raise ConfigError(f"{given_as} holds no examples")
    return examples


def hellaswag_scores(model, tokenizer, examples: list[Example], device: torch.device | str,
                     batch_size: int = 16) -> dict:
    """{"examples", "acc", "acc_norm", "rows"} of a causal model on the examples; rows hold each example's summed
    log-likelihoods and its predictions by them (pred) and by them per character of the ending (pred_norm). The
    model's train/eval mode is kept."""
    pairs, names = [], []
    for example in examples:
        for i, ending in enumerate(example.endings):
            try:
                pairs.append(encode_pair(tokenizer, example.context, " " + ending))
            except ConfigError as e:
                raise ConfigError(f"{example.name}: {e}") from None
            names.append(f"{example.name} ending {i}")
    scores = continuation_logprobs(model, pairs, device, batch_size, name=lambda i: names[i])
    rows, start = [], 0
    for example in examples:
        logliks = [total for total, _ in scores[start:start + len(example.endings)]]
        start += len(example.endings)
        normed = [total / len(ending) for total, ending in zip(logliks, example.endings)]
        rows.append({"example": example.name, "label": example.label, "logliks": logliks,
                     "pred": logliks.index(max(logliks)), "pred_norm": normed.index(max(normed))})
    return {"examples": len(rows), "acc": sum(r["pred"] == r["label"] for r in rows) / len(rows),
            "acc_norm": sum(r["pred_norm"] == r["label"] for r in rows) / len(rows), "rows": rows}


def evaluate_hellaswag(args: HellaswagArgs) -> dict:
    """Scores the file's examples with the checkpoint, prints acc and acc_norm, and returns the results."""
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit={args.limit} must be >= 1")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size={args.batch_size} must be >= 1")
    examples = read_examples(args.file, args.limit)
    folder, model, tokenizer, _ = load_causal(args.ckpt, args.device)
    scores = hellaswag_scores(model, tokenizer, examples, model.tok_emb.weight.device, args.batch_size)
    print(f"{folder} | {args.file}: {scores['examples']} examples | acc {scores['acc']:.4f} | "
          f"acc_norm {scores['acc_norm']:.4f}")
    return {"checkpoint": str(folder), "file": args.file, **scores}


def main(argv: list[str]) -> dict:
    """`python -m llm.eval hellaswag ...` (argv without the word hellaswag)."""
    args = tyro.cli(HellaswagArgs, args=argv, use_underscores=True, prog="python -m llm.eval hellaswag")
    with exit_on_user_error():
        import_modules(args.imports)
        result = evaluate_hellaswag(args)
        write_json(args.json, result)
    return result

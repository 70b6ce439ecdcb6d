"""Benchmarks scored at every evaluation of a run (--eval_tasks 'hellaswag:PATH'): HellaSwag-style multiple choice
from a JSONL file, logged as NAME_acc and NAME_acc_norm beside the losses (NAME: the file's stem)."""
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError
from ..data.tokenizers import tokenizer_from_meta

TASK_KINDS = ("hellaswag",)


@dataclass
class EvalTask:
    """One benchmark file: its name in the metrics and its examples."""

    name: str
    examples: list


def load_eval_tasks(spec: str | None, causal: bool) -> list[EvalTask]:
    """The tasks of 'KIND:PATH[,KIND:PATH...]', read at start-up so a bad file stops the run before it trains."""
    if spec is None:
        return []
    if not causal:
        raise ConfigError("eval_tasks scores the likelihood of each ending under a causal model; a masked LM (objective "
                          "mlm) has none: drop --eval_tasks")
    from ..eval.hellaswag import read_examples

    tasks = []
    for part in spec.split(","):
        kind, sep, path = part.strip().partition(":")
        if not sep or kind not in TASK_KINDS or not path:
            raise ConfigError(f"eval_tasks={spec!r}: {part.strip()!r} is not KIND:PATH with KIND one of "
                              f"{', '.join(TASK_KINDS)}; write it as hellaswag:data/hellaswag_val.jsonl")
        tasks.append(EvalTask(Path(path).stem, read_examples(path)))
    return tasks


def score_eval_tasks(tasks: list[EvalTask], model, tokenizer_meta: dict, device: torch.device) -> dict[str, float]:
    """{NAME_acc, NAME_acc_norm} of every task (every rank scores them: a sharded model needs all ranks)."""
    if not tasks:
        return {}
    from ..eval.hellaswag import hellaswag_scores

    tokenizer = tokenizer_from_meta(tokenizer_meta)
    metrics = {}
    for task in tasks:
        scores = hellaswag_scores(model, tokenizer, task.examples, device)
        metrics.update({f"{task.name}_acc": scores["acc"], f"{task.name}_acc_norm": scores["acc_norm"]})
    return metrics

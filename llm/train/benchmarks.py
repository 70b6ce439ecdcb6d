"""Benchmarks scored at every evaluation of a run (--eval_tasks): HellaSwag-style multiple choice from a JSONL file
(`hellaswag:PATH`, logged as STEM_acc and STEM_acc_norm, STEM the file's stem) and lm-evaluation-harness tasks that
run offline (`lm_eval:TASK`, a task name or a task YAML file; logged as TASK/METRIC), beside the losses."""
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError
from ..data.tokenizers import tokenizer_from_meta

TASK_KINDS = ("hellaswag", "lm_eval")


@dataclass
class EvalTask:
    """One benchmark: its kind, its name in the metrics, and what it scores (examples, or lm-eval task names and
    the TaskManager that knows them)."""

    kind: str
    name: str
    examples: list = field(default_factory=list)
    lm_eval_tasks: list[str] = field(default_factory=list)
    manager: object = None


def load_eval_tasks(spec: str | None, causal: bool) -> list[EvalTask]:
    """The tasks of 'KIND:WHAT[,KIND:WHAT...]', read or looked up at start-up so a bad one stops the run before it
    trains."""
    if spec is None:
        return []
    if not causal:
        raise ConfigError("eval_tasks scores the likelihood of continuations under a causal model; a bidirectional "
                          "one (objective mlm, mdlm, sedd, d3pm) has none: drop --eval_tasks")
    tasks = []
    for part in spec.split(","):
        kind, sep, what = part.strip().partition(":")
        if not sep or kind not in TASK_KINDS or not what:
            raise ConfigError(f"eval_tasks={spec!r}: {part.strip()!r} is not KIND:WHAT with KIND one of "
                              f"{', '.join(TASK_KINDS)}; write it as hellaswag:data/hellaswag_val.jsonl or "
                              "lm_eval:TASK")
        if kind == "hellaswag":
            from ..eval.hellaswag import read_examples

            examples = read_examples(what, given_as=f"--eval_tasks {kind}:{what}")
            tasks.append(EvalTask(kind, Path(what).stem, examples=examples))
        else:
            try:
                from ..eval.lm_eval_adapter import task_manager
            except ImportError:
                raise ConfigError("eval_tasks lm_eval:... needs lm-evaluation-harness: pip install 'llm[eval]'") from None
            manager, names = task_manager([what], None)
            tasks.append(EvalTask(kind, what, lm_eval_tasks=names, manager=manager))
    return tasks


def score_lm_eval(task: EvalTask, model, tokenizer, tokenizer_meta: dict) -> dict[str, float]:
    """{TASK/METRIC} of an lm-eval task (its numeric metrics, standard errors left out)."""
    from lm_eval import simple_evaluate

    from ..eval.lm_eval_adapter import CheckpointLM

    results = simple_evaluate(model=CheckpointLM(model, tokenizer, tokenizer_meta), tasks=task.lm_eval_tasks,
                              task_manager=task.manager, bootstrap_iters=0, log_samples=False)["results"]
    return {f"{name}/{metric.split(',')[0]}": float(value) for name, metrics in results.items()
            for metric, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in metric}


def score_eval_tasks(tasks: list[EvalTask], model, tokenizer_meta: dict, device: torch.device) -> dict[str, float]:
    """The metrics of every task (every rank scores them: a sharded model needs all ranks); the model's train/eval
    mode is kept."""
    if not tasks:
        return {}
    from ..eval.hellaswag import hellaswag_scores

    tokenizer = tokenizer_from_meta(tokenizer_meta)
    training, metrics = model.training, {}
    for task in tasks:
        if task.kind == "hellaswag":
            scores = hellaswag_scores(model, tokenizer, task.examples, device)
            metrics.update({f"{task.name}_acc": scores["acc"], f"{task.name}_acc_norm": scores["acc_norm"]})
        else:
            metrics.update(score_lm_eval(task, model, tokenizer, tokenizer_meta))
    model.train(training)
    return metrics

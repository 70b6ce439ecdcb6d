"""Evaluate a trained checkpoint: `python -m llm.eval TASK ...`.

    python -m llm.eval data --ckpt out/run                                # the objective's figures on its val split
    python -m llm.eval fasta --ckpt out/run --fasta test.fa               # loss and perplexity per sequence
    python -m llm.eval hellaswag --ckpt out/run --file hellaswag_val.jsonl  # multiple choice: acc and acc_norm
    python -m llm.eval lm_eval --ckpt out/run --tasks hellaswag,piqa      # lm-evaluation-harness tasks, in process

`python -m llm.eval TASK --help` lists a task's flags. lm_eval needs the eval extra: pip install 'llm[eval]'.
"""
import sys

from . import data, fasta, hellaswag
from .fasta import EvalArgs, evaluate_fasta, score
from .hellaswag import Example, HellaswagArgs, evaluate_hellaswag, hellaswag_scores, read_examples
from .scoring import continuation_logprobs, encode_pair

__all__ = ["EvalArgs", "Example", "HellaswagArgs", "continuation_logprobs", "encode_pair", "evaluate_fasta",
           "evaluate_hellaswag", "hellaswag_scores", "main", "read_examples", "score"]
TASKS = ("data", "fasta", "hellaswag", "lm_eval")


def fail(message: str) -> None:
    """One `error: ...` line on stderr and exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def lm_eval_main(argv: list[str]) -> dict:
    """The lm_eval task, whose module needs lm-evaluation-harness."""
    try:
        from .lm_eval_adapter import main as run
    except ModuleNotFoundError as e:
        if e.name is None or e.name.partition(".")[0] != "lm_eval":
            raise
        fail("lm-evaluation-harness is not installed; pip install 'llm[eval]' (or pip install lm-eval)")
    return run(argv)


def main(argv: list[str] | None = None) -> dict:
    """The command line: the first word picks the task; one `error: ...` line and exit 2 for a user mistake."""
    argv = sys.argv[1:] if argv is None else list(argv)
    task = argv[0] if argv else None
    if task in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    if task == "data":
        return data.main(argv)
    if task == "fasta":
        return fasta.main(argv)
    if task == "hellaswag":
        return hellaswag.main(argv[1:])
    if task == "lm_eval":
        return lm_eval_main(argv[1:])
    fail(f"python -m llm.eval TASK: TASK is one of {', '.join(TASKS)}" + (f", not {task!r}" if task else ""))

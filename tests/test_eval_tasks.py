"""--eval_tasks: HellaSwag-style files scored at each evaluation of a run, equal to python -m llm.eval hellaswag on
the saved checkpoint; bad specs are one line."""
import json

import pytest

from llm.cli import parse
from llm.config import ConfigError
from llm.eval import main as eval_main
from llm.train import train
from tests.conftest import REPO

EXAMPLES = [
    {"ctx": "The king said", "endings": [" to the queen.", " no more.", " it again.", " thee well."], "label": 1},
    {"ctx": "ROMEO: I am", "endings": [" here.", " gone, my lord.", " not she.", " the sun."], "label": 0},
    {"ctx": "Good morrow,", "endings": [" sir.", " my good lord.", " Kate.", " cousin."], "label": 2},
]


def test_a_run_logs_the_scores_of_its_checkpoint(char_data, tmp_path):
    tasks = tmp_path / "mini_choice.jsonl"
    tasks.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    train(*parse(["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--max_iters", "3", "--n_layer",
                  "1", "--block_size", "32", "--eval", "--eval_interval", "3", "--eval_iters", "1",
                  "--eval_tasks", f"hellaswag:{tasks}", "--save_model"]))
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()][-1]
    scored = eval_main(["hellaswag", "--ckpt", str(tmp_path / "run"), "--file", str(tasks)])
    assert (last["mini_choice_acc"], last["mini_choice_acc_norm"]) == (scored["acc"], scored["acc_norm"])


@pytest.mark.parametrize("argv,message", [
    (["--eval", "--eval_tasks", "hellaswag"], "is not KIND:WHAT"),
    (["--eval", "--eval_tasks", "arc:x.jsonl"], "is not KIND:WHAT"),
    (["--no_eval", "--eval_tasks", "hellaswag:x.jsonl"], "drop --no_eval"),
    (["--eval", "--eval_tasks", "hellaswag:missing.jsonl"], r"^--eval_tasks hellaswag:missing.jsonl: no such file"),
])
def test_bad_specs_are_one_line(argv, message, char_data, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(*parse(["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--max_iters", "1", *argv]))


def test_an_lm_eval_task_is_scored_as_llm_eval_scores_the_checkpoint(char_data, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the task's YAML names its data relative to the repository
    task = "tests/data/lm_eval_tasks/mini_choice.yaml"
    train(*parse(["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--max_iters", "3", "--n_layer",
                  "1", "--block_size", "64", "--eval", "--eval_interval", "3", "--eval_iters", "1",
                  "--eval_tasks", f"lm_eval:{task}", "--save_model"]))
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()][-1]
    scored = eval_main(["lm_eval", "--ckpt", str(tmp_path / "run"), "--tasks", task, "--bootstrap_iters", "0"])
    expected = scored["results"]["mini_choice"]
    assert last["mini_choice/acc"] == expected["acc,none"]
    assert last["mini_choice/acc_norm"] == expected["acc_norm,none"]

"""python -m llm.eval hellaswag and lm_eval: scores equal brute-force log-probabilities, lm-eval's own hellaswag task
and its hf backend on the exported model agree with ours, generation stops at the stop strings, one-line errors."""
import json
import math
import shutil
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from lm_eval.tasks.hellaswag.utils import preprocess as lm_eval_preprocess

from llm import eval as llm_eval
from llm.checkpoint import load_trained
from llm.cli import parse
from llm.config import ConfigError
from llm.data.tokenizers import ByteTokenizer, NucleotideTokenizer, tokenizer_from_meta
from llm.eval import lm_eval_adapter
from llm.eval.lm_eval_adapter import CheckpointLM
from llm.generate import generate
from llm.model import build_model
from llm.train import train
from tests.conftest import REPO, make_config

DATA = REPO / "tests" / "data"
MINI = DATA / "hellaswag_mini.jsonl"
TASKS = DATA / "lm_eval_tasks"
TASK_NAMES = ["mini_choice", "mini_rolling", "mini_generate"]


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory) -> Path:
    """A run folder with a GPT-2-tokenised checkpoint (2 steps, block_size 64) that exports as GPT2LMHeadModel."""
    from llm.data.prepare import PrepareArgs, prepare

    tmp = tmp_path_factory.mktemp("gpt2")
    text = tmp / "t.txt"
    text.write_text("The king sat upon his throne. Good night, sweet prince. " * 300)
    prepare(PrepareArgs("text", source=str(text), out=str(tmp / "data" / "gpt2text"), workers=1))
    train(*parse(["--data_dir", str(tmp / "data"), "--dataset", "gpt2text", "--out_dir", str(tmp), "--max_iters",
                  "2", "--save_model", "--n_layer", "1", "--n_embd", "32", "--block_size", "64", "--batch_size",
                  "4", "--total_batch_size_str", "256", "--non_linearity", "gelu_tanh", "--bias"]))
    return tmp / "run"


@pytest.fixture(scope="module")
def char_run(char_data, tmp_path_factory) -> Path:
    """A run folder with a char-tokenised checkpoint of Tiny Shakespeare (2 steps, block_size 48)."""
    out = tmp_path_factory.mktemp("char")
    train(*parse(["--data_dir", str(char_data.parent), "--out_dir", str(out), "--max_iters", "2", "--save_model",
                  "--n_layer", "1", "--n_embd", "32", "--block_size", "48", "--batch_size", "4",
                  "--total_batch_size_str", "192"]))
    return out / "run"


@pytest.fixture
def at_repo(monkeypatch):
    """The repository root as the working folder: the test tasks name their data files relative to it."""
    monkeypatch.chdir(REPO)


def loaded(run: Path):
    """(model, tokenizer, tokenizer meta) of a run's checkpoint."""
    _, model, meta = load_trained(str(run))
    return model, tokenizer_from_meta(meta), meta


@torch.no_grad()
def brute_logprob(model, context: list[int], continuation: list[int]) -> float:
    """The summed log-probability of the continuation after the context, each token from a forward pass of its own
    over the tokens before it; the window starts where the last block_size + 1 tokens of the pair start."""
    full, total = context + continuation, 0.0
    start = max(0, len(full) - model.config.block_size - 1)
    for j in range(len(context), len(full)):
        total += model(torch.tensor([full[start:j]])).logits[0, -1].log_softmax(-1)[full[j]].item()
    return total


def logliks(sample: dict) -> list[float]:
    """The log-likelihoods of an lm-eval sample's requests (multiple choice: one per choice)."""
    return [r[0][0] if isinstance(r[0], tuple) else r[0] for r in sample["resps"]]


def test_hellaswag_equals_brute_force_log_probabilities(gpt2_run, tmp_path):
    out = tmp_path / "h.json"
    result = llm_eval.main(["hellaswag", "--ckpt", str(gpt2_run), "--file", str(MINI), "--json", str(out),
                            "--batch_size", "5"])
    assert json.loads(out.read_text())["acc"] == result["acc"]
    model, tokenizer, _ = loaded(gpt2_run)
    records = [json.loads(line) for line in MINI.read_text().splitlines()]
    hits = hits_norm = 0
    for record, row in zip(records, result["rows"], strict=True):
        context = lm_eval_preprocess(f"{record['activity_label']}: {record['ctx_a']} {record['ctx_b'].capitalize()}")
        endings = [lm_eval_preprocess(e) for e in record["endings"]]
        trimmed = context.rstrip()  # lm-eval moves a context's trailing spaces to the continuation (record 5 has one)
        context_ids = tokenizer.encode(trimmed)
        logliks = [brute_logprob(model, context_ids, tokenizer.encode(f"{context} {e}")[len(context_ids):])
                   for e in endings]
        assert row["logliks"] == pytest.approx(logliks, abs=1e-4)
        hits += max(range(4), key=lambda i: logliks[i]) == record["label"]
        hits_norm += max(range(4), key=lambda i: logliks[i] / len(endings[i])) == record["label"]
    assert result["examples"] == 6
    assert (result["acc"], result["acc_norm"]) == (hits / 6, hits_norm / 6)
    assert llm_eval.main(["hellaswag", "--ckpt", str(gpt2_run), "--file", str(MINI), "--limit", "2"])["examples"] == 2


def official_hellaswag_task(folder: Path) -> TaskManager:
    """lm-eval's own hellaswag task (its YAML and utils.py) reading the shipped examples instead of the Hub's."""
    source = Path(lm_eval.__file__).parent / "tasks" / "hellaswag"
    shutil.copy(source / "utils.py", folder / "utils.py")
    yaml = (source / "hellaswag.yaml").read_text()
    local = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {MINI}\n"
    (folder / "hellaswag.yaml").write_text(yaml.replace("dataset_path: Rowan/hellaswag\n", local)
                                           .replace("training_split: train\n", ""))
    return TaskManager(include_path=str(folder), include_defaults=False)


def test_hellaswag_equals_lm_evals_own_hellaswag_task(gpt2_run, tmp_path):
    ours = llm_eval.main(["hellaswag", "--ckpt", str(gpt2_run), "--file", str(MINI)])
    model, tokenizer, meta = loaded(gpt2_run)
    results = simple_evaluate(model=CheckpointLM(model, tokenizer, meta, batch_size=3), tasks=["hellaswag"],
                              task_manager=official_hellaswag_task(tmp_path), bootstrap_iters=0)
    theirs = results["results"]["hellaswag"]
    assert (theirs["acc,none"], theirs["acc_norm,none"]) == pytest.approx((ours["acc"], ours["acc_norm"]))
    theirs_logliks = [ll for sample in results["samples"]["hellaswag"] for ll in logliks(sample)]
    assert theirs_logliks == pytest.approx([ll for row in ours["rows"] for ll in row["logliks"]], abs=1e-4)


@torch.no_grad()
def brute_rolling(model, ids: list[int], prefix: int) -> float:
    """A document's log-likelihood in lm-eval's disjoint windows: the window ending at token `end` (every
    block_size tokens) reads the block_size tokens before it, the prefix token first."""
    block, seq, total = model.config.block_size, [prefix] + ids, 0.0
    for start in range(0, len(ids), block):
        end = min(start + block, len(ids))
        first = max(0, end - block)
        logprobs = model(torch.tensor([seq[first:end]])).logits[0].log_softmax(-1)  # (n, V)
        targets = torch.tensor(seq[first + 1:end + 1])  # (n,)
        total += logprobs.gather(-1, targets[:, None])[-(end - start):].sum().item()
    return total


def test_lm_eval_command_on_a_char_checkpoint_equals_brute_force(char_run, tmp_path, at_repo):
    out = tmp_path / "l.json"
    result = llm_eval.main(["lm_eval", "--ckpt", str(char_run), "--tasks", ",".join(TASK_NAMES), "--include_path",
                            str(TASKS), "--bootstrap_iters", "0", "--batch_size", "3", "--json", str(out)])
    assert json.loads(out.read_text())["results"] == result["results"]
    assert sorted(result["tasks"]) == sorted(TASK_NAMES)
    model, tokenizer, _ = loaded(char_run)
    newline = tokenizer.encode("\n")[0]  # a char vocabulary of one document has no end-of-text token
    docs = [json.loads(line)["text"] for line in (TASKS / "mini_text.jsonl").read_text().splitlines()]
    assert max(len(d) for d in docs) > 2 * model.config.block_size  # several windows
    total = sum(brute_rolling(model, tokenizer.encode(d), newline) for d in docs)
    bits = -total / sum(len(d.encode()) for d in docs) / math.log(2)
    assert result["results"]["mini_rolling"]["bits_per_byte,none"] == pytest.approx(bits, abs=1e-4)
    questions = [json.loads(line) for line in (TASKS / "mini_choice.jsonl").read_text().splitlines()]
    hits = hits_norm = 0
    for q in questions:
        logliks = [brute_logprob(model, tokenizer.encode(q["question"]), tokenizer.encode(" " + c))
                   for c in q["choices"]]
        hits += max(range(4), key=lambda i: logliks[i]) == q["answer"]
        hits_norm += max(range(4), key=lambda i: logliks[i] / len(q["choices"][i])) == q["answer"]
    assert result["results"]["mini_choice"]["acc,none"] == pytest.approx(hits / len(questions))
    assert result["results"]["mini_choice"]["acc_norm,none"] == pytest.approx(hits_norm / len(questions))
    assert result["results"]["mini_generate"]["exact_match,none"] == 0.0


def test_generation_stops_at_the_first_stop_string(char_run):
    model, tokenizer, meta = loaded(char_run)
    lm = CheckpointLM(model, tokenizer, meta, batch_size=2)
    contexts = ["ROMEO:\nBut soft", "KING:\nNow is the winter of our"]
    greedy = [tokenizer.decode(ids) for ids in generate(model, [tokenizer.encode(c) for c in contexts], 12,
                                                        temperature=0)]
    stop = greedy[1][3:5]  # stops the second row after at most 5 characters
    requests = [Instance("generate_until", {}, (c, {"until": [stop], "max_gen_toks": 12, "do_sample": False}), i)
                for i, c in enumerate(contexts)]
    assert lm.generate_until(requests) == [text.split(stop)[0] for text in greedy]
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    lm.generate_until(requests[1:])
    assert len(calls) <= 5  # one pass per new token: generation ended at the stop string

    def six_tokens(**settings) -> str:
        request = Instance("generate_until", {}, (contexts[0], {"until": [], "max_gen_toks": 6, **settings}), 0)
        return lm.generate_until([request])[0]

    sampled = six_tokens(do_sample=True, temperature=1.0)
    assert sampled == six_tokens(do_sample=True, temperature=1.0) != six_tokens(do_sample=False)  # seeded


@pytest.mark.parametrize("tokenizer,meta", [(ByteTokenizer(), {"tokenizer": "byte"}),
                                            (NucleotideTokenizer(), {"tokenizer": "nucleotide"})],
                         ids=["byte", "nucleotide"])
def test_loglikelihood_of_byte_and_sequence_tokenizers(tokenizer, meta):
    model = build_model(make_config(vocab_size=256, block_size=16)).eval()
    lm = CheckpointLM(model, tokenizer, meta)
    prefix = 0 if meta["tokenizer"] == "byte" else tokenizer.bos  # end-of-text, or the sequence's begin token
    requests = [Instance("loglikelihood", {}, ("ACGTACGTACGTAC", "GTTA"), 0),
                Instance("loglikelihood", {}, ("", "ACGT"), 1)]
    (first, _), (second, _) = lm.loglikelihood(requests)
    assert first == pytest.approx(brute_logprob(model, tokenizer.encode("ACGTACGTACGTAC"),
                                                tokenizer.encode("GTTA")), abs=1e-4)
    assert second == pytest.approx(brute_logprob(model, [prefix], tokenizer.encode("ACGT")), abs=1e-4)
    text = "ACGT" * 10  # 40 tokens: three windows of block_size 16
    rolling, = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert rolling == pytest.approx(brute_rolling(model, tokenizer.encode(text), prefix), abs=1e-4)


def test_adapter_equals_lm_evals_hf_backend_on_the_export(gpt2_run, tmp_path, at_repo):
    from lm_eval.models.huggingface import HFLM

    from llm.export import export

    hf = HFLM(pretrained=str(export(str(gpt2_run), str(tmp_path / "hf"))), batch_size=1, device="cpu")
    model, tokenizer, meta = loaded(gpt2_run)
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    ours, theirs = [simple_evaluate(model=lm, tasks=TASK_NAMES, task_manager=manager, bootstrap_iters=0)
                    for lm in (CheckpointLM(model, tokenizer, meta, batch_size=4), hf)]
    differences = {}
    for task in TASK_NAMES:
        a, b = ours["results"][task], theirs["results"][task]
        differences |= {f"{task} {k}": abs(a[k] - b[k]) for k in a if k.endswith(",none") and "stderr" not in k}
        pairs = zip(ours["samples"][task], theirs["samples"][task], strict=True)
        for mine, hers in pairs:
            if task == "mini_generate":
                assert mine["resps"] == hers["resps"]
            else:
                differences[f"{task} doc {mine['doc_id']}"] = max(abs(p - q) for p, q in zip(logliks(mine),
                                                                                             logliks(hers)))
    print("ours vs hf:", {k: f"{v:.1e}" for k, v in differences.items()})
    assert max(differences.values()) <= 1e-4


def exits_with_one_line(argv: list[str], capsys) -> str:
    """The error line that llm.eval's main prints for argv, after checking that it exits with code 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        llm_eval.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


BAD_FILES = {
    "not json": ('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n{"ctx": oops}\n', ":2: not valid JSON"),
    "missing": ('{"ctx": "a", "label": 0}\n', ":1: missing field(s) endings;"),
    "label": ('{"ctx": "a", "endings": ["b", "c"], "label": 2}\n', ":1: label 2 is out of range"),
    "too long": ('{"ctx": "a", "endings": ["b", "' + " ".join(["word"] * 80) + '"], "label": 0}\n',
                 ":1 ending 1: 1 context and 80 continuation tokens"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_hellaswag_files_are_one_line_errors(name, gpt2_run, tmp_path, capsys):
    text, message = BAD_FILES[name]
    file = tmp_path / "x.jsonl"
    file.write_text(text)
    assert f"{file}{message}" in exits_with_one_line(["hellaswag", "--ckpt", str(gpt2_run), "--file", str(file)],
                                                     capsys)


def test_command_errors_are_one_line(gpt2_run, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "none.jsonl"
    assert f"--file={missing}: no such file" in exits_with_one_line(
        ["hellaswag", "--ckpt", str(gpt2_run), "--file", str(missing)], capsys)
    assert "TASK is one of data, fasta, hellaswag, lm_eval, not 'mmlu'" in exits_with_one_line(["mmlu"], capsys)
    # lm-eval's own index takes seconds to build: this test looks only at the shipped tasks
    monkeypatch.setattr(lm_eval_adapter, "TaskManager", lambda include_path=None, **_: TaskManager(
        include_path=include_path, include_defaults=False))
    assert "--tasks: no_such_task is not among lm-eval's tasks or --include_path=" in exits_with_one_line(
        ["lm_eval", "--ckpt", str(gpt2_run), "--tasks", "mini_choice,no_such_task", "--include_path", str(TASKS)],
        capsys)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    monkeypatch.delitem(sys.modules, "llm.eval.lm_eval_adapter")
    assert "pip install 'llm[eval]'" in exits_with_one_line(["lm_eval", "--ckpt", str(gpt2_run), "--tasks", "x"],
                                                           capsys)


def test_hellaswag_scores_keeps_the_training_mode(gpt2_run):
    model, tokenizer, _ = loaded(gpt2_run)
    examples = llm_eval.read_examples(str(MINI), limit=2)
    scores = llm_eval.hellaswag_scores(model.train(), tokenizer, examples, "cpu")
    assert model.training and scores["examples"] == 2 and 0 <= scores["acc_norm"] <= 1
    with pytest.raises(ConfigError, match="label 'x' is out of range"):
        llm_eval.hellaswag.parse_example({"ctx": "a", "endings": ["b", "c"], "label": "x"}, "here")


def test_the_scoring_snippet_of_evaluation_md_runs_as_written(gpt2_run, monkeypatch, capsys):
    """docs/evaluation.md's code block, run from the repository root with its out/run pointing at a trained run."""
    text = (REPO / "docs" / "evaluation.md").read_text()
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(REPO)
    exec(compile(snippet.replace('"out/run"', repr(str(gpt2_run))), "evaluation.md", "exec"), {})
    acc, acc_norm = map(float, capsys.readouterr().out.split())
    assert 0 <= acc <= 1 and 0 <= acc_norm <= 1

"""README.md and docs/*.md: every flag they write exists in the help of the entry point that takes it, README stays
short, its test command is the one CI runs, and their relative links point at files that exist."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llm.cli import parse
from llm.config import ConfigError
from tests.conftest import REPO, SHAKESPEARE

DOCS = [REPO / "README.md", REPO / "data" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250
README_TEST_COMMAND = ("python -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e '.[dev]' && "
                       "python -m pytest -q")

# Entry point -> the command that prints its help.
HELP_COMMANDS = {
    "train.py": ["train.py", "--help"],
    "sample.py": ["sample.py", "--help"],
    "llm.data.prepare": ["-m", "llm.data.prepare", "--help"],
    "llm.data.inspect": ["-m", "llm.data.inspect", "--help"],
    "llm.export": ["-m", "llm.export", "--help"],
    "llm.bench": ["-m", "llm.bench", "--help"],
    "llm.report": ["-m", "llm.report", "--help"],
    "llm.sweep": ["-m", "llm.sweep", "--help"],
    "llm.eval": ["-m", "llm.eval", "fasta", "--help"],
    "llm.eval data": ["-m", "llm.eval", "data", "--help"],
    "llm.eval hellaswag": ["-m", "llm.eval", "hellaswag", "--help"],
    "llm.eval lm_eval": ["-m", "llm.eval", "lm_eval", "--help"],
    "llm.data.synthetic_genome": ["-m", "llm.data.synthetic_genome", "--help"],
    "llm.formats.convert": ["-m", "llm.formats.convert", "--help"],
    "scripts/mixers_cpu.py": ["scripts/mixers_cpu.py", "--help"],
    "scripts/peers_cpu.py": ["scripts/peers_cpu.py", "--help"],
}
# How a command line names each entry point. The scripts pass their extra arguments to train.py.
ENTRY_PATTERNS = [
    ("train.py", r"(?<![\w./-])(?:\S*/)?train\.py(?![\w.])"),
    ("sample.py", r"(?<![\w./-])(?:\S*/)?sample\.py(?![\w.])"),
    ("llm.data.prepare", r"-m\s+llm\.data\.prepare\b"),
    ("llm.data.inspect", r"-m\s+llm\.data\.inspect\b"),
    ("llm.export", r"-m\s+llm\.export\b"),
    ("llm.bench", r"-m\s+llm\.bench\b"),
    ("llm.report", r"-m\s+llm\.report\b"),
    ("llm.sweep", r"-m\s+llm\.sweep\b"),
    ("llm.eval hellaswag", r"-m\s+llm\.eval\s+hellaswag\b"),  # before llm.eval, which would match first
    ("llm.eval lm_eval", r"-m\s+llm\.eval\s+lm_eval\b"),
    ("llm.eval data", r"-m\s+llm\.eval\s+data\b"),
    ("llm.eval", r"-m\s+llm\.eval\b"),
    ("llm.data.synthetic_genome", r"-m\s+llm\.data\.synthetic_genome\b"),
    ("llm.formats.convert", r"-m\s+llm\.formats\.convert\b"),
    ("scripts/mixers_cpu.py", r"(?<![\w./-])(?:\S*/)?mixers_cpu\.py(?![\w.])"),
    ("scripts/peers_cpu.py", r"(?<![\w./-])(?:\S*/)?peers_cpu\.py(?![\w.])"),
    ("train.py", r"\bbash\s+\S*scripts/\w+\.sh\b"),
]
ENTRY = re.compile("|".join(f"(?P<e{i}>{pattern})" for i, (_, pattern) in enumerate(ENTRY_PATTERNS)))
# Flags of other tools that the docs show (torchrun, lm_eval); commands of pip, lm_eval and git are skipped whole.
EXTERNAL_FLAGS = re.compile(r"nproc_per_node|nnodes|standalone|rdzv_\w*|model_args|tasks|model")
EXTERNAL_COMMANDS = ("pip", "lm_eval", "git")
FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`([^`]+)`")  # may span lines


def flags_in(text: str) -> set[str]:
    """Flag names in text, hyphens read as underscores (the CLIs accept both spellings)."""
    return {name.replace("-", "_") for name in FLAG.findall(text)}


@pytest.fixture(scope="module")
def helps() -> dict[str, set[str]]:
    """Entry point -> the flags its --help shows (each entry point run once, all at the same time)."""
    env = {**os.environ, "COLUMNS": "200"}

    def run(args: list[str]) -> str:
        result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300, check=False)
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stderr[-2000:]}"
        return result.stdout

    with ThreadPoolExecutor(len(HELP_COMMANDS)) as pool:
        texts = dict(zip(HELP_COMMANDS, pool.map(run, HELP_COMMANDS.values())))
    found = {entry: flags_in(text) for entry, text in texts.items()}
    found["llm.bench"] |= found["train.py"]  # the benchmark and the sweep take every train.py flag besides their own
    found["llm.sweep"] |= found["train.py"]
    return found


def code_commands(code: str) -> list[str]:
    """The commands in code: lines with their backslash continuations joined, comments split off as lines of their
    own, and pipelines and chains split."""
    lines = re.sub(r"\\\n", " ", code).splitlines()
    commands = []
    for line in lines:
        command, _, comment = line.partition(" #")
        commands += re.split(r"&&|\|\||;|\s\|\s", command) + [comment]
    return commands


def flag_uses(doc: Path) -> list[tuple[str | None, str, str]]:
    """(entry point or None, flag, where) for every flag in the doc: flags after an entry point on a command line
    belong to it; every other flag (prose, output, other tools) belongs to None."""
    text = doc.read_text()
    prose = FENCE.sub("", text)
    commands = [c for block in FENCE.findall(text) for c in code_commands(block)]
    commands += [c for span in INLINE_CODE.findall(prose) for c in code_commands(" ".join(span.split()))]
    uses = [(None, flag, "prose") for flag in flags_in(INLINE_CODE.sub("", prose))]
    for command in commands:
        words = [w for w in command.split() if not re.fullmatch(r"\w+=\S*|\$", w)]
        if not words or words[0] in EXTERNAL_COMMANDS:
            continue
        match = ENTRY.search(command)
        entry = ENTRY_PATTERNS[int(match.lastgroup[1:])][0] if match else None
        before, after = (command[:match.start()], command[match.end():]) if match else (command, "")
        uses += [(None, flag, command.strip()) for flag in flags_in(before)]
        uses += [(entry, flag, command.strip()) for flag in flags_in(after)]
    return [use for use in uses if not EXTERNAL_FLAGS.fullmatch(use[1])]


def unknown_flags(doc: Path, helps: dict[str, set[str]]) -> list[str]:
    everywhere = set().union(*helps.values())
    return sorted(f"--{flag} ({where}): not in {'the help of ' + entry if entry else 'any entry point help'}"
                  for entry, flag, where in flag_uses(doc) if flag not in (helps[entry] if entry else everywhere))


@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(REPO).as_posix() for d in DOCS])
def test_every_flag_in_the_docs_exists(doc, helps):
    assert unknown_flags(doc, helps) == []


def test_flags_are_checked_against_their_entry_point(helps, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("Use `--max_iters` and `--made_up_flag`, not --made_up_too.\n\n```bash\n"
                   "python sample.py --ckpt out/run --max_iters 3   # --prompt is sample.py's\n"
                   "torchrun --nproc_per_node 2 train.py --dist fsdp\n"
                   "python -m llm.bench --steps 3 --n_layer 2 && python -m llm.report out/run --steps 3\n```\n")
    assert unknown_flags(doc, helps) == [
        "--made_up_flag (--made_up_flag): not in any entry point help",
        "--made_up_too (prose): not in any entry point help",
        "--max_iters (python sample.py --ckpt out/run --max_iters 3): not in the help of sample.py",
        "--steps (python -m llm.report out/run --steps 3): not in the help of llm.report",
    ]


def test_readme_is_short_and_its_test_command_is_the_one_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    commands = [line for block in FENCE.findall(readme) for line in block.splitlines() if "pytest" in line]
    assert commands == [README_TEST_COMMAND]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    ci_tests = [line.strip() for line in ci if "pytest" in line and not line.lstrip().startswith("#")]
    assert ci_tests == [README_TEST_COMMAND.rpartition(" && ")[2]] == ["python -m pytest -q"]
    assert any("torch==2.13.0" in line for line in ci) and any("-e '.[dev]'" in line for line in ci)


@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(REPO).as_posix() for d in DOCS])
def test_relative_links_point_at_files(doc):
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
    missing = [t for t in targets if "://" not in t and not (doc.parent / t).exists()]
    assert missing == []


@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(REPO).as_posix() for d in DOCS])
def test_every_code_fence_is_closed(doc):
    """An unclosed fence turns the rest of the page, headings included, into code."""
    fences = [number for number, line in enumerate(doc.read_text().splitlines(), start=1) if line.startswith("```")]
    assert len(fences) % 2 == 0, f"{doc.name}: the fence opened on line {fences[-1]} is never closed"


# Documented train.py commands that name files outside this repository, which the test cannot have.
OUTSIDE_FILES = {
    "--config configs/moe.yaml": "llm720's own configs/moe.yaml (tests/test_foreign_configs.py converts a copy)",
    "--import mykinds": "the reader's own module (tests/test_model_level.py runs --import with a module of its own)",
}
TRAIN_COMMAND = re.compile(r"(?:^|\s)(?:\S*/)?train\.py(?:\s|$)")


def train_commands(doc: Path) -> list[list[tuple[list[str], str | None]]]:
    """Per code block of the doc, its train.py commands in order: (train.py's arguments, the file its output is
    redirected to, if any); torchrun's own flags and a chain's other commands are left out."""
    blocks = []
    for block in FENCE.findall(doc.read_text()):
        commands = []
        for line in re.sub(r"\\\n", " ", block).splitlines():
            for command in re.split(r"&&|;", line):
                if not TRAIN_COMMAND.search(command) or command.lstrip().startswith(("$", "error")):
                    continue
                words = shlex.split(command, comments=True)
                start = next(i for i, word in enumerate(words) if word.endswith("train.py")) + 1
                argv, out = words[start:], None
                if ">" in argv:
                    out, argv = argv[argv.index(">") + 1], argv[:argv.index(">")]
                commands.append((argv, out))
        if commands:
            blocks.append(commands)
    return blocks


def documented_blocks() -> list:
    return [pytest.param(doc, commands, id=f"{doc.relative_to(REPO).as_posix()}-{i}")
            for doc in DOCS for i, commands in enumerate(train_commands(doc))]


@pytest.mark.parametrize("doc,commands", documented_blocks())
def test_every_documented_train_command_validates(doc, commands, tmp_path, monkeypatch, capsys):
    """Each `python train.py ...` (or torchrun ... train.py ...) of README and docs goes through the real parser and
    validator, in order within its block, in a folder holding the repository's example files."""
    shutil.copy(REPO / "layer_configs.jsonl", tmp_path)
    for folder in ("modded_nanogpt", "modded_nanogpt_23cea17"):
        shutil.copytree(REPO / "tests" / "data" / folder, tmp_path / "tests" / "data" / folder)
    monkeypatch.chdir(tmp_path)
    for argv, out in commands:
        line = " ".join(argv)
        if any(part in line for part in OUTSIDE_FILES):
            continue
        if "--init_from" in argv:  # the directory the block's commands write before it
            write_init_source(argv[argv.index("--init_from") + 1])
        printing = "--print_config" in argv or "--estimate" in argv
        try:
            parse(argv if printing else [*argv, "--estimate"])  # the estimate: the model is built, nothing trains
        except SystemExit as e:  # --print_config and --estimate print and exit 0
            assert e.code == 0, f"{doc.name}: train.py {line} exited with {e.code}"
        except ConfigError as e:
            pytest.fail(f"{doc.name}: python train.py {line}\nerror: {e}")
        else:
            pytest.fail(f"{doc.name}: python train.py {line} returned instead of exiting")
        printed = capsys.readouterr().out
        if out:
            Path(out).write_text(printed)
        assert "--print_config" in argv or "estimate: " in printed, printed


def write_init_source(init_from: str) -> None:
    """What --init_from reads, made as the documented commands before it would: a transformers folder (the config
    of a small Llama) or a run of ours (config.json of the default model)."""
    if init_from.startswith("hf:"):
        from transformers import LlamaConfig

        LlamaConfig(vocab_size=65, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2).save_pretrained(init_from.removeprefix("hf:"))
        return
    from llm.config import config_dict

    model, train = parse(["--vocab_size", "65"])
    folder = Path(init_from) / "checkpoints" / "step_1"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config_dict(model, train)))


def test_the_documented_train_commands_are_found():
    """The extraction sees every command line: continuations, chains, torchrun, redirection, comments."""
    found = [argv for doc in DOCS for block in train_commands(doc) for argv, _ in block]
    assert len(found) >= 25
    assert ["--preset", "gpt2-124m", "--dist", "ddp"] in found  # after torchrun --nproc_per_node 8
    assert any(argv[-2:] == ["--total_batch_size_str", "2**20"] for argv in found)  # continued lines, quotes


# Documented tool commands (not train.py) that the test does not run, each with the reason.
NOT_RUN = {
    "llm.data.prepare tinystories": "downloads the dataset",
    "llm.data.prepare fineweb": "downloads the dataset",
    "--tasks hellaswag,arc_easy": "downloads the tasks (the mini_choice command beside it runs)",
    "llm.bench": "a timed benchmark (tests/test_bench.py runs it at small shapes)",
    "scripts/sweep.sh": "trains six runs (tests/test_scripts.py runs the sweep script at small shapes)",
    "out/sweep/*": "reports the sweep above (tests/test_runs.py runs llm.report)",
    "out/ablation/*": "reports the sweep above (tests/test_scripts.py reports a sweep)",
    "--max_iters 300 --parallel 2": "trains eight runs (tests/test_sweep.py runs sweeps at small shapes)",
    "--file sweep.yaml": "the reader's sweep file (tests/test_sweep.py reads one with the same sections)",
    "--executor slurm": "needs SLURM (tests/test_sweep.py checks the sbatch script submitit would submit)",
    "sweeps/mixers_matched.yaml": "a 13-minute sweep (tests/test_sweep.py plans it and matches its FLOPs)",
    "out/mixers/*": "reports the sweep above",
    "sweeps/record_gpt_cpu.yaml": "a 33-minute sweep (tests/test_record_gpt.py plans it)",
    "out/record_gpt/*": "reports the sweep above",
    "configs/moe.yaml": OUTSIDE_FILES["--config configs/moe.yaml"],
    "--import mykinds": OUTSIDE_FILES["--import mykinds"],
    "out/mtp_char": "samples the multi-token-prediction run of docs/sampling.md (tests/test_mtp.py samples one)",
    "scripts/train_custom_layers.sh": "a training script (tests/test_scripts.py runs it)",
}
TOOL_COMMAND = re.compile(r"^(?:\w+=\S+\s+)*python\s+(?:-m\s+llm\.|sample\.py)")


def tool_commands(doc: Path) -> list[str]:
    """The doc's documented commands of sample.py and the llm.* modules, in order, as written (comments dropped)."""
    found = []
    for block in FENCE.findall(doc.read_text()):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            for command in re.split(r"&&|;", line.partition(" #")[0]):
                command = " ".join(command.split())
                if TOOL_COMMAND.match(command):
                    found.append(command)
    return found


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, char_data) -> Path:
    """A folder holding what the documented commands read: the prepared Tiny Shakespeare, a small character model
    trained to step 500 in out/run and a diffusion one in out/mdlm, the repository's example and test files, FASTA
    files and a small text corpus."""
    root = tmp_path_factory.mktemp("workspace")
    shutil.copytree(char_data, root / "data" / "shakespeare_char")
    shutil.copytree(REPO / "tests" / "data", root / "tests" / "data")
    for name in ("layer_configs.jsonl", "sample.py", "train.py"):  # the docs run from the repository's root
        shutil.copy(REPO / name, root)
    shutil.copy(SHAKESPEARE, root / "input.txt")
    shutil.copy(SHAKESPEARE, root / "genome.txt")
    shutil.copy(REPO / "tests" / "data" / "hellaswag_mini.jsonl", root / "hellaswag_val.jsonl")
    (root / "genomes").mkdir()
    for name in ("genomes/a.fa", "mrna.fa", "test.fa"):
        subprocess.run([sys.executable, "-m", "llm.data.synthetic_genome", "--out", str(root / name), "--megabases",
                        "0.02", "--seed", str(len(name))], check=True, capture_output=True)
    (root / "my_corpus").mkdir()
    lines = SHAKESPEARE.read_text().splitlines()
    (root / "my_corpus" / "a.jsonl").write_text("".join(json.dumps({"content": "\n".join(lines[i:i + 50])}) + "\n"
                                                        for i in range(0, 5000, 50)))
    trained = subprocess.run([sys.executable, str(REPO / "train.py"), "--n_layer", "1", "--n_embd", "32", "--n_head",
                              "2", "--block_size", "128", "--batch_size", "4", "--max_iters", "500", "--ckpt_interval",
                              "500", "--eval_interval", "500", "--eval_iters", "2", "--save_model", "--log_interval",
                              "500"], cwd=root, capture_output=True, text=True, timeout=600, check=False)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (root / "out" / "run" / "checkpoints" / "step_0000500").is_dir()
    diffusion = subprocess.run([sys.executable, str(REPO / "train.py"), "--objective", "mdlm", "--n_layer", "1",
                                "--n_embd", "32", "--n_head", "2", "--block_size", "64", "--batch_size", "4",
                                "--max_iters", "20", "--eval_interval", "20", "--eval_iters", "2",
                                "--wandb_run_name", "mdlm"], cwd=root, capture_output=True, text=True, timeout=600,
                               check=False)
    assert diffusion.returncode == 0, diffusion.stderr[-2000:]
    return root


def documented_tool_docs() -> list:
    return [pytest.param(doc, id=doc.relative_to(REPO).as_posix()) for doc in DOCS if tool_commands(doc)]


@pytest.mark.parametrize("doc", documented_tool_docs())
def test_every_documented_tool_command_runs(doc, workspace, tmp_path):
    """Each documented `python sample.py ...` and `python -m llm.* ...` runs as written, in order within its page, in
    a copy of the workspace (as a shell runs it: globs and environment prefixes included)."""
    here = tmp_path / "here"
    shutil.copytree(workspace, here, symlinks=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in tool_commands(doc):
        if any(part in command for part in NOT_RUN):
            continue
        result = subprocess.run(["bash", "-c", command], cwd=here, env=env, capture_output=True, text=True,
                                timeout=600, check=False)
        assert result.returncode == 0, f"{doc.name}: {command}\n{result.stderr[-2000:]}"


def test_the_documented_tool_commands_are_found():
    found = [command for doc in DOCS for command in tool_commands(doc)]
    assert "python -m llm.export --ckpt out/run --out hf/run --overwrite" in found
    assert any(c.startswith("python sample.py --ckpt out/run/checkpoints/step_0000500") for c in found)
    assert all(any(part in c for c in found) for part in NOT_RUN if part != "scripts/sweep.sh"
               and not part.startswith("scripts/")), "a NOT_RUN entry matches no documented command any more"

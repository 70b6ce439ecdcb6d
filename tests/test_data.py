"""Tokenizers, dataset preparation from local files (no network) and the loader; damaged inputs are one-line
errors that name the file."""
import io
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import tiktoken
import torch

from llm.config import ConfigError, exit_on_user_error
from llm.data import prepare as prepare_module
from llm.data import sources
from llm.data.loader import TokenLoader, read_meta
from llm.data.prepare import PrepareArgs, prepare
from llm.data.tokenizers import ByteTokenizer, tokenizer_from_meta
from tests.conftest import REPO, SHAKESPEARE

CPU = torch.device("cpu")


def read(out, split: str, meta: dict) -> np.ndarray:
    return np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])


def prepared(out) -> tuple[dict, np.ndarray, np.ndarray]:
    meta = json.loads((out / "meta.json").read_text())
    return meta, read(out, "train", meta), read(out, "val", meta)


def test_char_shakespeare_round_trips_and_splits_90_10(char_data):
    meta, train, val = prepared(char_data)
    text = SHAKESPEARE.read_text()
    assert meta["vocab_size"] == 65 and meta["eot"] is None and meta["dtype"] == "uint16"
    assert len(train) == meta["train_tokens"] == int(len(text) * 0.9) + 1 and len(train) + len(val) == len(text)
    tokenizer = tokenizer_from_meta(meta)
    assert tokenizer.decode(train.tolist()) + tokenizer.decode(val.tolist()) == text
    assert meta["max_token_id"] == 64 and meta["source_md5"] == "6fb458f1232090904fb40fe944165e91"


def test_gpt2_shakespeare_equals_encoding_the_whole_file(tmp_path):
    out = prepare(PrepareArgs("shakespeare", source=str(SHAKESPEARE), out=str(tmp_path / "s"), workers=2))
    meta, train, val = prepared(out)
    text = SHAKESPEARE.read_text()
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["eot"] == 50256
    # the 1.1 MB file is read in two parts; cutting at a line start keeps the tokens of the whole text
    assert np.concatenate([train, val]).tolist() == tiktoken.get_encoding("r50k_base").encode_ordinary(text)
    assert tokenizer_from_meta(meta).decode(np.concatenate([train, val]).tolist()) == text


def test_txt_parts_keep_gpt2_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_CHARS", 50)
    lines = ["First line of text.\n", "  indented line\n", "\n", "\n", "Another line\n", "'s contraction\n"] * 20
    path = tmp_path / "a.txt"
    path.write_text("".join(lines) + "no final newline")
    pieces = list(sources.txt_pieces(path))
    assert len(pieces) > 5 and [p.new_document for p in pieces] == [True] + [False] * (len(pieces) - 1)
    encoding = tiktoken.get_encoding("r50k_base")
    assert sum((encoding.encode_ordinary(p.text) for p in pieces), []) == encoding.encode_ordinary(path.read_text())


def write_corpus(folder):
    """Three documents in three formats; returns the texts in reading order (sorted file names)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"body": "héllo wörld", "id": 1}) + "\n\n" +
                                    json.dumps({"body": "second document\nwith two lines"}) + "\n")
    pq.write_table(pa.table({"body": ["from parquet ✓", "and another"]}), folder / "b.parquet")
    (folder / "c.txt").write_text("plain text file\r\nwith CRLF\r\n")
    return ["héllo wörld", "second document\nwith two lines", "from parquet ✓", "and another",
            "plain text file\r\nwith CRLF\r\n"]


@pytest.mark.parametrize("tokenizer", ["gpt2", "char", "byte"])
def test_folder_of_jsonl_parquet_txt_separates_documents(tmp_path, tokenizer):
    docs = write_corpus(tmp_path / "corpus")
    out = prepare(PrepareArgs("text", tokenizer=tokenizer, source=str(tmp_path / "corpus"), out=str(tmp_path / "o"),
                              text_field="body", val_fraction=0.2, workers=1))
    meta, train, val = prepared(out)
    ids = np.concatenate([train, val]).tolist()
    eot = meta["eot"]  # byte: 0, which none of these texts contains
    assert ids.count(eot) == len(docs) - 1
    documents, current = [], []
    for i in ids + [eot]:
        if i == eot:
            documents.append(current)
            current = []
        else:
            current.append(i)
    assert [tokenizer_from_meta(meta).decode(d) for d in documents] == docs
    assert len(val) == int(len(ids) * 0.2) and meta["train_tokens"] + meta["val_tokens"] == len(ids)


def test_byte_tokenizer_upper_cases_dna(tmp_path):
    (tmp_path / "dna.txt").write_text("acgtNNacgtACGT\n")
    out = prepare(PrepareArgs("text", tokenizer="byte", upper=True, source=str(tmp_path / "dna.txt"),
                              out=str(tmp_path / "o"), workers=1))
    meta, train, val = prepared(out)
    assert meta["vocab_size"] == 256 and meta["dtype"] == "uint16" and meta["upper"]
    assert ByteTokenizer().decode(np.concatenate([train, val]).tolist()) == "ACGTNNACGTACGT\n"
    assert ByteTokenizer().decode(list("tökens".encode())) == "tökens"


def test_vocabulary_over_65536_uses_uint32(tmp_path):
    text = "".join(chr(0x10000 + i) for i in range(70_000))
    (tmp_path / "wide.txt").write_text(text)
    out = prepare(PrepareArgs("text", tokenizer="char", source=str(tmp_path / "wide.txt"), out=str(tmp_path / "o"),
                              workers=1))
    meta, train, val = prepared(out)
    assert meta["vocab_size"] == 70_000 and meta["dtype"] == "uint32" and meta["max_token_id"] == 69_999
    tokenizer = tokenizer_from_meta(meta)
    assert tokenizer.decode(train.tolist()) + tokenizer.decode(val.tolist()) == text


def test_workers_give_the_same_files_as_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 10_000)  # many batches in flight
    outputs = []
    for workers in (1, 3):
        out = prepare(PrepareArgs("shakespeare", source=str(SHAKESPEARE), out=str(tmp_path / f"w{workers}"),
                                  workers=workers))
        outputs.append([(out / f).read_bytes() for f in ("train.bin", "val.bin")])
    assert outputs[0] == outputs[1]


def test_second_run_is_skipped_unless_forced_or_changed(tmp_path, capsys):
    source = tmp_path / "t.txt"
    source.write_text("some text to tokenize\n" * 50)
    args = PrepareArgs("text", source=str(source), out=str(tmp_path / "o"), workers=1)
    prepare(args)
    first = (tmp_path / "o" / "train.bin").stat().st_mtime_ns
    capsys.readouterr()
    prepare(args)
    assert "already holds this dataset" in capsys.readouterr().out
    assert (tmp_path / "o" / "train.bin").stat().st_mtime_ns == first
    prepare(PrepareArgs("text", source=str(source), out=str(tmp_path / "o"), workers=1, val_fraction=0.2))
    assert "wrote" in capsys.readouterr().out
    prepare(PrepareArgs("text", source=str(source), out=str(tmp_path / "o"), workers=1, val_fraction=0.2, force=True))
    assert "wrote" in capsys.readouterr().out


def test_max_tokens_caps_the_train_split(tmp_path):
    (tmp_path / "t.txt").write_text("word " * 1000)
    out = prepare(PrepareArgs("text", source=str(tmp_path / "t.txt"), out=str(tmp_path / "o"), workers=1,
                              max_tokens=300))
    meta, train, val = prepared(out)
    assert len(train) + len(val) == 300


def fake_datasets(splits: dict[str, list[str]], calls: list):
    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return [{"text": t} for t in splits[split]]
    return types.SimpleNamespace(load_dataset=load_dataset)


def test_named_hf_datasets_use_their_own_splits(tmp_path, monkeypatch):
    calls = []
    rows = {"train": [" = Alpha = \n", " text a\n", " = = Section = = \n", " more a\n", " = Beta = \n", " text b\n"],
            "validation": [" = Gamma = \n", " text c\n"]}
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(rows, calls))
    out = prepare(PrepareArgs("wikitext", tokenizer="char", out=str(tmp_path / "w"), workers=1))
    meta, train, val = prepared(out)
    tokenizer = tokenizer_from_meta(meta)
    assert tokenizer.decode(train.tolist()) == "".join(rows["train"][:4]) + "<|endoftext|>" + "".join(rows["train"][4:])
    assert tokenizer.decode(val.tolist()) == "".join(rows["validation"])
    assert calls[-2:] == [("Salesforce/wikitext", "wikitext-103-raw-v1", "train", False),
                          ("Salesforce/wikitext", "wikitext-103-raw-v1", "validation", False)]
    assert meta["source"] == "hf:Salesforce/wikitext/wikitext-103-raw-v1"

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets({"train": ["doc one", "doc two", "doc three"]}, calls))
    out = prepare(PrepareArgs("fineweb", out=str(tmp_path / "f"), workers=1, val_fraction=0.25))
    assert calls[-1] == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)
    meta, train, val = prepared(out)
    assert tokenizer_from_meta(meta).decode(train.tolist() + val.tolist()) == \
        "doc one<|endoftext|>doc two<|endoftext|>doc three"


BAD_PREPARATIONS = [
    (["text"], "dataset text needs --source PATH"),
    (["text", "--source", "missing_dir"], "no such file or folder"),
    (["shakespeare", "--source", "missing.txt"], "--source='missing.txt': no such file or folder"),
    (["shakespeare", "--upper"], "--upper applies to the byte tokenizer only"),
    (["shakespeare", "--val_fraction", "1.5"], "--val_fraction=1.5 must be in (0, 1)"),
    (["shakespeare", "--encoding", "base64"], "--encoding='base64' is not a text encoding Python knows"),
]


@pytest.mark.parametrize("argv,message", BAD_PREPARATIONS, ids=[m for _, m in BAD_PREPARATIONS])
def test_bad_preparation_is_one_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        prepare_module.main(argv + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def parquet_bytes(**columns) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue()


NOT_UTF8 = ("is not valid utf-8; pass --encoding NAME (e.g. latin-1) if the file uses another encoding, "
            "or --errors replace")
# (case, files of the source folder, --source inside it ("": the folder), extra flags, what the one line says)
DAMAGED_SOURCES = [
    ("txt not utf-8", {"a.txt": b"hello\nwor\xffld\n"}, "a.txt", [], f"a.txt: byte 9 (0xff) {NOT_UTF8}"),
    ("txt not utf-8, char tokenizer", {"a.txt": b"hello\nwor\xffld\n"}, "a.txt", ["--tokenizer", "char"],
     f"a.txt: byte 9 (0xff) {NOT_UTF8}"),
    ("second file of a folder not utf-8", {"a.txt": b"fine text\n", "b.txt": b"x" * 3000 + b"\xc3("}, "b.txt", [],
     f"b.txt: byte 3000 (0xc3) {NOT_UTF8}"),
    ("txt not in the --encoding given", {"a.txt": "café".encode()}, "a.txt", ["--encoding", "ascii"],
     "a.txt: byte 3 (0xc3) is not valid ascii; pass --encoding NAME"),
    ("jsonl not utf-8", {"d.jsonl": b'{"text": "ok"}\n{"text": "\xe9t\xe9"}\n'}, "d.jsonl", [],
     f"d.jsonl: byte 25 (0xe9) {NOT_UTF8}"),
    ("jsonl line not JSON", {"d.jsonl": b'{"text": "ok"}\n{"text": \n'}, "d.jsonl", [],
     "d.jsonl line 2: not valid JSON (Expecting value)"),
    ("jsonl record without the text field", {"d.jsonl": b'{"text": "ok"}\n{"content": "x"}\n'}, "d.jsonl", [],
     "d.jsonl line 2: no text field 'text' (keys: ['content']); choose it with --text_field"),
    ("jsonl record not an object", {"d.jsonl": b'{"text": "ok"}\n["x"]\n'}, "d.jsonl", [],
     "d.jsonl line 2: a JSON list, not an object with a text field 'text' (--text_field)"),
    ("jsonl text not a string", {"d.jsonl": b'{"text": 3}\n'}, "d.jsonl", [],
     "d.jsonl line 1: text field 'text' is a int, not a string; choose another with --text_field"),
    ("parquet damaged", {"p.parquet": b"not parquet"}, "p.parquet", [], "p.parquet: not a readable Parquet file"),
    ("parquet without the text column", {"p.parquet": parquet_bytes(body=["x"])}, "p.parquet", [],
     "p.parquet: no column 'text' (columns: ['body']); choose it with --text_field"),
    ("parquet text column not strings", {"p.parquet": parquet_bytes(text=[1, 2])}, "p.parquet", [],
     "p.parquet: column 'text' holds int64, not strings"),
    ("txt empty", {"a.txt": b""}, "a.txt", [], "a.txt: the corpus has only 0 tokens"),
    ("folder without a usable file", {"notes.md": b"x", "data.csv": b"a,b"}, "", [],
     "the folder holds no .txt, .jsonl or .parquet file (2 files of other types)"),
    ("file of another type", {"notes.md": b"x"}, "notes.md", [], ".md is not read; give a .txt, .jsonl or .parquet"),
    ("source missing", {}, "missing.txt", [], "missing.txt': no such file or folder"),
]


@pytest.mark.parametrize("case,files,source,flags,message", DAMAGED_SOURCES, ids=[c[0] for c in DAMAGED_SOURCES])
def test_damaged_source_is_one_line_naming_the_file(case, files, source, flags, message, tmp_path, capsys):
    folder = tmp_path / "src"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    src = folder / source
    with pytest.raises(SystemExit) as exit_info:
        prepare_module.main(["text", "--source", str(src), "--out", str(tmp_path / "o"), "--workers", "1", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and str(src) in err, err
    assert not (tmp_path / "o").exists()  # no partial file, and no folder this run created


def test_prepare_command_on_undecodable_text_exits_2_with_one_line_and_no_tmp_file(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("fine text\n" * 100)
    (tmp_path / "src" / "b.txt").write_bytes(b"more text\n" * 100 + b"caf\xe9\n")
    command = [sys.executable, "-m", "llm.data.prepare", "text", "--source", str(tmp_path / "src"), "--out",
               str(tmp_path / "o"), "--workers", "2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {tmp_path / 'src' / 'b.txt'}: byte 1003 (0xe9) {NOT_UTF8}")
    assert not (tmp_path / "o").exists()


def test_an_interrupted_preparation_removes_its_files_and_keeps_the_old_dataset(tmp_path, monkeypatch, capsys):
    (tmp_path / "t.txt").write_text("some text to tokenize\n" * 50)
    argv = ["text", "--source", str(tmp_path / "t.txt"), "--workers", "1"]
    old = prepare(PrepareArgs("text", source=str(tmp_path / "t.txt"), out=str(tmp_path / "old"), workers=1))
    before = {path.name: path.read_bytes() for path in old.iterdir()}

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "split_tail", interrupt)  # train.bin.tmp is written by then
    for out in (tmp_path / "new", old):
        with pytest.raises(SystemExit) as exit_info:
            prepare_module.main(argv + ["--out", str(out), "--force"])
        assert exit_info.value.code == 130 and capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "new").exists()
    assert {path.name: path.read_bytes() for path in old.iterdir()} == before


@pytest.mark.parametrize("flags,text", [(["--encoding", "latin-1"], "café\n"), (["--errors", "replace"], "caf\ufffd\n"),
                                        (["--errors", "ignore"], "caf\n")])
def test_encoding_and_errors_read_text_that_is_not_utf8(tmp_path, flags, text):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9\n" * 20)
    prepare_module.main(["text", "--tokenizer", "char", "--source", str(tmp_path / "a.txt"), "--out",
                         str(tmp_path / "o"), "--workers", "1", *flags])
    meta, train, val = prepared(tmp_path / "o")
    assert tokenizer_from_meta(meta).decode(np.concatenate([train, val]).tolist()) == text * 20


def test_a_folder_with_files_of_other_types_says_what_it_skipped(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("text to read\n" * 20)
    for name in ("LICENSE", "b.md", "c.md", "d.csv"):
        (src / name).write_text("not read")
    prepare(PrepareArgs("text", source=str(src), out=str(tmp_path / "o"), workers=1))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: --source={str(src)!r}: skipped 4 files that are not .txt, .jsonl or .parquet "
                     "(2 .md, 1 without extension, 1 .csv)"]


def small_dataset(folder):
    """A prepared char dataset of 100 uint16 tokens, written by hand."""
    folder.mkdir()
    meta = {"tokenizer": "char", "vocab_size": 5, "eot": None, "chars": list("abcde"), "dtype": "uint16",
            "train_tokens": 100, "val_tokens": 100}
    (folder / "meta.json").write_text(json.dumps(meta))
    for split in ("train", "val"):
        (np.arange(100) % 5).astype(np.uint16).tofile(folder / f"{split}.bin")
    return folder


def open_dataset(folder) -> TokenLoader:
    """What training does with a dataset folder: read meta.json, then open train.bin with its dtype."""
    meta = read_meta(folder, folder.name)
    return TokenLoader(folder / "train.bin", meta["dtype"], 2, 8, CPU, seed=0)


def write(path, data: str | bytes):
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def edit_meta(folder, **changes):
    """Rewrites meta.json with keys changed (None: removed)."""
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    return write(folder / "meta.json", json.dumps({k: v for k, v in meta.items() if v is not None}))


# (case, how to damage the folder (returns the file it damaged), what the one line says)
DAMAGED_DATASETS = [
    ("meta.json not JSON", lambda d: write(d / "meta.json", '{"vocab'),
     "meta.json is not valid JSON (Unterminated string"),
    ("meta.json empty", lambda d: write(d / "meta.json", ""), "meta.json is empty"),
    ("meta.json binary", lambda d: write(d / "meta.json", b"\x00\xff\xfe"), "meta.json is not valid JSON"),
    ("meta.json not an object", lambda d: write(d / "meta.json", "[1, 2]"), "holds a JSON list, not an object"),
    ("meta.json without keys", lambda d: edit_meta(d, tokenizer=None, vocab_size=None), "lacks tokenizer, vocab_size"),
    ("char meta.json without chars", lambda d: edit_meta(d, chars=None), "meta.json lacks chars"),
    ("meta.json value of the wrong type", lambda d: edit_meta(d, vocab_size="5"), "vocab_size is a str, not int"),
    ("dtype not uint16 or uint32", lambda d: edit_meta(d, dtype="float32"), "dtype='float32' is not uint16 or uint32"),
    ("train.bin of odd length", lambda d: write(d / "train.bin", (d / "train.bin").read_bytes()[:199]),
     "train.bin: 199 bytes is not a whole number of uint16 tokens (2 bytes each)"),
    ("train.bin missing", lambda d: (d / "train.bin").unlink() or d / "train.bin", "train.bin not found"),
]


@pytest.mark.parametrize("case,damage,message", DAMAGED_DATASETS, ids=[c[0] for c in DAMAGED_DATASETS])
def test_damaged_dataset_is_one_line_naming_the_file_and_the_fix(case, damage, message, tmp_path, capsys):
    folder = small_dataset(tmp_path / "mine")
    open_dataset(folder)  # intact, it opens
    damaged = damage(folder)
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        open_dataset(folder)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err and str(damaged) in err, err
    assert f"`python -m llm.data.prepare text --source PATH_TO_YOUR_FILES --out {folder} --force`" in err


def test_random_windows_are_shifted_by_one(char_data):
    loader = TokenLoader(char_data / "train.bin", "uint16", 4, 16, CPU, seed=0)
    data = np.fromfile(char_data / "train.bin", dtype=np.uint16)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    windows = np.lib.stride_tricks.sliding_window_view(data, 17)
    for row_x, row_y in zip(x, y):
        full = np.concatenate([row_x.numpy(), row_y[-1:].numpy()])
        assert np.all(windows == full, axis=1).any()


def token_file(tmp_path, n: int):
    path = tmp_path / "tokens.bin"
    np.arange(n, dtype=np.uint32).tofile(path)
    return path


def test_epoch_order_visits_every_window_once(tmp_path):
    path = token_file(tmp_path, 8 * 23 + 1)  # 23 windows of 8 tokens (+1 for the shifted target)
    loader = TokenLoader(path, "uint32", 5, 8, CPU, seed=3, order="epoch")
    starts = []
    for _ in range(23):  # 115 windows: exactly five epochs
        x, y = loader.next_batch()
        assert torch.equal(y, x + 1)
        starts += (x[:, 0] // 8).tolist()
    epochs = [starts[i * 23:(i + 1) * 23] for i in range(5)]
    assert all(sorted(epoch) == list(range(23)) for epoch in epochs)
    assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_ranks_split_each_epoch(tmp_path):
    path = token_file(tmp_path, 4 * 20 + 1)
    seen = []
    for rank in range(2):
        loader = TokenLoader(path, "uint32", 5, 4, CPU, seed=0, order="epoch", rank=rank, world_size=2)
        seen.append([w for _ in range(2) for w in (loader.next_batch()[0][:, 0] // 4).tolist()])
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(20))
    for order in ("random", "epoch"):  # two ranks together see what one process with their global batch sees
        one = TokenLoader(path, "uint32", 8, 4, CPU, seed=0, order=order).next_batch()[0]
        halves = [TokenLoader(path, "uint32", 4, 4, CPU, seed=0, order=order, rank=r, world_size=2).next_batch()[0]
                  for r in range(2)]
        assert torch.equal(torch.cat(halves), one) and not torch.equal(halves[0], halves[1])


@pytest.mark.parametrize("order", ["random", "epoch"])
def test_loader_state_round_trips(tmp_path, order):
    path = token_file(tmp_path, 1000)
    loader = TokenLoader(path, "uint32", 3, 16, CPU, seed=1, order=order)
    for _ in range(7):
        loader.next_batch()
    state = loader.state_dict()
    saved = tmp_path / "state.pt"
    torch.save(state, saved)
    expected = [loader.next_batch()[0] for _ in range(10)]
    resumed = TokenLoader(path, "uint32", 3, 16, CPU, seed=1, order=order)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    assert all(torch.equal(a, resumed.next_batch()[0]) for a in expected)


def test_loader_refuses_a_state_of_the_other_order(tmp_path):
    path = token_file(tmp_path, 100)
    state = TokenLoader(path, "uint32", 2, 8, CPU, seed=0, order="epoch").state_dict()
    with pytest.raises(ConfigError, match="--data_order epoch"):
        TokenLoader(path, "uint32", 2, 8, CPU, seed=0).load_state_dict(state)


def test_gpt2_tokenizer_without_its_ranks_is_a_clear_error(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(ConfigError, match="set TIKTOKEN_CACHE_DIR to a tiktoken cache holding r50k_base"):
        tokenizer_from_meta({"tokenizer": "gpt2"})

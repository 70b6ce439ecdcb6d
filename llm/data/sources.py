"""Where a dataset's text comes from: local .txt/.jsonl/.parquet files, the text shipped with the package, or
Hugging Face `datasets`.

Every source yields `Piece`s: a document, or the next part of one (large .txt files are read in bounded parts
cut at line starts, so no file is ever held in memory whole).
"""
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from ..config import ConfigError

# Tiny Shakespeare (public domain, 1,115,394 characters), shipped with the package so the first run needs no network.
SHAKESPEARE_TEXT = Path(__file__).with_name("tinyshakespeare.txt")
SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
SUFFIXES = (".txt", ".jsonl", ".parquet")
PIECE_CHARS = 1 << 20  # a .txt file is read in parts of about this many characters


class Piece(NamedTuple):
    """Text, and whether it starts a new document (documents are separated by the end-of-text token)."""

    text: str
    new_document: bool


@dataclass
class HFDataset:
    """A dataset on the Hugging Face hub: id, configuration, text column and splits."""

    path: str
    name: str | None
    field: str
    train_split: str
    val_split: str | None  # None: hold out the tail of the train split
    streaming: bool = False
    group: Callable[[Iterator[str]], Iterator[str]] | None = None  # rows -> documents


def wikitext_articles(rows: Iterator[str]) -> Iterator[str]:
    """WikiText rows are lines; a top-level heading line (' = Title = ') starts a new article."""
    article: list[str] = []
    for row in rows:
        heading = row.startswith(" = ") and not row.startswith(" = = ") and row.rstrip().endswith(" =")
        if heading and article:
            yield "".join(article)
            article = []
        article.append(row)
    if article:
        yield "".join(article)


HF_DATASETS = {
    "tinystories": HFDataset("roneneldan/TinyStories", None, "text", "train", "validation"),
    "fineweb": HFDataset("HuggingFaceFW/fineweb-edu", "sample-10BT", "text", "train", None, streaming=True),
    "wikitext": HFDataset("Salesforce/wikitext", "wikitext-103-raw-v1", "text", "train", "validation",
                          group=wikitext_articles),
}


@dataclass
class Corpus:
    """A dataset's documents: a train stream and, when the dataset has its own, a validation stream.

    Streams are functions so that they can be read twice (the char tokenizer first collects its alphabet).
    """

    source: str
    train: Callable[[], Iterator[Piece]]
    val: Callable[[], Iterator[Piece]] | None = None
    size_bytes: int | None = None  # input size for the progress bar, when known
    stamp: dict = field(default_factory=dict)  # identifies the inputs, to skip a repeated preparation


def local_files(source: str) -> list[Path]:
    """The .txt/.jsonl/.parquet files of a file or folder (recursively, sorted)."""
    path = Path(source)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    else:
        raise ConfigError(f"--source={source!r}: no such file or folder; pass a local path (or a Hugging Face id for "
                          "tinystories, fineweb, wikitext)")
    unknown = [p for p in files if p.suffix not in SUFFIXES]
    if unknown or not files:
        raise ConfigError(f"--source={source!r}: {'no files' if not files else repr(str(unknown[0]))}; "
                          f"give .txt, .jsonl or .parquet files")
    return files


def txt_pieces(path: Path) -> Iterator[Piece]:
    """A .txt file as one document, in parts of about PIECE_CHARS characters. A part ends after a line whose
    newline follows a non-space character and before a line that starts with one: GPT-2's pre-tokenizer splits
    there anyway, so the tokens equal those of the whole file."""
    part: list[str] = []
    size, first = 0, True
    with open(path, encoding="utf-8", newline="") as f:  # newlines kept as written
        for line in f:
            previous = part[-1] if part else ""
            if size >= PIECE_CHARS and line[:1].strip() and len(previous) > 1 and not previous[-2].isspace():
                yield Piece("".join(part), first)
                part, size, first = [], 0, False
            part.append(line)
            size += len(line)
    if part or first:
        yield Piece("".join(part), first)


def jsonl_pieces(path: Path, text_field: str) -> Iterator[Piece]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                keys = sorted(record) if isinstance(record, dict) else []
                raise ConfigError(f"{path} line {number}: no text field {text_field!r} (keys: {keys}); "
                                  "choose it with --text_field")
            yield Piece(record[text_field], True)


def parquet_pieces(path: Path, text_field: str) -> Iterator[Piece]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading .parquet needs pyarrow; pip install 'llm[data]'") from None
    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise ConfigError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names}); "
                          "choose it with --text_field")
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield Piece(text or "", True)


def file_pieces(files: list[Path], text_field: str) -> Iterator[Piece]:
    for path in files:
        if path.suffix == ".txt":
            yield from txt_pieces(path)
        elif path.suffix == ".jsonl":
            yield from jsonl_pieces(path, text_field)
        else:
            yield from parquet_pieces(path, text_field)


def local_corpus(source: str, text_field: str) -> Corpus:
    files = local_files(source)
    stamp = {"files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
             "text_field": text_field}
    return Corpus(source, lambda: file_pieces(files, text_field), size_bytes=sum(p.stat().st_size for p in files),
                  stamp=stamp)


def shakespeare_corpus() -> Corpus:
    """Tiny Shakespeare from the copy shipped with the package, checked against its known checksum."""
    data = SHAKESPEARE_TEXT.read_bytes() if SHAKESPEARE_TEXT.is_file() else b""
    if hashlib.md5(data).hexdigest() != SHAKESPEARE_MD5:
        raise ConfigError(f"{SHAKESPEARE_TEXT} is missing or damaged; reinstall llm or pass --source PATH to a copy "
                          "of Tiny Shakespeare")
    text = data.decode("utf-8")
    return Corpus(str(SHAKESPEARE_TEXT), lambda: iter([Piece(text, True)]), size_bytes=len(data),
                  stamp={"md5": SHAKESPEARE_MD5})


def hf_corpus(spec: HFDataset, hf_id: str | None, text_field: str | None) -> Corpus:
    """A Hugging Face dataset through `datasets` (imported only here)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"downloading {spec.path} needs the datasets package: pip install 'llm[data]'; "
                          "or pass --source PATH to local .txt/.jsonl/.parquet files") from None
    path, column = hf_id or spec.path, text_field or spec.field

    def split(name: str) -> Callable[[], Iterator[Piece]]:
        def pieces() -> Iterator[Piece]:
            try:
                rows = datasets.load_dataset(path, spec.name, split=name, streaming=spec.streaming)
            except Exception as e:  # network, authentication or a wrong id: all end here
                raise ConfigError(f"could not load {path} ({spec.name}, split {name}): {e}; "
                                  "pass --source PATH to local files") from None
            texts = (row[column] for row in rows)
            for text in spec.group(texts) if spec.group else texts:
                yield Piece(text, True)
        return pieces

    stamp = {"hf": path, "config": spec.name, "field": column}
    return Corpus(f"hf:{path}" + (f"/{spec.name}" if spec.name else ""), split(spec.train_split),
                  split(spec.val_split) if spec.val_split else None, stamp=stamp)

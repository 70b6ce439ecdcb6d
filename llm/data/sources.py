"""Where a dataset's text comes from: local .txt/.jsonl/.parquet files, the text shipped with the package, or
Hugging Face `datasets`.

Every source yields `Piece`s: a document, or the next part of one (large .txt files are read in bounded parts
cut at line starts, so no file is ever held in memory whole).
"""
import codecs
import hashlib
import json
from collections import Counter
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
    """The .txt/.jsonl/.parquet files of a file or folder (recursively, sorted). Files of other types in a folder
    are skipped with a one-line notice; a folder without any usable file, or a file of another type, is refused."""
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise ConfigError(f"--source={source!r}: {path.suffix or 'a file without extension'} is not read; "
                              "give a .txt, .jsonl or .parquet file or a folder of them")
        return [path]
    if not path.is_dir():
        raise ConfigError(f"--source={source!r}: no such file or folder; pass a local path (or a Hugging Face id for "
                          "tinystories, fineweb, wikitext)")
    found = sorted(p for p in path.rglob("*") if p.is_file())
    files = [p for p in found if p.suffix.lower() in SUFFIXES]
    skipped = Counter(p.suffix.lower() or "without extension" for p in found if p.suffix.lower() not in SUFFIXES)
    if not files:
        raise ConfigError(f"--source={source!r}: the folder holds no .txt, .jsonl or .parquet file "
                          f"({len(found)} files of other types); give a folder of such files")
    if skipped:
        kinds = ", ".join(f"{count} {suffix}" for suffix, count in skipped.most_common())
        print(f"note: --source={source!r}: skipped {skipped.total()} files that are not .txt, .jsonl or .parquet "
              f"({kinds})")
    return files


def txt_pieces(path: Path, encoding: str = "utf-8", errors: str = "strict") -> Iterator[Piece]:
    """A .txt file as one document, in parts of about PIECE_CHARS characters. A part ends after a line whose
    newline follows a non-space character and before a line that starts with one: GPT-2's pre-tokenizer splits
    there anyway, so the tokens equal those of the whole file."""
    part: list[str] = []
    size, first = 0, True
    with open(path, encoding=encoding, errors=errors, newline="") as f:  # newlines kept as written
        for line in f:
            previous = part[-1] if part else ""
            if size >= PIECE_CHARS and line[:1].strip() and len(previous) > 1 and not previous[-2].isspace():
                yield Piece("".join(part), first)
                part, size, first = [], 0, False
            part.append(line)
            size += len(line)
    if part or first:
        yield Piece("".join(part), first)


def jsonl_pieces(path: Path, text_field: str, encoding: str = "utf-8", errors: str = "strict") -> Iterator[Piece]:
    """One document per record of a .jsonl file: its `text_field` string; blank lines are skipped."""
    with open(path, encoding=encoding, errors=errors) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path} line {number}: a JSON {type(record).__name__}, not an object with a text "
                                  f"field {text_field!r} (--text_field)")
            if text_field not in record:
                raise ConfigError(f"{path} line {number}: no text field {text_field!r} (keys: {sorted(record)}); "
                                  "choose it with --text_field")
            text = record[text_field]
            if not isinstance(text, str):
                raise ConfigError(f"{path} line {number}: text field {text_field!r} is a {type(text).__name__}, not a "
                                  "string; choose another with --text_field")
            yield Piece(text, True)


def parquet_pieces(path: Path, text_field: str) -> Iterator[Piece]:
    """One document per row of a .parquet file's `text_field` string column (a null row is an empty document)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading .parquet needs pyarrow; pip install 'llm[data]'") from None
    try:
        table = pq.ParquetFile(path)
        schema = table.schema_arrow
        if text_field not in schema.names:
            raise ConfigError(f"{path}: no column {text_field!r} (columns: {schema.names}); "
                              "choose it with --text_field")
        column_type = schema.field(text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise ConfigError(f"{path}: column {text_field!r} holds {column_type}, not strings; choose another with "
                              "--text_field")
        for batch in table.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                yield Piece(text or "", True)
    except pa.ArrowException as e:
        raise ConfigError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())})") from None


def first_undecodable_byte(path: Path, encoding: str) -> int | None:
    """The offset of the first byte of `path` that `encoding` cannot decode, reading the file in parts."""
    decoder = codecs.getincrementaldecoder(encoding)()
    offset = 0  # bytes read so far; the decoder may still hold the last few of them
    with open(path, "rb") as f:
        while True:
            part = f.read(PIECE_CHARS)
            held = len(decoder.getstate()[0])
            try:
                decoder.decode(part, final=not part)
            except UnicodeDecodeError as e:  # e.start counts from the first byte the decoder held
                return offset - held + e.start
            if not part:
                return None
            offset += len(part)


def file_pieces(files: list[Path], text_field: str, encoding: str, errors: str) -> Iterator[Piece]:
    """The documents of local files, in order; undecodable text is a one-line error naming the file and offset."""
    for path in files:
        try:
            if path.suffix.lower() == ".txt":
                yield from txt_pieces(path, encoding, errors)
            elif path.suffix.lower() == ".jsonl":
                yield from jsonl_pieces(path, text_field, encoding, errors)
            else:
                yield from parquet_pieces(path, text_field)
        except UnicodeDecodeError as e:
            offset = first_undecodable_byte(path, encoding)
            raise ConfigError(f"{path}: byte {offset} (0x{e.object[e.start]:02x}) is not valid {encoding}; pass "
                              "--encoding NAME (e.g. latin-1) if the file uses another encoding, or --errors replace "
                              "to substitute U+FFFD (--errors ignore drops such bytes)") from None


def local_corpus(source: str, text_field: str, encoding: str, errors: str) -> Corpus:
    """The documents of a local file or folder; .txt and .jsonl files are decoded with `encoding` and `errors`."""
    files = local_files(source)
    stamp = {"files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
             "text_field": text_field}
    return Corpus(source, lambda: file_pieces(files, text_field, encoding, errors),
                  size_bytes=sum(p.stat().st_size for p in files), stamp=stamp)


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

"""Genomic sequence files as a Corpus: FASTA and FASTQ (plain or gzip), JSONL records (plain or gzip, as
OpenGenome2 ships them) and Parquet columns.

Every record (sequence) is one document. Its letters come out as written (case kept) with line breaks and other
whitespace removed; a long record comes in parts of `part_chars` characters, so a chromosome is never held whole.
Files are read line by line as bytes, so memory stays bounded on inputs of any size. A malformed record is a
one-line error that names the file, the record and the line; with skip_bad it is skipped and counted per reason.
"""
import gzip
import json
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO, Iterator

from ..config import ConfigError
from .sources import Corpus, Piece, parquet_pieces

FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".ffn", ".fas")
FASTQ_SUFFIXES = (".fq", ".fastq")
SUFFIXES = {  # how a file's name ends -> its format
    **{suffix + gz: "fasta" for suffix in FASTA_SUFFIXES for gz in ("", ".gz")},
    **{suffix + gz: "fastq" for suffix in FASTQ_SUFFIXES for gz in ("", ".gz")},
    ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json.gz": "jsonl", ".parquet": "parquet",
}
ACCEPTED = ("FASTA (.fa .fasta .fna .ffn .fas) or FASTQ (.fq .fastq), plain or .gz, JSONL (.jsonl .jsonl.gz "
            ".json.gz) or Parquet (.parquet)")
READ_BYTES = 1 << 20  # FASTA lines are read in parts of at most this many bytes (a sequence may be one long line)
WHITESPACE = b" \t\n\r\v\f"
LETTERS = bytes(range(ord("A"), ord("Z") + 1)) + bytes(range(ord("a"), ord("z") + 1)) + b"-.*"
GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class GenomicCorpus(Corpus):
    """A Corpus of sequence records. `skipped` counts, per reason, the malformed records that the latest pass over
    the train stream skipped (skip_bad); it starts from zero at the start of each pass."""

    skipped: Counter = field(default_factory=Counter)


class Malformed(Exception):
    """A malformed record: the reason it is counted under, what is wrong, and how to fix it."""


@dataclass
class Records:
    """The records of one file, and what a malformed one does: a one-line ConfigError, or with skip_bad a count."""

    path: Path
    skip_bad: bool
    skipped: Counter

    def bad(self, number: int, line: int | None, reason: str, problem: str,
            fix: str = "fix or remove the record") -> None:
        """Raises the one-line error for record `number` (found at `line`), or counts it under `reason`."""
        if not self.skip_bad:
            where = f"record {number}" + (f" (line {line})" if line else "")
            raise ConfigError(f"{self.path} {where}: {problem}; {fix}, or pass --skip_bad to skip malformed records")
        self.skipped[reason] += 1


class Record:
    """The FASTA record being read: its number, its header's line, and its letters, added line by line and handed
    out as Pieces of `part_chars` characters (whole at the end when part_chars is None)."""

    def __init__(self, number: int, line: int, part_chars: int | None):
        self.number, self.line, self.part_chars = number, line, part_chars
        self.buffer, self.length, self.first = bytearray(), 0, True

    def add(self, letters: bytes) -> Iterator[Piece]:
        """Adds letters; yields the parts that are complete."""
        self.buffer += letters
        self.length += len(letters)
        while self.part_chars and len(self.buffer) >= self.part_chars:
            yield self.take(self.part_chars)

    def end(self) -> Iterator[Piece]:
        """The rest of the record."""
        if self.buffer:
            yield self.take(len(self.buffer))

    def take(self, size: int) -> Piece:
        piece = Piece(self.buffer[:size].decode("ascii"), self.first)
        del self.buffer[:size]
        self.first = False
        return piece


def junk(letters: bytes) -> str | None:
    """What is wrong with a sequence's letters, or None when all are ASCII letters, '-', '.' or '*'."""
    other = letters.translate(None, LETTERS)
    if not other:
        return None
    byte = other[0]
    shown = f"{chr(byte)!r} (byte 0x{byte:02x})" if byte < 128 else f"byte 0x{byte:02x}, which is not ASCII"
    return f"the sequence holds {shown}; only letters, '-', '.' and '*' are read (binary or damaged data?)"


def parts(letters: bytes, part_chars: int | None) -> Iterator[Piece]:
    """A sequence held in memory as Pieces of part_chars characters (one Piece when part_chars is None)."""
    size = part_chars or len(letters)
    for start in range(0, len(letters), size):
        yield Piece(letters[start:start + size].decode("ascii"), start == 0)


def text_letters(text: str) -> bytes:
    """The letters of a sequence given as a string (JSONL, Parquet), whitespace removed; Malformed if it has none or
    holds anything else."""
    letters = text.encode("utf-8", "surrogatepass").translate(None, WHITESPACE)
    if not letters:
        raise Malformed("empty sequence", "the sequence is empty")
    problem = junk(letters)
    if problem:
        raise Malformed("invalid characters", problem)
    return letters


def finish(record: Record | None, records: Records) -> Iterator[Piece]:
    """The rest of a FASTA record; a header without sequence is malformed."""
    if record is None:
        return
    if not record.length:
        records.bad(record.number, record.line, "empty sequence", "a header without a sequence")
    yield from record.end()


def fasta_pieces(f: BinaryIO, records: Records, part_chars: int | None) -> Iterator[Piece]:
    """The records of a FASTA file: a '>' header line, then sequence lines. A record found malformed after some of
    its parts were yielded (one longer than part_chars) ends there when skipped."""
    number = line = 0
    line_start, in_header = True, False
    record: Record | None = None  # None before the first header and for the rest of a malformed record
    for chunk in iter(partial(f.readline, READ_BYTES), b""):
        starts, line_start = line_start, chunk.endswith(b"\n")
        line += starts
        if in_header:  # the rest of a header line longer than READ_BYTES
            in_header = not line_start
            continue
        if starts and chunk.startswith(b">"):
            yield from finish(record, records)
            number += 1
            record, in_header = Record(number, line, part_chars), not line_start
            continue
        letters = chunk.translate(None, WHITESPACE)
        if not letters or (record is None and number):
            continue
        if not number:
            number = 1  # the lines before the first header count as record 1
            records.bad(1, line, "no header", "a sequence line before the first '>' header", "add a header line")
            continue
        problem = junk(letters)
        if problem:
            records.bad(number, line, "invalid characters", problem)
            record = None
            continue
        yield from record.add(letters)
    yield from finish(record, records)


def fastq_pieces(f: BinaryIO, records: Records, part_chars: int | None) -> Iterator[Piece]:
    """The records of a FASTQ file, four lines each: '@name', sequence, '+', quality of the sequence's length.
    After a record that is not of this form, reading goes on at the next line that starts with '@'."""
    lines: list[tuple[int, bytes]] = []  # (line number, line) of the record being read
    number = 0
    for line_number, line in enumerate(f, start=1):
        line = line.translate(None, WHITESPACE)
        if not lines and not line:  # blank lines between records
            continue
        lines.append((line_number, line))
        if len(lines) < 4:
            continue
        number += 1
        (first, header), (_, sequence), (plus_line, plus), (_, quality) = lines
        if not header.startswith(b"@") or not plus.startswith(b"+"):
            at, expected = (first, "'@'") if not header.startswith(b"@") else (plus_line, "'+'")
            records.bad(number, at, "not 4-line FASTQ", f"not the 4-line FASTQ form (@name, sequence, +, quality): "
                        f"line {at} should start with {expected}")
            lines = next((lines[i:] for i in range(1, 4) if lines[i][1].startswith(b"@")), [])
            continue
        lines = []
        if not sequence:
            records.bad(number, first + 1, "empty sequence", "the sequence is empty")
        elif problem := junk(sequence):
            records.bad(number, first + 1, "invalid characters", problem)
        elif len(quality) != len(sequence):
            records.bad(number, first + 3, "quality length", f"{len(quality)} quality letters for "
                        f"{len(sequence)} sequence letters")
        else:
            yield from parts(sequence, part_chars)
    if lines:
        records.bad(number + 1, lines[-1][0], "truncated", f"the file ends after {len(lines)} of the record's 4 lines",
                    "complete or remove the record (was the file cut short?)")


def json_letters(data: bytes, text_field: str) -> bytes:
    """The sequence letters of one JSONL line; Malformed if it is not an object with a non-empty sequence string."""
    try:
        record = json.loads(data)
    except UnicodeDecodeError:
        raise Malformed("invalid characters", "bytes that are not UTF-8 (binary or damaged data?)") from None
    except json.JSONDecodeError as e:
        raise Malformed("invalid JSON", f"not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise Malformed("not an object", f"a JSON {type(record).__name__}, not an object with a text field "
                        f"{text_field!r}")
    if text_field not in record:
        raise Malformed("no text field", f"no text field {text_field!r} (keys: {sorted(record)})",
                        "choose the field with --text_field")
    text = record[text_field]
    if not isinstance(text, str):
        raise Malformed("text not a string", f"text field {text_field!r} is a {type(text).__name__}, not a string",
                        "choose another field with --text_field")
    return text_letters(text)


def jsonl_pieces(f: BinaryIO, records: Records, text_field: str, part_chars: int | None) -> Iterator[Piece]:
    """One record per non-blank line of a JSONL file: the sequence in its `text_field` string."""
    number = 0
    for line, data in enumerate(f, start=1):
        if not data.strip():
            continue
        number += 1
        try:
            letters = json_letters(data, text_field)
        except Malformed as e:
            records.bad(number, line, *e.args)
            continue
        yield from parts(letters, part_chars)


def parquet_sequences(records: Records, text_field: str, part_chars: int | None) -> Iterator[Piece]:
    """One record per row of a Parquet file's `text_field` string column."""
    for number, piece in enumerate(parquet_pieces(records.path, text_field), start=1):
        try:
            letters = text_letters(piece.text)
        except Malformed as e:
            records.bad(number, None, *e.args)
            continue
        yield from parts(letters, part_chars)


def file_pieces(path: Path, records: Records, text_field: str, part_chars: int | None) -> Iterator[Piece]:
    """The records of one file, read in the format its name tells; damaged gzip data is a one-line error."""
    kind = genomic_format(path)
    if kind == "parquet":
        yield from parquet_sequences(records, text_field, part_chars)
        return
    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as f:
            if kind == "fasta":
                yield from fasta_pieces(f, records, part_chars)
            elif kind == "fastq":
                yield from fastq_pieces(f, records, part_chars)
            else:
                yield from jsonl_pieces(f, records, text_field, part_chars)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ConfigError(f"{path}: damaged gzip data ({e}); download or compress the file again") from None


def genomic_format(path: Path) -> str | None:
    """'fasta', 'fastq', 'jsonl' or 'parquet' as the file's name ends, else None."""
    name = path.name.lower()
    return next((kind for suffix, kind in SUFFIXES.items() if name.endswith(suffix)), None)


def genomic_files(source: str) -> list[Path]:
    """The sequence files of a file or folder (recursively, sorted). Files of other types in a folder are skipped
    with a one-line notice; a folder without any sequence file, or a file of another type, is refused."""
    path = Path(source)
    if path.is_file():
        if genomic_format(path) is None:
            raise ConfigError(f"--source={source!r}: {path.name} is not a sequence file; give {ACCEPTED}, or a "
                              "folder of such files")
        return [path]
    if not path.is_dir():
        raise ConfigError(f"--source={source!r}: no such file or folder; pass a local sequence file or folder")
    found = sorted(p for p in path.rglob("*") if p.is_file())
    files = [p for p in found if genomic_format(p)]
    skipped = Counter(p.suffix.lower() or "without extension" for p in found if not genomic_format(p))
    if not files:
        raise ConfigError(f"--source={source!r}: the folder holds no sequence file ({len(found)} files of other "
                          f"types); give a folder of {ACCEPTED} files")
    if skipped:
        kinds = ", ".join(f"{count} {suffix}" for suffix, count in skipped.most_common())
        print(f"note: --source={source!r}: skipped {skipped.total()} files that are not sequence files ({kinds})")
    return files


def input_size(path: Path) -> int:
    """The bytes a file holds for the progress bar: its size, or for .gz an estimate of the uncompressed size from
    the gzip trailer (ISIZE: the last member's size modulo 2**32, so files of several members, such as bgzip's, or
    over 4 GiB are underestimated; never less than the compressed size). A .gz that is not gzip is refused."""
    size = path.stat().st_size
    if not path.name.lower().endswith(".gz"):
        return size
    with open(path, "rb") as f:
        if f.read(2) != GZIP_MAGIC:
            raise ConfigError(f"{path}: named .gz but not gzip data; compress it with gzip or remove the .gz suffix")
        f.seek(max(size - 4, 0))
        return max(int.from_bytes(f.read(4), "little"), size)


def genomic_corpus(source: str, text_field: str = "text", skip_bad: bool = False,
                   part_chars: int | None = 1 << 20) -> GenomicCorpus:
    """The sequence records of a file or folder of FASTA, FASTQ, JSONL or Parquet files, one document each, in parts
    of at most part_chars characters (None: each record whole). Malformed records are one-line errors, or with
    skip_bad skipped and counted in the corpus's `skipped`."""
    if part_chars is not None and part_chars < 1:
        raise ConfigError(f"part_chars={part_chars}: give a positive number of characters, or None for whole records")
    files = genomic_files(source)
    size = sum(input_size(path) for path in files)
    skipped: Counter = Counter()

    def pieces() -> Iterator[Piece]:
        skipped.clear()
        for path in files:
            yield from file_pieces(path, Records(path, skip_bad, skipped), text_field, part_chars)

    stamp = {"files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
             "text_field": text_field, "skip_bad": skip_bad}
    return GenomicCorpus(source, pieces, size_bytes=size, stamp=stamp, skipped=skipped)

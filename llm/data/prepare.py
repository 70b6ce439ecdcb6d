"""Prepare a dataset: tokenize a corpus into train.bin / val.bin (uint16 or uint32) and meta.json.

    python -m llm.data.prepare shakespeare_char                      # the shipped Tiny Shakespeare, char tokens
    python -m llm.data.prepare shakespeare_byte                      # the same text, one token per UTF-8 byte
    python -m llm.data.prepare shakespeare --source input.txt        # a local copy, GPT-2 tokens
    python -m llm.data.prepare fineweb --max_tokens 100_000_000      # streamed from Hugging Face (pip install 'llm[data]')
    python -m llm.data.prepare text --source corpus/ --out data/mine # local .txt/.jsonl/.parquet files
    python -m llm.data.prepare genomic --source genomes/ --tokenizer nucleotide   # FASTA/FASTQ/JSONL/Parquet sequences

Text is streamed to disk in bounded parts and tokenized by worker processes; documents are separated by the
tokenizer's end-of-text token. With a sequence tokenizer (nucleotide, nuc, 3mer, 6mer) each sequence is stored as
`<begin> tokens <end>` and SPLIT.docs.npy beside the tokens holds where each sequence starts (data_order windows).
A dataset without its own validation split holds out the last val_fraction of its tokens. A second run with the
same inputs and options is skipped unless --force. The files are written under *.tmp names and renamed into place at
the end; a run that fails or is interrupted removes them.
"""
import hashlib
import io
import json
import os
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Iterator, Literal, get_args

import numpy as np
import tyro
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..config import ConfigError, exit_on_user_error
from ..files import fsync_path, write_atomically
from .genomic_sources import genomic_corpus
from .sources import HF_DATASETS, Corpus, Piece, hf_corpus, local_corpus, shakespeare_corpus
from .tokenizers import (
    KMER_SIZES,
    SEQUENCE_TOKENIZERS,
    ByteTokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    clean_sequence,
    tokenizer_from_meta,
)
from .windows import documents_path

DatasetName = Literal["shakespeare_char", "shakespeare_byte", "shakespeare", "tinystories", "fineweb", "wikitext", "text",
                      "genomic"]
DATASET_NAMES = get_args(DatasetName)
TokenizerName = Literal["gpt2", "char", "byte", "nucleotide", "nuc", "3mer", "6mer"]
DEFAULT_TOKENIZER = {"shakespeare_char": "char", "shakespeare_byte": "byte", "genomic": "nucleotide"}  # else gpt2
SHIPPED_DATASETS = ("shakespeare_char", "shakespeare_byte")  # train.py prepares them when missing: the text ships
BATCH_CHARS = 1 << 20  # text per task sent to a worker
IN_FLIGHT_PER_WORKER = 4  # tasks queued per worker: bounds memory while keeping workers busy
SCRATCH_FILES = ("train.bin.tmp", "val.bin.tmp", "meta.json.tmp", "train.docs.npy.tmp", "val.docs.npy.tmp")


@dataclass
class PrepareArgs:
    """Tokenize a corpus into data/NAME/{train,val}.bin and meta.json."""

    name: tyro.conf.Positional[DatasetName]
    """Dataset: shakespeare_char, shakespeare_byte (the shipped text in bytes), shakespeare, tinystories, fineweb,
    wikitext, text (local files via --source), or genomic (FASTA/FASTQ, plain or gzip, JSONL(.gz) or Parquet
    sequences via --source)."""
    tokenizer: TokenizerName | None = None
    """Tokenizer (default: char for shakespeare_char, byte for shakespeare_byte, nucleotide for genomic, else gpt2).
    byte: one token per UTF-8 byte (256 ids, end of text 0, bytes per token 1). Sequence tokenizers: nucleotide
    (bionemo OpenGenome2: one id per character, case kept), nuc (HELM: A T C G), 3mer and 6mer (HELM codons /
    6-mers)."""
    source: str | None = None
    """A local file or folder (text: .txt/.jsonl/.parquet; genomic: .fa/.fasta/.fna/.fq/.fastq[.gz], .jsonl[.gz],
    .parquet); for tinystories/fineweb/wikitext also a Hugging Face id."""
    out: str | None = None
    """Output folder (default: data/NAME)."""
    val_fraction: float = 0.1
    """Fraction of the tokens, taken from the end, held out for validation (datasets without their own split)."""
    text_field: str = "text"
    """The text field of .jsonl records and .parquet columns."""
    encoding: str = "utf-8"
    """The encoding of local .txt/.jsonl files (e.g. latin-1, cp1252)."""
    errors: Literal["strict", "replace", "ignore"] = "strict"
    """Bytes of local .txt/.jsonl files that --encoding cannot decode: strict refuses the file, naming the offset of
    the first; replace substitutes U+FFFD; ignore drops them."""
    max_tokens: int | None = None
    """Read at most this many tokens of the train split, before any validation tail is held out (a FineWeb subset)."""
    upper: bool = False
    """Byte tokenizer: upper-case the text first (soft-masked DNA)."""
    kmer_overlap: int = 0
    """3mer/6mer: letters that consecutive k-mers share (0: codons do not overlap)."""
    skip_bad: bool = False
    """genomic: skip malformed records (counted in the summary) instead of stopping at the first."""
    workers: int = 0
    """Tokenizer processes (0: one per CPU core, at most 8; 1: tokenize in this process)."""
    force: bool = False
    """Prepare again even if the folder already holds this dataset."""


def load_corpus(args: PrepareArgs) -> Corpus:
    """The documents the arguments name."""
    source_is_local = args.source is not None and Path(args.source).exists()
    if args.name in ("text", "genomic") and args.source is None:
        kinds = ".txt/.jsonl/.parquet" if args.name == "text" else "FASTA/FASTQ/.jsonl/.parquet"
        raise ConfigError(f"dataset {args.name} needs --source PATH (a {kinds} file or folder)")
    if args.name == "genomic":
        whole_records = sequence_kind(args) in KMER_SIZES  # k-mers are read from whole sequences
        return genomic_corpus(args.source, args.text_field, args.skip_bad, None if whole_records else BATCH_CHARS)
    if args.name in HF_DATASETS and not source_is_local:
        return hf_corpus(HF_DATASETS[args.name], args.source, args.text_field)
    if args.name.startswith("shakespeare") and args.source is None:
        return shakespeare_corpus()
    return local_corpus(args.source, args.text_field, args.encoding, args.errors)


def sequence_kind(args: PrepareArgs) -> str:
    """The tokenizer the arguments choose."""
    return args.tokenizer or DEFAULT_TOKENIZER.get(args.name, "gpt2")


def build_tokenizer(kind: str, corpus: Corpus, args: PrepareArgs):
    """The tokenizer; the char tokenizer reads the corpus once for its alphabet and document count."""
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "byte":
        return ByteTokenizer(args.upper)
    if kind in SEQUENCE_TOKENIZERS:
        return tokenizer_from_meta({"tokenizer": kind, "kmer_overlap": args.kmer_overlap})
    chars, documents = set(), 0
    for stream in (corpus.train, corpus.val):
        for piece in stream() if stream else ():
            chars.update(piece.text)
            documents += piece.new_document
    return CharTokenizer(sorted(chars), end_of_text=documents > 1)


_worker_tokenizer = None  # set in each worker process by _start_worker


def _start_worker(meta: dict) -> None:
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the main process, which stops the workers
    _worker_tokenizer = tokenizer_from_meta(meta)


def _encode(batch: list[Piece]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a batch of pieces, and the offsets among them where a sequence begins. Before each new document
    a text tokenizer puts its end-of-text token; a sequence tokenizer ends the previous sequence and begins the next
    (TokenWriter begins the stream's first sequence and ends its last)."""
    tokenizer = _worker_tokenizer
    ids: list[int] = []
    starts: list[int] = []
    for text, new_document in batch:
        if new_document and tokenizer.eot is not None:
            ids.append(tokenizer.eot)
        elif new_document and tokenizer.name in SEQUENCE_TOKENIZERS:
            ids.append(tokenizer.eos)
            starts.append(len(ids))
            ids.append(tokenizer.bos)
        ids.extend(tokenizer.encode(text))
    return np.array(ids, dtype=np.uint32), np.array(starts, dtype=np.int64)


def batches(pieces: Iterator[Piece]) -> Iterator[list[Piece]]:
    """Pieces grouped into about BATCH_CHARS of text; the stream's first document gets no separator."""
    batch, size, first = [], 0, True
    for piece in pieces:
        batch.append(Piece(piece.text, piece.new_document and not first))
        first, size = False, size + len(piece.text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class Encoder:
    """Tokenizes batches in order, in worker processes with a bounded number of batches in flight."""

    def __init__(self, meta: dict, workers: int):
        self.pool = Pool(workers, _start_worker, (meta,)) if workers > 1 else None
        self.in_flight = IN_FLIGHT_PER_WORKER * workers
        if self.pool is None:
            _start_worker(meta)

    def map(self, work: Iterator[list[Piece]]) -> Iterator[tuple[list[Piece], tuple[np.ndarray, np.ndarray]]]:
        if self.pool is None:
            yield from ((batch, _encode(batch)) for batch in work)
            return
        pending: deque = deque()
        for batch in work:
            pending.append((batch, self.pool.apply_async(_encode, (batch,))))
            if len(pending) >= self.in_flight:
                batch, result = pending.popleft()
                yield batch, result.get()
        while pending:
            batch, result = pending.popleft()
            yield batch, result.get()

    def close(self) -> None:
        """Stops the workers, at once: every result is in by the end of a run, and none is needed after a failure."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


class TokenWriter:
    """Streams token ids to a file, counting them, their largest id and a checksum of the text they came from."""

    def __init__(self, dtype: np.dtype, progress: Progress, task, sequences: frozenset | None = None):
        """`sequences`: a sequence tokenizer's special ids, whose tokens stand for no text; for sequence data the
        bytes are the letters of the cleaned sequence (newlines and other non-letters dropped)."""
        self.dtype, self.progress, self.task = dtype, progress, task
        self.sequences = sequences is not None
        self.md5 = hashlib.md5()
        self.max_id = -1
        self.specials = np.array(sorted(sequences or ()), dtype=np.int64)
        self.text_bytes, self.content_tokens = 0.0, 0  # UTF-8 bytes written, and the tokens that stand for them

    def bytes_per_token(self) -> float:
        """UTF-8 bytes of text per content token (for sequence data: letters per token, specials left out), the
        figure that turns a loss in nats per token into bits per byte."""
        return self.text_bytes / max(1, self.content_tokens)

    def write(self, encoder: Encoder, pieces: Iterator[Piece], path: Path, limit: int | None,
              wrap: tuple[int, int] | None = None) -> int:
        """Writes the tokens of `pieces` to path, at most `limit` of them; returns the count. With `wrap`, a
        sequence tokenizer's (begin, end) ids, the stream's first sequence is begun and its last ended, and the
        offsets where sequences begin go to the sequence index beside path."""
        count, starts, closed = 0, [], False  # closed: the last token written ends a sequence
        with open(path, "wb") as f:
            if wrap:
                f.write(np.array(wrap[:1], dtype=self.dtype).tobytes())
                count, starts = 1, [np.zeros(1, dtype=np.int64)]
            for batch, (ids, begins) in encoder.map(batches(pieces)):
                text = "".join(piece.text for piece in batch).encode("utf-8")
                kept = len(ids)
                if limit is not None:
                    ids, begins = ids[: limit - count], begins[begins < limit - count]
                written = sum(len(clean_sequence(piece.text)) for piece in batch) if self.sequences else len(text)
                self.text_bytes += written * (len(ids) / kept if kept else 1.0)  # a batch cut by the limit: its part
                self.content_tokens += len(ids) - int(np.isin(ids, self.specials).sum())
                f.write(ids.astype(self.dtype).tobytes())
                starts.append(begins + count)
                count += len(ids)
                if len(ids):
                    closed = wrap is not None and int(ids[-1]) == wrap[1]
                self.max_id = max(self.max_id, int(ids.max()) if len(ids) else -1)
                self.md5.update(text)
                description = f"{path.name.removesuffix('.tmp')}: {count:,} tokens"
                self.progress.update(self.task, advance=len(text), description=description)
                if limit is not None and count >= limit:
                    break
            if wrap:
                if not closed:  # a limit that falls right after a sequence's end leaves it ended
                    f.write(np.array(wrap[1:], dtype=self.dtype).tobytes())
                    count += 1
                save_documents(path, np.concatenate(starts))
                self.max_id = max(self.max_id, *wrap)
        return count


def scratch_documents(tokens: Path) -> Path:
    """The sequence index being written beside a token file being written: train.bin.tmp -> train.docs.npy.tmp."""
    final = documents_path(tokens.with_suffix(""))  # train.bin.tmp -> train.bin -> train.docs.npy
    return final.with_name(final.name + ".tmp")


def save_documents(tokens: Path, starts: np.ndarray) -> None:
    """Writes the sequence index (D,) of a token file being written."""
    with open(scratch_documents(tokens), "wb") as f:
        np.save(f, starts.astype(np.int64))


def split_tail(train: Path, val: Path, dtype: np.dtype, val_fraction: float, source: str) -> tuple[int, int]:
    """Moves the last val_fraction of the tokens in `train` to `val`; returns both counts."""
    total = train.stat().st_size // dtype.itemsize
    n_val = max(1, int(total * val_fraction))
    if total - n_val < 2:
        raise ConfigError(f"{source}: the corpus has only {total} tokens; give it more text or lower --val_fraction")
    np.memmap(train, dtype=dtype, mode="r")[total - n_val:].tofile(val)  # the map closes on return
    with open(train, "r+b") as f:
        f.truncate((total - n_val) * dtype.itemsize)
    return total - n_val, n_val


def split_tail_sequences(train: Path, val: Path, dtype: np.dtype, val_fraction: float, wrap: tuple[int, int]
                         ) -> tuple[int, int]:
    """split_tail for sequence data: the cut falls on the sequence boundary nearest to the last val_fraction of the
    tokens; a single sequence is cut there and each part gets its begin or end token. Both indexes follow."""
    total = train.stat().st_size // dtype.itemsize
    starts = np.load(scratch_documents(train))
    target = total - max(1, int(total * val_fraction))
    tokens = np.memmap(train, dtype=dtype, mode="r")
    if len(starts) > 1:
        cut = int(starts[1:][np.argmin(np.abs(starts[1:] - target))])
        tokens[cut:].tofile(val)
        train_starts, val_starts = starts[starts < cut], starts[starts >= cut] - cut
        n_train = cut
    else:  # one sequence: its head for training, its tail for validation
        cut = max(1, target)
        np.concatenate((np.array(wrap[:1], dtype=dtype), tokens[cut:])).tofile(val)
        tail_end = np.array(wrap[1:], dtype=dtype)
        train_starts, val_starts = starts, np.zeros(1, dtype=np.int64)
        n_train = cut + 1
    del tokens
    n_val = val.stat().st_size // dtype.itemsize
    with open(train, "r+b") as f:
        f.truncate(cut * dtype.itemsize)
        if len(starts) == 1:
            f.seek(0, os.SEEK_END)
            f.write(tail_end.tobytes())
    save_documents(train, train_starts)
    save_documents(val, val_starts)
    return n_train, n_val


def publish(out: Path, meta: dict) -> None:
    """Renames the written train.bin.tmp and val.bin.tmp into place, then writes meta.json. The old meta.json goes
    first, so a crash in between leaves a folder that reads as not prepared rather than one with mismatched files."""
    (out / "meta.json").unlink(missing_ok=True)
    for split in ("train", "val"):
        fsync_path(out / f"{split}.bin.tmp")
        os.replace(out / f"{split}.bin.tmp", out / f"{split}.bin")
        documents = scratch_documents(out / f"{split}.bin.tmp")
        if documents.is_file():
            os.replace(documents, documents_path(out / f"{split}.bin"))
        else:
            documents_path(out / f"{split}.bin").unlink(missing_ok=True)  # left by an earlier preparation
    write_atomically(out / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta)))


def write_splits(corpus: Corpus, tokenizer, dtype: np.dtype, out: Path, args: PrepareArgs, workers: int,
                 verbose: bool) -> tuple[TokenWriter, int, int]:
    """Tokenizes the corpus into out/train.bin.tmp and out/val.bin.tmp (and, for a sequence tokenizer, their
    sequence indexes); returns the writer and both token counts."""
    tokenizer_meta = tokenizer.meta()
    wrap = (tokenizer.bos, tokenizer.eos) if tokenizer.name in SEQUENCE_TOKENIZERS else None
    if wrap is not None and next(iter(corpus.train()), None) is None:  # else it would become one invented sequence
        raise ConfigError(f"--source={corpus.source!r} holds no sequence record (an empty file?); pass FASTA, FASTQ, "
                          "JSONL or Parquet sequences")
    encoder = Encoder(tokenizer_meta, workers)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn())
    train, val = out / "train.bin.tmp", out / "val.bin.tmp"
    console = Console(stderr=True)
    show = verbose and console.is_terminal
    try:  # a bar on a terminal only, gone when done: an error is the only line left on stderr
        with Progress(*columns, console=console, disable=not show, transient=True) as progress:
            # <unk> stands for letters (a k-mer holding N): it is content; begin, end and the rest stand for none
            sequences = tokenizer.special_ids - {tokenizer.unk} if wrap is not None else None
            writer = TokenWriter(dtype, progress, progress.add_task("tokenizing", total=corpus.size_bytes), sequences)
            n_train = writer.write(encoder, corpus.train(), train, args.max_tokens, wrap)
            if corpus.val is not None:
                n_val = writer.write(encoder, corpus.val(), val, None, wrap)
            elif wrap:
                n_train, n_val = split_tail_sequences(train, val, dtype, args.val_fraction, wrap)
            else:
                n_train, n_val = split_tail(train, val, dtype, args.val_fraction, corpus.source)
    finally:
        encoder.close()
    return writer, n_train, n_val


def discard_scratch(out: Path, created: bool) -> None:
    """Removes the files of a failed preparation, and `out` itself when this run created it and it is left empty."""
    for name in SCRATCH_FILES:
        (out / name).unlink(missing_ok=True)
    if created and not any(out.iterdir()):
        out.rmdir()


def already_prepared(out: Path, inputs: dict) -> bool:
    """Whether out holds a complete dataset prepared from the same inputs and options."""
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    itemsize = np.dtype(meta.get("dtype", "uint16")).itemsize
    sizes_match = all((out / f"{split}.bin").is_file() and
                      (out / f"{split}.bin").stat().st_size == meta.get(f"{split}_tokens", -1) * itemsize
                      for split in ("train", "val"))
    return meta.get("inputs") == inputs and sizes_match


def check_args(args: PrepareArgs) -> None:
    """Refuses options that cannot work together, in one line each."""
    if not 0 < args.val_fraction < 1:
        raise ConfigError(f"--val_fraction={args.val_fraction} must be in (0, 1)")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ConfigError(f"--max_tokens={args.max_tokens} must be >= 1")
    if args.workers < 0:
        raise ConfigError(f"--workers={args.workers} must be >= 0 (0: one per CPU core)")
    kind = sequence_kind(args)
    if args.upper and kind != "byte":
        raise ConfigError("--upper applies to the byte tokenizer only; add --tokenizer byte or drop --upper")
    if args.kmer_overlap and kind not in KMER_SIZES:
        raise ConfigError(f"--kmer_overlap applies to the 3mer and 6mer tokenizers, not {kind}; drop it")
    if args.skip_bad and args.name != "genomic":
        raise ConfigError("--skip_bad applies to the genomic dataset only; drop it")
    if kind in SEQUENCE_TOKENIZERS and args.name != "genomic":
        raise ConfigError(f"--tokenizer {kind} reads sequences: use it with the genomic dataset "
                          f"(python -m llm.data.prepare genomic --source PATH --tokenizer {kind})")
    try:
        io.TextIOWrapper(io.BytesIO(), encoding=args.encoding)
    except LookupError:
        raise ConfigError(f"--encoding={args.encoding!r} is not a text encoding Python knows; "
                          "give one such as utf-8, latin-1 or cp1252") from None


def prepare(args: PrepareArgs, verbose: bool = True) -> Path:
    """Writes the dataset (unless already there) and returns its folder; `verbose` shows progress and a summary."""
    check_args(args)
    corpus = load_corpus(args)
    out = Path(args.out or Path("data") / args.name)
    kind = sequence_kind(args)
    options = {k: v for k, v in asdict(args).items() if k not in ("out", "workers", "force")}
    inputs = {**options, "tokenizer": kind, **corpus.stamp}
    if not args.force and already_prepared(out, inputs):
        print(f"{out} already holds this dataset; pass --force to prepare it again")
        return out
    created = not out.is_dir()
    out.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = build_tokenizer(kind, corpus, args)
        dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
        workers = args.workers or min(8, os.cpu_count() or 1)
        start = time.perf_counter()
        writer, n_train, n_val = write_splits(corpus, tokenizer, dtype, out, args, workers, verbose)
        seconds = time.perf_counter() - start
        meta = {**tokenizer.meta(), "dtype": dtype.name, "train_tokens": n_train, "val_tokens": n_val,
                "max_token_id": writer.max_id, "bytes_per_token": round(writer.bytes_per_token(), 6),
                "source": corpus.source, "source_md5": writer.md5.hexdigest(), "inputs": inputs}
        skipped = dict(getattr(corpus, "skipped", {}))  # malformed records left out (--skip_bad)
        if skipped:
            meta["skipped_records"] = skipped
        publish(out, meta)
    except BaseException:  # a damaged input, Ctrl-C, a full disk: no partial file stays behind
        discard_scratch(out, created)
        raise
    if verbose:
        print(f"wrote {out}: {n_train:,} train and {n_val:,} val tokens ({kind}, vocabulary {tokenizer.vocab_size:,}, "
              f"{dtype.name}) in {seconds:.1f} s, {(n_train + n_val) / seconds:,.0f} tokens/s with {workers} workers")
        if skipped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.items())
            print(f"skipped {sum(skipped.values()):,} malformed records ({reasons})")
    return out


def prepare_shipped(out: Path, name: str) -> None:
    """Prepares the shipped dataset `name` (SHIPPED_DATASETS) into `out` from the text that comes with the package,
    saying so in one line."""
    prepare(PrepareArgs(name, out=str(out), workers=1), verbose=False)
    print(f"{out} was missing: prepared {name} from the Tiny Shakespeare text shipped with llm")


def main(argv: list[str] | None = None) -> None:
    """The command line: one `error: ...` line and exit 2 for a user mistake, exit 130 on Ctrl-C."""
    with exit_on_user_error():
        try:
            prepare(tyro.cli(PrepareArgs, args=argv, use_underscores=True))
        except KeyboardInterrupt:
            print("interrupted: the partly written files were removed", file=sys.stderr)
            sys.exit(130)


if __name__ == "__main__":
    main(sys.argv[1:])

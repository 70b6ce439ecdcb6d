"""Genomic sequence files (FASTA, FASTQ, JSONL, Parquet; plain and gzip) read as documents, malformed records as
one-line errors or skipped and counted, and the synthetic genome with its codon structure."""
import gzip
import json
import re
from collections import Counter

import numpy as np
import pytest

from llm.config import ConfigError
from llm.data import genomic_sources
from llm.data.genomic_sources import genomic_corpus
from llm.data.sources import Piece
from llm.data.synthetic_genome import (
    CONTIG_BASES,
    codon_arrays,
    codon_usage,
    contig,
    main,
    orf_sequences,
    synthetic_genome,
)
from llm.genetic_code import STANDARD_CODE, STOP_CODONS

FASTA = b">chr1 first record\nACGTac\r\ngtNN  \n\nRYKM\n>chr2\n\tGGCC\n>chr3\nacgt-.*\n"
FASTA_RECORDS = ["ACGTacgtNNRYKM", "GGCC", "acgt-.*"]
FASTQ = b"@read1\nACGTN\n+\nIIII#\n\n@read2 x\ngattaca\n+read2 x\n!!!!!!!\n"
FASTQ_RECORDS = ["ACGTN", "gattaca"]
JSONL = b'{"text": "ACGT\\nacgt", "id": 1}\n\n{"text": "GGG", "id": 2}\n'
JSONL_RECORDS = ["ACGTacgt", "GGG"]


def write(path, data: bytes):
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def pieces(source, **options) -> list[Piece]:
    return list(genomic_corpus(str(source), **options).train())


def documents(source, **options) -> list[str]:
    """The documents of a source, parts joined."""
    docs: list[str] = []
    for piece in pieces(source, **options):
        if piece.new_document:
            docs.append("")
        docs[-1] += piece.text
    return docs


@pytest.mark.parametrize("name, data, records", [
    ("a.fa", FASTA, FASTA_RECORDS), ("a.fasta.gz", FASTA, FASTA_RECORDS), ("a.FNA", FASTA, FASTA_RECORDS),
    ("a.fq", FASTQ, FASTQ_RECORDS), ("a.fastq.gz", FASTQ, FASTQ_RECORDS),
    ("a.jsonl", JSONL, JSONL_RECORDS), ("a.jsonl.gz", JSONL, JSONL_RECORDS), ("a.json.gz", JSONL, JSONL_RECORDS),
])
def test_each_record_is_one_document_with_whitespace_removed_and_case_kept(tmp_path, name, data, records):
    path = write(tmp_path / name, data)
    assert pieces(path) == [Piece(record, True) for record in records]


def test_parquet_rows_are_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"seq": ["AC GT", "ggg"], "id": [1, 2]}), tmp_path / "a.parquet")
    assert pieces(tmp_path / "a.parquet", text_field="seq") == [Piece("ACGT", True), Piece("ggg", True)]
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ConfigError, match="b.parquet: not a readable Parquet file"):
        pieces(tmp_path / "b.parquet")


def test_folder_reads_sorted_sequence_files_and_notes_the_others(tmp_path, capsys):
    write(tmp_path / "a.fa.gz", FASTA)
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "b.fq", FASTQ)
    write(tmp_path / "c.jsonl", JSONL)
    (tmp_path / "README.md").write_text("# sequences\n")
    assert documents(tmp_path) == FASTA_RECORDS + JSONL_RECORDS + FASTQ_RECORDS  # c.jsonl sorts before sub/
    out = capsys.readouterr().out
    assert out.startswith("note: ") and "skipped 1 files" in out and "1 .md" in out and out.count("\n") == 1


@pytest.mark.parametrize("name, data", [("a.fa", FASTA), ("a.fq", FASTQ), ("a.jsonl", JSONL)])
def test_parts_join_to_the_record_and_only_the_first_starts_a_document(tmp_path, name, data):
    path = write(tmp_path / name, data)
    whole = pieces(path, part_chars=None)
    parts = pieces(path, part_chars=3)
    assert all(piece.new_document for piece in whole) and len(parts) > len(whole)
    assert documents(path, part_chars=3) == [piece.text for piece in whole]
    last = [i + 1 == len(parts) or parts[i + 1].new_document for i in range(len(parts))]  # a record's last part
    assert all(len(part.text) == 3 or (is_last and 0 < len(part.text) < 3) for part, is_last in zip(parts, last))


def test_long_lines_and_headers_are_read_in_parts(tmp_path, monkeypatch):
    sequence = "ACGTTGCA" * 50
    path = write(tmp_path / "a.fa", f">{'long header ' * 20}\n{sequence}\n>b\n{sequence.lower()}\n".encode())
    expected = documents(path)
    monkeypatch.setattr(genomic_sources, "READ_BYTES", 7)
    assert documents(path) == expected == [sequence, sequence.lower()]
    assert documents(path, part_chars=None) == expected


def test_a_record_of_many_megabytes_streams_in_bounded_parts(tmp_path):
    line = b"ACGT" * 15 + b"\n"
    path = write(tmp_path / "big.fa", b">chr\n" + line * 100_000)  # 6 MB in one record
    corpus = genomic_corpus(str(path), part_chars=1 << 20)
    sizes = [len(piece.text) for piece in corpus.train()]
    assert sizes == [1 << 20] * 5 + [6_000_000 - 5 * (1 << 20)]


BAD_CASES = [  # file, content, the bad record's number, the reason it is counted under, a word of the message
    ("seq.fa", b"TTTT\n>a\nAC\n>c\nGT\n", 1, "no header", "before the first '>' header"),
    ("empty.fa", b">a\nAC\n>b\n\n>c\nGT\n", 2, "empty sequence", "without a sequence"),
    ("digits.fa", b">a\nAC\n>b\nAC1T\nAAAA\n>c\nGT\n", 2, "invalid characters", "'1'"),
    ("nul.fa.gz", b">a\nAC\n>b\nA\x00\x00C\n>c\nGT\n", 2, "invalid characters", "0x00"),
    ("latin.fa", b">a\nAC\n>b\nAC\xff\xfeT\n>c\nGT\n", 2, "invalid characters", "not ASCII"),
    ("header.fq", b"@a\nAC\n+\nII\nXb\nAC\n+\nII\n@c\nGT\n+\nII\n", 2, "not 4-line FASTQ", "should start with '@'"),
    ("plus.fq", b"@a\nAC\n+\nII\n@b\nAC\nII\n@c\nGT\n+\nII\n", 2, "not 4-line FASTQ", "should start with '+'"),
    ("quality.fq", b"@a\nAC\n+\nII\n@b\nACG\n+\nII\n@c\nGT\n+\nII\n", 2, "quality length", "2 quality letters"),
    ("empty.fq", b"@a\nAC\n+\nII\n@b\n\n+\n\n@c\nGT\n+\nII\n", 2, "empty sequence", "empty"),
    ("junk.fq.gz", b"@a\nAC\n+\nII\n@b\nA\x01\n+\nII\n@c\nGT\n+\nII\n", 2, "invalid characters", "0x01"),
    ("cut.fq", b"@a\nAC\n+\nII\n@c\nGT\n+\nII\n@b\nAC\n", 3, "truncated", "ends after 2"),
    ("json.jsonl", b'{"text": "AC"}\n{"text": \n{"text": "GT"}\n', 2, "invalid JSON", "not valid JSON"),
    ("list.jsonl", b'{"text": "AC"}\n["AC"]\n{"text": "GT"}\n', 2, "not an object", "a JSON list"),
    ("field.jsonl", b'{"text": "AC"}\n{"seq": "AC"}\n{"text": "GT"}\n', 2, "no text field", "--text_field"),
    ("number.jsonl.gz", b'{"text": "AC"}\n{"text": 5}\n{"text": "GT"}\n', 2, "text not a string", "is a int"),
    ("blank.jsonl", b'{"text": "AC"}\n{"text": " \\n"}\n{"text": "GT"}\n', 2, "empty sequence", "empty"),
    ("digits.jsonl", b'{"text": "AC"}\n{"text": "AC9"}\n{"text": "GT"}\n', 2, "invalid characters", "'9'"),
    ("accent.jsonl", '{"text": "AC"}\n{"text": "ACé"}\n{"text": "GT"}\n'.encode(), 2, "invalid characters",
     "not ASCII"),
    ("bytes.json.gz", b'{"text": "AC"}\n{"text": "AC\xff"}\n{"text": "GT"}\n', 2, "invalid characters", "UTF-8"),
]


@pytest.mark.parametrize("name, data, number, reason, words", BAD_CASES)
def test_a_malformed_record_is_a_one_line_error_or_skipped_and_counted(tmp_path, name, data, number, reason, words):
    path = write(tmp_path / name, data)
    with pytest.raises(ConfigError) as error:
        pieces(path)
    message = str(error.value)
    assert message.startswith(f"{path} record {number} (line ") and words in message and "\n" not in message
    corpus = genomic_corpus(str(path), skip_bad=True)
    for _ in range(2):  # a second pass counts afresh
        assert list(corpus.train()) == [Piece("AC", True), Piece("GT", True)]
        assert corpus.skipped == Counter({reason: 1})


def test_a_bad_parquet_row_names_the_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["AC", None, "A1", "GT"]}), tmp_path / "a.parquet")
    with pytest.raises(ConfigError, match=r"a.parquet record 2: the sequence is empty"):
        pieces(tmp_path / "a.parquet")
    corpus = genomic_corpus(str(tmp_path / "a.parquet"), skip_bad=True)
    assert list(corpus.train()) == [Piece("AC", True), Piece("GT", True)]
    assert corpus.skipped == Counter({"empty sequence": 1, "invalid characters": 1})


def test_gzip_named_files_that_are_not_gzip_or_are_damaged_are_refused(tmp_path):
    write(tmp_path / "plain.fa", FASTA)
    (tmp_path / "plain.fa").rename(tmp_path / "plain.fa.gz")
    with pytest.raises(ConfigError, match=r"plain.fa.gz: named .gz but not gzip data"):
        genomic_corpus(str(tmp_path / "plain.fa.gz"))
    (tmp_path / "cut.fa.gz").write_bytes(gzip.compress(FASTA * 100)[:60])
    with pytest.raises(ConfigError, match=r"cut.fa.gz: damaged gzip data") as error:
        pieces(tmp_path / "cut.fa.gz")
    assert "\n" not in str(error.value)


def test_empty_folder_unsupported_file_and_missing_path_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"holds no sequence file \(0 files.*\.fasta.*\.jsonl\.gz"):
        genomic_corpus(str(tmp_path))
    (tmp_path / "notes.txt").write_text("ACGT")
    with pytest.raises(ConfigError, match=r"holds no sequence file \(1 files"):
        genomic_corpus(str(tmp_path))
    with pytest.raises(ConfigError, match=r"notes.txt is not a sequence file; give FASTA \(.fa"):
        genomic_corpus(str(tmp_path / "notes.txt"))
    with pytest.raises(ConfigError, match="no such file or folder"):
        genomic_corpus(str(tmp_path / "missing.fa"))
    with pytest.raises(ConfigError, match="part_chars=0"):
        genomic_corpus(str(tmp_path / "notes.txt"), part_chars=0)


def test_size_bytes_reads_the_gzip_trailer_and_stamp_identifies_the_inputs(tmp_path):
    data = FASTA * 1000
    gz = write(tmp_path / "a.fa.gz", data)
    plain = write(tmp_path / "b.fq", FASTQ)
    assert gz.stat().st_size < len(data)
    assert genomic_corpus(str(gz)).size_bytes == len(data)
    corpus = genomic_corpus(str(tmp_path), text_field="seq", skip_bad=True)
    assert corpus.size_bytes == len(data) + len(FASTQ)
    assert corpus.stamp == {"files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in (gz, plain)],
                            "text_field": "seq", "skip_bad": True}


def test_codon_usage_is_a_fixed_skewed_table_over_the_sense_codons():
    usage = codon_usage(0)
    assert usage == codon_usage(0) != codon_usage(1)
    assert len(usage) == 61 and not set(usage) & set(STOP_CODONS) and abs(sum(usage.values()) - 1) < 1e-9
    synonyms: dict[str, list[float]] = {}
    for codon, probability in usage.items():
        synonyms.setdefault(STANDARD_CODE[codon], []).append(probability)
    skewed = [aa for aa, ps in synonyms.items() if len(ps) > 1 and max(ps) > 5 * min(ps)]
    assert len(skewed) >= 10
    assert 1 / 61 < max(usage.values()) < 0.5  # the codon-frequency baseline beats uniform guessing


def test_synthetic_genome_is_deterministic_and_has_contigs_of_genome_letters():
    genome = list(synthetic_genome(450_000, seed=3))
    assert genome == list(synthetic_genome(450_000, seed=3)) != list(synthetic_genome(450_000, seed=4))
    assert [name for name, _ in genome] == [f"contig_{i}" for i in range(1, 6)]
    assert [len(sequence) for _, sequence in genome] == [CONTIG_BASES] * 4 + [50_000]
    text = "".join(sequence for _, sequence in genome)
    assert re.fullmatch("[ACGTacgtN]+", text)
    counts = Counter(text)
    assert counts["a"] + counts["c"] > 0.05 * len(text) and counts["N"] > 0 and counts["A"] > 0.1 * len(text)
    assert re.search("N{100,}", text)


def test_genome_orfs_start_with_atg_end_with_a_stop_and_follow_the_codon_usage():
    rng = np.random.default_rng(0)
    usage = codon_usage(0)
    letters, orfs = contig(rng, 300_000, *codon_arrays(usage))
    sequence = letters.tobytes().decode()
    assert len(sequence) == 300_000 and len(orfs) > 50
    codons = []
    for start, end in orfs[:-1]:  # the last may be cut by the contig's end
        orf = sequence[start:end]
        assert orf.isupper() and orf.startswith("ATG") and orf[-3:] in STOP_CODONS and len(orf) % 3 == 0
        inner = [orf[i:i + 3] for i in range(3, len(orf) - 3, 3)]
        assert not set(inner) & set(STOP_CODONS)
        codons += inner
    counts = Counter(codons)
    assert max(abs(counts[codon] / len(codons) - p) for codon, p in usage.items()) < 0.01


def test_orf_sequences_are_whole_reading_frames():
    orfs = orf_sequences(200, seed=1)
    assert orfs == orf_sequences(200, seed=1) != orf_sequences(200, seed=2)
    for orf in orfs:
        assert orf.startswith("ATG") and orf[-3:] in STOP_CODONS and len(orf) % 3 == 0 and 30 <= len(orf) // 3 <= 150
        assert not {orf[i:i + 3] for i in range(0, len(orf) - 3, 3)} & set(STOP_CODONS)
    assert min(map(len, orfs)) < 60 * 3 < max(map(len, orfs))


def test_cli_writes_fasta_and_fastq_that_read_back(tmp_path, capsys):
    out = tmp_path / "genome.fa"
    main(["--out", str(out), "--megabases", "0.25", "--seed", "3"])
    assert re.fullmatch(rf"wrote {re.escape(str(out))}: 250,000 bases in \d+\.\d s\n", capsys.readouterr().out)
    assert not list(tmp_path.glob("*.tmp"))
    lines = out.read_text().splitlines()
    assert lines[0] == ">contig_1" and max(map(len, lines)) == 60
    assert documents(out, part_chars=None) == [sequence for _, sequence in synthetic_genome(250_000, seed=3)]
    main(["--out", str(tmp_path / "reads.fq.gz"), "--megabases", "0.15", "--fastq", "--gzip"])
    assert sum(len(piece.text) for piece in pieces(tmp_path / "reads.fq.gz")) == 150_000
    main(["--out", str(tmp_path / "orfs.fa"), "--orfs", "50", "--seed", "2"])
    assert documents(tmp_path / "orfs.fa") == orf_sequences(50, seed=2)


def test_cli_refuses_a_gzip_name_mismatch_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "genome.fa"), "--gzip"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out=") and "add .gz" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_jsonl_records_parse_as_written(tmp_path):
    records = [{"text": "ACGT" * 10, "meta": {"taxon": i}} for i in range(5)]
    path = write(tmp_path / "og2.jsonl.gz", "".join(json.dumps(r) + "\n" for r in records).encode())
    assert documents(path, part_chars=7) == [r["text"] for r in records]

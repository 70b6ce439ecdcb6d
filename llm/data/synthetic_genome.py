"""A synthetic genome with codon structure, to train and test genomic models without downloads.

    python -m llm.data.synthetic_genome --out genome.fa --megabases 200 --seed 0
    python -m llm.data.synthetic_genome --out reads.fq.gz --megabases 10 --fastq --gzip
    python -m llm.data.synthetic_genome --out orfs.fa --orfs 100000    # short ORFs for a codon tokenizer

Contigs of CONTIG_BASES bases alternate intergenic stretches (random bases at GC_CONTENT; some soft-masked in lower
case, some assembly gaps of N) with open reading frames: ATG, codons drawn from a skewed codon-usage table over the
61 sense codons, and a stop codon. A model that predicts an ORF's next codon from the usage table alone is right with
the probability of the most frequent codon: the baseline accuracy that context must beat.
"""
import gzip
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import tyro

from ..config import ConfigError, exit_on_user_error
from ..files import write_atomically
from ..genetic_code import STANDARD_CODE, START_CODON, STOP, STOP_CODONS

CONTIG_BASES = 100_000
INTERGENIC_BASES = (100, 2_000)  # the length of an intergenic stretch, drawn uniformly
GENE_CODONS = (50, 500)  # the number of sense codons between a genome ORF's ATG and its stop codon
ORF_CODONS = (30, 150)  # orf_sequences: the number of codons, ATG and stop included
GC_CONTENT = 0.41
MASKED = 0.3  # the share of intergenic stretches soft-masked (lower case)
GAPS = 0.05  # the share of intergenic stretches that are assembly gaps (N)
LINE_LETTERS = 60  # FASTA line length
BASES = np.frombuffer(b"ACGT", np.uint8)
BASE_PROBABILITIES = np.array([1 - GC_CONTENT, GC_CONTENT, GC_CONTENT, 1 - GC_CONTENT]) / 2
LOWER_CASE = 32  # added to an upper-case ASCII letter


def codon_usage(seed: int = 0) -> dict[str, float]:
    """A skewed codon-usage table, codon -> probability over the 61 sense codons, the same for the same seed:
    amino acids get Dirichlet(2) frequencies and the synonymous codons of each a Dirichlet(0.3) share of it, so one
    or two codons of most amino acids are much more frequent than the others."""
    rng = np.random.default_rng(seed)
    sense = [codon for codon, amino_acid in STANDARD_CODE.items() if amino_acid != STOP]
    amino_acids = sorted({STANDARD_CODE[codon] for codon in sense})
    usage = {}
    for amino_acid, share in zip(amino_acids, rng.dirichlet(np.full(len(amino_acids), 2.0))):
        synonyms = [codon for codon in sense if STANDARD_CODE[codon] == amino_acid]
        for codon, part in zip(synonyms, rng.dirichlet(np.full(len(synonyms), 0.3))):
            usage[codon] = float(share * part)
    return {codon: usage[codon] for codon in sense}


def codon_arrays(usage: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """A usage table as an (n, 3) uint8 array of codon letters and an array of their probabilities."""
    codons = np.frombuffer("".join(usage).encode("ascii"), np.uint8).reshape(-1, 3)
    probabilities = np.array(list(usage.values()))
    return codons, probabilities / probabilities.sum()


def open_reading_frame(rng: np.random.Generator, codons: np.ndarray, probabilities: np.ndarray,
                       n_codons: int) -> np.ndarray:
    """ATG, n_codons codons drawn from the usage table, and a stop codon, as uint8 letters."""
    body = codons[rng.choice(len(codons), n_codons, p=probabilities)].reshape(-1)
    stop = STOP_CODONS[rng.integers(len(STOP_CODONS))]
    return np.concatenate([np.frombuffer(START_CODON.encode(), np.uint8), body, np.frombuffer(stop.encode(), np.uint8)])


def intergenic(rng: np.random.Generator) -> np.ndarray:
    """An intergenic stretch: random bases at GC_CONTENT, soft-masked (lower case) with probability MASKED, or an
    assembly gap of N with probability GAPS."""
    n_bases = int(rng.integers(*INTERGENIC_BASES, endpoint=True))
    kind = rng.random()
    if kind < GAPS:
        return np.full(n_bases, ord("N"), np.uint8)
    bases = rng.choice(BASES, n_bases, p=BASE_PROBABILITIES)
    return bases + LOWER_CASE if kind < GAPS + MASKED else bases


def contig(rng: np.random.Generator, n_bases: int, codons: np.ndarray,
           probabilities: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A contig of n_bases uint8 letters, intergenic stretches alternating with ORFs, and the [start, end) spans of
    its ORFs (the last one may be cut short by the contig's end)."""
    segments, orfs, size = [], [], 0
    while size < n_bases:
        gap = intergenic(rng)
        orf = open_reading_frame(rng, codons, probabilities, int(rng.integers(*GENE_CODONS, endpoint=True)))
        start = size + len(gap)
        if start < n_bases:
            orfs.append((start, min(start + len(orf), n_bases)))
        segments += [gap, orf]
        size = start + len(orf)
    return np.concatenate(segments)[:n_bases], orfs


def synthetic_genome(n_bases: int, seed: int, usage_seed: int = 0,
                     contig_bases: int = CONTIG_BASES) -> Iterator[tuple[str, str]]:
    """(name, sequence) records of a genome of n_bases bases in contigs of contig_bases (the last one shorter),
    the same for the same seeds; ORF codons follow codon_usage(usage_seed)."""
    rng = np.random.default_rng(seed)
    codons, probabilities = codon_arrays(codon_usage(usage_seed))
    for index, start in enumerate(range(0, n_bases, contig_bases), start=1):
        letters, _ = contig(rng, min(contig_bases, n_bases - start), codons, probabilities)
        yield f"contig_{index}", letters.tobytes().decode("ascii")


def orf_sequences(n: int, seed: int, usage_seed: int = 0) -> list[str]:
    """n mRNA-like sequences, ATG + codons from codon_usage(usage_seed) + a stop codon, of ORF_CODONS codons."""
    rng = np.random.default_rng(seed)
    codons, probabilities = codon_arrays(codon_usage(usage_seed))
    lengths = rng.integers(*ORF_CODONS, size=n, endpoint=True)
    return [open_reading_frame(rng, codons, probabilities, int(length) - 2).tobytes().decode("ascii")
            for length in lengths]


@dataclass
class GenomeArgs:
    """Write a synthetic genome (or a set of ORFs) as FASTA or FASTQ."""

    out: str
    """The file to write; it ends in .gz exactly when --gzip is given."""
    megabases: float = 1.0
    """The genome's size in millions of bases."""
    seed: int = 0
    """The seed of the sequence (the codon-usage table is the same for every seed)."""
    fastq: bool = False
    """Write FASTQ (a constant quality letter) instead of FASTA."""
    gzip: bool = False
    """Compress with gzip."""
    orfs: int | None = None
    """Write this many short ORFs (orf_sequences) instead of a genome."""


def fasta_record(name: str, sequence: str) -> str:
    """A FASTA record with lines of LINE_LETTERS letters."""
    lines = (sequence[start:start + LINE_LETTERS] for start in range(0, len(sequence), LINE_LETTERS))
    return f">{name}\n" + "\n".join(lines) + "\n"


def fastq_record(name: str, sequence: str) -> str:
    """A FASTQ record with a constant quality letter."""
    return f"@{name}\n{sequence}\n+\n{'I' * len(sequence)}\n"


def write_genome(args: GenomeArgs) -> tuple[Path, int]:
    """Writes the file named by args atomically (a .tmp name renamed into place); returns its path and bases."""
    out = Path(args.out)
    if out.name.lower().endswith(".gz") != args.gzip:
        raise ConfigError(f"--out={args.out!r}: " + ("add .gz to the name" if args.gzip else "the name ends in .gz: "
                                                    "pass --gzip") + " (readers tell gzip by the name)")
    if not out.parent.is_dir():
        raise ConfigError(f"--out={args.out!r}: no folder {out.parent}; create it first")
    if args.orfs is not None and args.orfs < 1:
        raise ConfigError(f"--orfs={args.orfs}: give a positive number of ORFs")
    if args.orfs is None and args.megabases <= 0:
        raise ConfigError(f"--megabases={args.megabases}: give a positive size")
    if args.orfs is None:
        records = synthetic_genome(round(args.megabases * 1e6), args.seed)
    else:
        records = ((f"orf_{index}", orf) for index, orf in enumerate(orf_sequences(args.orfs, args.seed), start=1))
    bases = 0

    def write(tmp: Path) -> None:
        nonlocal bases
        with (gzip.open(tmp, "wt", compresslevel=6) if args.gzip else open(tmp, "w")) as f:
            for name, sequence in records:
                f.write((fastq_record if args.fastq else fasta_record)(name, sequence))
                bases += len(sequence)

    try:
        write_atomically(out, write)
    except BaseException:
        out.with_name(out.name + ".tmp").unlink(missing_ok=True)
        raise
    return out, bases


def main(argv: list[str] | None = None) -> None:
    """The command line: one `error: ...` line and exit 2 for a user mistake."""
    with exit_on_user_error():
        start = time.perf_counter()
        out, bases = write_genome(tyro.cli(GenomeArgs, args=argv, use_underscores=True))
        print(f"wrote {out}: {bases:,} bases in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])

"""The standard genetic code, in one place: codons in HELM's order, their amino acids, start and stop codons."""
from itertools import product

BASES = "ATCG"  # HELM's base order: k-mer vocabularies list k-mers in this order (AAA, AAT, AAC, AAG, ATA, ...)
START_CODON = "ATG"
STOP = "*"  # the amino-acid letter of the stop codons

# NCBI translation table 1 (the standard code): codon -> one-letter amino acid, "*" for stop.
STANDARD_CODE = {
    "TTT": "F", "TTC": "F", "TTA": "L", "TTG": "L", "CTT": "L", "CTC": "L", "CTA": "L", "CTG": "L",
    "ATT": "I", "ATC": "I", "ATA": "I", "ATG": "M", "GTT": "V", "GTC": "V", "GTA": "V", "GTG": "V",
    "TCT": "S", "TCC": "S", "TCA": "S", "TCG": "S", "AGT": "S", "AGC": "S",
    "CCT": "P", "CCC": "P", "CCA": "P", "CCG": "P", "ACT": "T", "ACC": "T", "ACA": "T", "ACG": "T",
    "GCT": "A", "GCC": "A", "GCA": "A", "GCG": "A", "TAT": "Y", "TAC": "Y", "TAA": STOP, "TAG": STOP, "TGA": STOP,
    "CAT": "H", "CAC": "H", "CAA": "Q", "CAG": "Q", "AAT": "N", "AAC": "N", "AAA": "K", "AAG": "K",
    "GAT": "D", "GAC": "D", "GAA": "E", "GAG": "E", "TGT": "C", "TGC": "C", "TGG": "W",
    "CGT": "R", "CGC": "R", "CGA": "R", "CGG": "R", "AGA": "R", "AGG": "R", "GGT": "G", "GGC": "G", "GGA": "G",
    "GGG": "G",
}
STOP_CODONS = tuple(codon for codon, amino_acid in STANDARD_CODE.items() if amino_acid == STOP)


def kmers(k: int) -> list[str]:
    """All 4**k k-mers over ATCG in HELM's order."""
    return ["".join(letters) for letters in product(BASES, repeat=k)]

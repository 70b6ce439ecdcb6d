"""The genomic tokenizers: their id tables, cleaning, k-mer overlap, round trips, meta and token_text."""
import json
import random

import pytest

from llm.config import ConfigError
from llm.data.tokenizers import (
    TOKENIZER_KEYS,
    ByteTokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    KmerTokenizer,
    NucleotideTokenizer,
    NucTokenizer,
    tokenizer_from_meta,
)
from llm.genetic_code import kmers

GENOMIC = {
    "nucleotide": NucleotideTokenizer,
    "nuc": NucTokenizer,
    "3mer": lambda: KmerTokenizer(3),
    "3mer overlap 1": lambda: KmerTokenizer(3, 1),
    "3mer overlap 2": lambda: KmerTokenizer(3, 2),
    "6mer": lambda: KmerTokenizer(6),
    "6mer overlap 3": lambda: KmerTokenizer(6, 3),
}


def test_nucleotide_ids():
    tok = NucleotideTokenizer()
    assert (tok.name, tok.vocab_size, tok.eot) == ("nucleotide", 256, None)
    assert (tok.eos, tok.pad, tok.bos, tok.unk, tok.mask) == (0, 1, 2, 3, None)
    assert tok.special_ids == {0, 1, 2, 3}
    assert tok.decode([0, 1, 2, 3]) == "<EOS><PAD><BOS><UNK>"
    assert tok.encode("ACGTNacgtn") == [65, 67, 71, 84, 78, 97, 99, 103, 116, 110]
    assert tok.encode("\x03\x04\xff\u0100") == [3, 4, 255, 3]
    assert tok.encode_sequence("AC") == [2, 65, 67, 0]


def test_nuc_ids():
    tok = NucTokenizer()
    assert (tok.name, tok.vocab_size, tok.eot) == ("nuc", 9, None)
    assert (tok.bos, tok.pad, tok.eos, tok.unk, tok.mask) == (0, 1, 2, 3, 8)
    assert tok.special_ids == {0, 1, 2, 3, 8}
    assert tok.decode(range(9)) == "<cls><pad><eos><unk>ATCG<mask>"
    assert tok.encode("ATCGN") == [4, 5, 6, 7, 3]
    assert tok.encode_sequence("GA") == [0, 7, 4, 2]


def test_3mer_ids():
    tok = KmerTokenizer(3)
    assert (tok.name, tok.vocab_size, tok.eot) == ("3mer", 70, None)
    assert (tok.bos, tok.pad, tok.eos, tok.unk, tok.mask) == (0, 1, 2, 3, 68)
    assert tok.special_ids == {0, 1, 2, 3, 68, 69}
    assert tok.decode([0, 1, 2, 3, 68, 69]) == "<cls><pad><eos><unk><mask><distill_token>"
    assert tok.encode("AAAAATAACAAGATA") == [4, 5, 6, 7, 8]
    assert tok.encode("ATG") == [11] and tok.encode("TAA") == [20] and tok.encode("GGG") == [67]
    assert [tok.token_text(i) for i in range(4, 68)] == kmers(3)
    assert tok.encode_sequence("ATGTAA") == [0, 11, 20, 2]


def test_6mer_ids():
    tok = KmerTokenizer(6)
    assert (tok.name, tok.vocab_size, tok.eot) == ("6mer", 4101, None)
    assert (tok.bos, tok.pad, tok.eos, tok.unk, tok.mask) == (0, 1, 2, 3, 4)
    assert tok.special_ids == {0, 1, 2, 3, 4}
    assert tok.decode(range(5)) == "<cls><pad><eos><unk><mask>"
    assert tok.encode("AAAAAA") == [5] and tok.encode("AAAAAT") == [6] and tok.encode("GGGGGG") == [4100]
    assert tok.encode("TTTTTT") == [1370] == [5 + kmers(6).index("TTTTTT")]
    assert [tok.token_text(i) for i in range(5, 4101)] == kmers(6)


@pytest.mark.parametrize("make, text, ids, decoded", [
    (NucleotideTokenizer, "AcgTn-U", [65, 99, 103, 84, 110, 45, 85], "AcgTn-U"),
    (NucleotideTokenizer, "A\u00e9\u0100\U0001f600\x01C", [65, 233, 3, 3, 3, 67], "A\u00e9<UNK><UNK><UNK>C"),
    (NucTokenizer, " acg-uNRt\n", [4, 6, 7, 5, 3, 3, 5], "ACGT<unk><unk>T"),
    (lambda: KmerTokenizer(3), "atg-uaaNNNggg", [11, 20, 3, 67], "ATGTAA<unk>GGG"),
    (lambda: KmerTokenizer(3), "AUGCA", [11], "ATG"),  # the trailing partial codon is dropped
    (lambda: KmerTokenizer(3, 1), "augca", [11, 4 + kmers(3).index("GCA")], "ATGCA"),
    (lambda: KmerTokenizer(3, 1), "ATGNATG", [11, 3, 11], "ATG<unk>TG"),
    (lambda: KmerTokenizer(3, 2), "a-tgca", [11, 4 + kmers(3).index("TGC"), 4 + kmers(3).index("GCA")], "ATGCA"),
    (lambda: KmerTokenizer(6), " acgtac-gtacgu ", [5 + kmers(6).index("ACGTAC"), 5 + kmers(6).index("GTACGT")],
     "ACGTACGTACGT"),
    (lambda: KmerTokenizer(6), "ACGTAN", [3], "<unk>"),
])
def test_encode_and_decode(make, text, ids, decoded):
    tok = make()
    assert tok.encode(text) == ids
    assert tok.decode(ids) == decoded


@pytest.mark.parametrize("name", GENOMIC)
def test_random_dna_round_trips(name):
    tok = GENOMIC[name]()
    step = tok.k - tok.overlap if isinstance(tok, KmerTokenizer) else 1
    width = tok.k if isinstance(tok, KmerTokenizer) else 1
    rng = random.Random(0)
    for n in range(0, 40):
        text = "".join(rng.choice("ACGT") for _ in range(width + n * step))
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text.lower())) == (text.lower() if name == "nucleotide" else text)


@pytest.mark.parametrize("name", ["nuc", "3mer overlap 1", "6mer overlap 3"])
def test_consecutive_sequences_decode_apart(name):
    tok = GENOMIC[name]()
    ids = tok.encode_sequence("ATGCATGCA") + tok.encode_sequence("GGCATGCAT")
    assert tok.decode(ids) == "<cls>ATGCATGCA<eos><cls>GGCATGCAT<eos>"


@pytest.mark.parametrize("name", GENOMIC)
def test_meta_rebuilds_the_tokenizer(name):
    tok = GENOMIC[name]()
    meta = json.loads(json.dumps(tok.meta()))
    assert set(meta) <= set(TOKENIZER_KEYS)
    assert meta["tokenizer"] == tok.name and meta["vocab_size"] == tok.vocab_size and meta["eot"] is None
    rebuilt = tokenizer_from_meta(meta)
    assert type(rebuilt) is type(tok) and rebuilt.vocab_size == tok.vocab_size
    text = "acgTTGCAnNGATCCGAU-ACGGTCAAGT"
    assert rebuilt.encode(text) == tok.encode(text) and rebuilt.encode_sequence(text) == tok.encode_sequence(text)
    assert rebuilt.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_meta_keeps_the_overlap():
    assert KmerTokenizer(3, 2).meta()["kmer_overlap"] == 2
    assert tokenizer_from_meta({"tokenizer": "6mer", "vocab_size": 4101, "eot": None, "kmer_overlap": 5}).overlap == 5


@pytest.mark.parametrize("name", GENOMIC)
def test_token_text_matches_encode(name):
    tok = GENOMIC[name]()
    for i in range(tok.vocab_size):
        text = tok.token_text(i)
        if i in tok.special_ids:
            assert text is None
        else:
            assert tok.encode(text) == [i], (i, text)


def test_token_text_values():
    assert NucleotideTokenizer().token_text(97) == "a" and NucleotideTokenizer().token_text(2) is None
    assert NucTokenizer().token_text(4) == "A" and NucTokenizer().token_text(8) is None
    assert KmerTokenizer(3).token_text(11) == "ATG" and KmerTokenizer(3).token_text(69) is None
    assert KmerTokenizer(6).token_text(6) == "AAAAAT" and KmerTokenizer(6).token_text(4) is None


def test_token_text_of_the_other_tokenizers():
    char = CharTokenizer(list("ACGTa\n"), end_of_text=True)
    assert [char.token_text(i) for i in range(char.vocab_size)] == list("ACGTa\n") + [None]
    byte = ByteTokenizer()
    assert byte.token_text(0) is None and byte.token_text(200) is None
    assert all(byte.encode(byte.token_text(i)) == [i] for i in range(1, 128))
    gpt2 = GPT2Tokenizer()
    assert gpt2.token_text(gpt2.eot) is None
    ids = gpt2.encode(" hello ACGT")
    assert "".join(gpt2.token_text(i) for i in ids) == " hello ACGT"
    assert [gpt2.token_text(i) for i in gpt2.encode("\U0001f642")] == [None, None]  # halves of one character


@pytest.mark.parametrize("k, overlap", [(3, 3), (3, -1), (6, 6), (6, 7)])
def test_bad_overlap_is_refused(k, overlap):
    with pytest.raises(ConfigError, match=rf"--kmer_overlap {overlap} .* use 0 to {k - 1}"):
        KmerTokenizer(k, overlap)


def test_unknown_k_is_refused():
    with pytest.raises(ConfigError, match="no 4-mer vocabulary"):
        KmerTokenizer(4)


@pytest.mark.parametrize("name", GENOMIC)
def test_ids_outside_the_vocabulary_are_refused(name):
    tok = GENOMIC[name]()
    for bad in (tok.vocab_size, -1):
        with pytest.raises(ConfigError, match=rf"token id {bad} is outside .* of {tok.vocab_size} ids"):
            tok.decode([tok.unk, bad])
        with pytest.raises(ConfigError, match=rf"token id {bad}"):
            tok.token_text(bad)

"""Tokenizers, chosen by name and recorded in each prepared dataset's meta.json."""
import tiktoken

from ..config import ConfigError
from ..genetic_code import BASES, kmers

END_OF_TEXT = "<|endoftext|>"
# the meta.json keys that define a tokenizer
TOKENIZER_KEYS = ("tokenizer", "vocab_size", "eot", "chars", "upper", "kmer_overlap")


class CharTokenizer:
    """One token per character of the corpus, sorted; the vocabulary is saved with the data.

    A corpus of several documents gets one more id, after the characters, for the end-of-text separator.
    """

    name = "char"

    def __init__(self, chars: list[str], end_of_text: bool = False):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}
        self.eot = len(chars) if end_of_text else None
        self.vocab_size = len(chars) + end_of_text

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise ConfigError(f"character {e.args[0]!r} is not in this char vocabulary of {len(self.chars)} characters "
                              "(those of the training text); leave it out of the prompt") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(END_OF_TEXT if i == self.eot else self.chars[i] for i in ids)

    def token_text(self, i: int) -> str | None:
        """The character of id i; None for the end-of-text id."""
        return None if i == self.eot else self.chars[i]

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size, "eot": self.eot, "chars": self.chars}


class GPT2Tokenizer:
    """GPT-2's BPE through tiktoken (r50k_base: the same ranks, loadable offline from TIKTOKEN_CACHE_DIR);
    50,257 tokens, end-of-text = 50256."""

    name = "gpt2"

    def __init__(self):
        try:
            self.encoding = tiktoken.get_encoding("r50k_base")
        except Exception as e:  # tiktoken downloads its ranks on first use; offline this fails in many ways
            raise ConfigError(f"the GPT-2 tokenizer could not be loaded ({type(e).__name__}); offline, set "
                              "TIKTOKEN_CACHE_DIR to a tiktoken cache holding r50k_base") from None
        self.vocab_size = self.encoding.n_vocab
        self.eot = self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def token_text(self, i: int) -> str | None:
        """The text of token i; None for end-of-text and for tokens that hold only part of a UTF-8 character."""
        if i == self.eot:
            return None
        try:
            return self.encoding.decode_single_token_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            return None

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size, "eot": self.eot}


class ByteTokenizer:
    """UTF-8 bytes, vocabulary 256, end-of-text = 0 (the genomic preset's nucleotide convention).

    With `upper` the text is upper-cased first (soft-masked lower-case DNA becomes ACGT).
    """

    name = "byte"

    def __init__(self, upper: bool = False):
        self.upper = upper
        self.vocab_size = 256
        self.eot = 0

    def encode(self, text: str) -> list[int]:
        return list((text.upper() if self.upper else text).encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def token_text(self, i: int) -> str | None:
        """The character of an ASCII byte; None for end-of-text and for bytes 128-255 (parts of wider characters)."""
        return chr(i) if 0 < i < 128 else None

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size, "eot": self.eot, "upper": self.upper}


def clean_sequence(text: str) -> str:
    """HELM's cleaning: surrounding whitespace stripped, gaps ('-') removed, upper case, RNA's U read as T."""
    return text.strip().replace("-", "").upper().replace("U", "T")


class SequenceTokenizer:
    """What the genomic tokenizers share. `tokens[i]` is the text of id i, a special token's name for the special ids;
    each subclass's encode gives a text's content ids; one sequence is wrapped as [bos] + ids + [eos], and no
    end-of-text token separates documents.

    `roles` names the special tokens: "bos", "eos", "pad", "unk", "mask" become attributes holding their ids (None
    where the vocabulary has no such token); every named token is in `special_ids`.
    """

    eot = None

    def __init__(self, tokens: list[str], roles: dict[str, str]):
        self.tokens = tokens
        self.vocab_size = len(tokens)
        self.special_ids = frozenset(tokens.index(token) for token in roles.values())
        self.index = {token: i for i, token in enumerate(tokens) if i not in self.special_ids}
        for role in ("bos", "eos", "pad", "unk", "mask"):
            setattr(self, role, tokens.index(roles[role]) if role in roles else None)

    def encode_sequence(self, text: str) -> list[int]:
        """One sequence's ids between its start and end tokens."""
        return [self.bos] + self.encode(text) + [self.eos]

    def check(self, i: int) -> int:
        """i, refused unless it is an id of this vocabulary."""
        if not 0 <= i < self.vocab_size:
            raise ConfigError(f"token id {i} is outside the {self.name} vocabulary of {self.vocab_size} ids; "
                              f"use ids 0 to {self.vocab_size - 1}")
        return i

    def token_text(self, i: int) -> str | None:
        """The letters id i stands for; None for a special id."""
        return None if self.check(i) in self.special_ids else self.tokens[i]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.tokens[self.check(i)] for i in ids)

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size, "eot": self.eot}


class NucleotideTokenizer(SequenceTokenizer):
    """bionemo's OpenGenome2 vocabulary: <EOS>=0, <PAD>=1, <BOS>=2, <UNK>=3, then each character is its code (A=65,
    a=97), case kept; a character whose code is outside 4-255 is <UNK>. Vocabulary 256, no mask token."""

    name = "nucleotide"

    def __init__(self):
        specials = ["<EOS>", "<PAD>", "<BOS>", "<UNK>"]
        super().__init__(specials + [chr(i) for i in range(len(specials), 256)],
                         {"eos": "<EOS>", "pad": "<PAD>", "bos": "<BOS>", "unk": "<UNK>"})

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, self.unk) for c in text]


HELM_SPECIALS = ["<cls>", "<pad>", "<eos>", "<unk>"]  # ids 0-3 of every HELM vocabulary
HELM_ROLES = {"bos": "<cls>", "pad": "<pad>", "eos": "<eos>", "unk": "<unk>", "mask": "<mask>"}


class NucTokenizer(SequenceTokenizer):
    """HELM's single-nucleotide vocabulary: <cls> <pad> <eos> <unk> A T C G <mask> (ids 0-8); the text is cleaned
    (clean_sequence) and any other letter is <unk>."""

    name = "nuc"

    def __init__(self):
        super().__init__(HELM_SPECIALS + list(BASES) + ["<mask>"], HELM_ROLES)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, self.unk) for c in clean_sequence(text)]


KMER_SIZES = {"3mer": 3, "6mer": 6}
SEQUENCE_TOKENIZERS = ("nucleotide", "nuc", "3mer", "6mer")  # each sequence stored as <begin> tokens <end>


class KmerTokenizer(SequenceTokenizer):
    """HELM's k-mer vocabularies: 3mer is <cls> <pad> <eos> <unk>, the 64 codons (ids 4-67), <mask> <distill_token>
    (70 ids); 6mer is <cls> <pad> <eos> <unk> <mask>, then the 4096 6-mers (ids 5-4100). K-mers are listed in
    genetic_code.kmers order.

    The cleaned text (clean_sequence) is read in k-mers that start every k - overlap letters; a trailing partial k-mer
    is dropped and a k-mer not in the vocabulary (holding N, say) is <unk>.
    """

    def __init__(self, k: int, overlap: int = 0):
        if k not in KMER_SIZES.values():
            raise ConfigError(f"there is no {k}-mer vocabulary; use k = 3 (3mer) or 6 (6mer)")
        if not 0 <= overlap < k:
            raise ConfigError(f"--kmer_overlap {overlap} is out of range for {k}-mers; use 0 to {k - 1}")
        self.name, self.k, self.overlap = f"{k}mer", k, overlap
        if k == 3:
            super().__init__(HELM_SPECIALS + kmers(3) + ["<mask>", "<distill_token>"],
                             {**HELM_ROLES, "distill": "<distill_token>"})
        else:
            super().__init__(HELM_SPECIALS + ["<mask>"] + kmers(6), HELM_ROLES)

    def encode(self, text: str) -> list[int]:
        seq, step = clean_sequence(text), self.k - self.overlap
        return [self.index.get(seq[i:i + self.k], self.unk) for i in range(0, len(seq) - self.k + 1, step)]

    def decode(self, ids: list[int]) -> str:
        """Special ids decode to their names. A k-mer (or <unk>, which stands for one) right after another adds only
        its last k - overlap letters; any other k-mer is written in full."""
        pieces, after_kmer = [], False
        for i in ids:
            text = self.token_text(i)
            pieces.append(self.tokens[i] if text is None else text[self.overlap:] if after_kmer else text)
            after_kmer = text is not None or i == self.unk
        return "".join(pieces)

    def meta(self) -> dict:
        return {**super().meta(), "kmer_overlap": self.overlap}


def tokenizer_from_meta(meta: dict):
    """The tokenizer a prepared dataset was written with."""
    kind = meta["tokenizer"]
    if kind == "char":
        return CharTokenizer(meta["chars"], end_of_text=meta.get("eot") is not None)
    if kind == "byte":
        return ByteTokenizer(upper=meta.get("upper", False))
    if kind == "nucleotide":
        return NucleotideTokenizer()
    if kind == "nuc":
        return NucTokenizer()
    if kind in KMER_SIZES:
        return KmerTokenizer(KMER_SIZES[kind], meta.get("kmer_overlap", 0))
    return GPT2Tokenizer()

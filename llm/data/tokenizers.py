"""Tokenizers, chosen by name and recorded in each prepared dataset's meta.json."""
import tiktoken

from ..config import ConfigError

END_OF_TEXT = "<|endoftext|>"
TOKENIZER_KEYS = ("tokenizer", "vocab_size", "eot", "chars", "upper")  # the meta.json keys that define a tokenizer


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

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size, "eot": self.eot, "upper": self.upper}


def tokenizer_from_meta(meta: dict):
    """The tokenizer a prepared dataset was written with."""
    if meta["tokenizer"] == "char":
        return CharTokenizer(meta["chars"], end_of_text=meta.get("eot") is not None)
    if meta["tokenizer"] == "byte":
        return ByteTokenizer(upper=meta.get("upper", False))
    return GPT2Tokenizer()

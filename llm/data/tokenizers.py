"""Tokenizers, chosen by name and recorded in each prepared dataset's meta.json."""
import tiktoken


class CharTokenizer:
    """One token per character of the corpus; the vocabulary is saved with the data."""

    name = "char"

    def __init__(self, chars: list[str]):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    @classmethod
    def fit(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size, "chars": self.chars}


class GPT2Tokenizer:
    """GPT-2's BPE through tiktoken (r50k_base: the same ranks, loadable offline from TIKTOKEN_CACHE_DIR)."""

    name = "gpt2"

    def __init__(self):
        self.encoding = tiktoken.get_encoding("r50k_base")
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size}


def tokenizer_from_meta(meta: dict):
    """The tokenizer a prepared dataset was written with."""
    return CharTokenizer(meta["chars"]) if meta["tokenizer"] == "char" else GPT2Tokenizer()

"""Shared helpers for the tests."""
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from llm.config import BlockConfig, LLMconfig, resolve_block
from llm.model.arch import ARCHS
from llm.validate import validate_model

SHARED = Path(os.environ.get("LLM_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))  # GPT-2 BPE ranks, offline


def make_config(layers: list[dict] | dict | None = None, **model_fields) -> LLMconfig:
    """A validated small model config; `layers` is one spec (repeated n_layer times) or a list of specs."""
    fields = dict(vocab_size=97, block_size=32, n_embd=48, n_layer=2, dropout=0.0)
    fields.update(model_fields)
    specs = layers if isinstance(layers, list) else [layers or {}] * fields["n_layer"]
    fields["n_layer"] = len(specs)
    stage = ARCHS[fields.get("arch", "gpt")].layer_config  # the width each layer is built at
    blocks = [resolve_block(BlockConfig(**spec), stage(LLMconfig(**fields), i).n_embd) for i, spec in enumerate(specs)]
    config = LLMconfig(**fields, layers=blocks)
    validate_model(config)
    return config


def objectives_served(spec: dict) -> list[str]:
    """The objectives a mixer example runs under: its kind's direction (MixerKind.direction) picks clm, mlm or
    both."""
    from llm.model.registry import MIXERS

    return {"both": ["clm", "mlm"], "causal": ["clm"], "bidirectional": ["mlm"]}[MIXERS[spec["attn"]].direction]


@pytest.fixture
def eager_flex(monkeypatch):
    """FlexAttention uncompiled (the same function; compiling takes seconds per shape on CPU)."""
    from llm.model.mixers import attention as kernels

    monkeypatch.setattr(kernels, "compiled_flex", lambda device_type: flex_attention)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory) -> Path:
    """Tiny Shakespeare prepared with the byte tokenizer (one token per UTF-8 byte), in a temporary data folder."""
    from llm.data.prepare import PrepareArgs, prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare_byte"
    prepare(PrepareArgs(name="shakespeare", tokenizer="byte", source=str(SHAKESPEARE), out=str(out), workers=1))
    return out


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> Path:
    """Tiny Shakespeare prepared with the char tokenizer, in a temporary data folder."""
    from llm.data.prepare import PrepareArgs, prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    prepare(PrepareArgs(name="shakespeare_char", source=str(SHAKESPEARE), out=str(out), workers=1))
    return out

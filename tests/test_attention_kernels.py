"""The attention kernel dispatch: the flash-attn path's layout logic, checked on CPU with a reference kernel."""
import math

import pytest
import torch

from llm.model import LLM
from llm.model.mixers import attention as kernels
from tests.conftest import make_config


def reference_flash_attn(q, k, v, dropout_p=0.0, causal=True, softmax_scale=None):
    """flash_attn_func's contract on (B, T, H, D) queries over (B, S, KV, D) keys with KV dividing H, by explicit
    scores; the causal mask is aligned to the bottom right when S > T."""
    assert causal and dropout_p == 0.0
    B, T, H, D = q.shape
    S = k.size(1)
    k = k.repeat_interleave(H // k.size(2), dim=2)  # (B, S, H, D)
    v = v.repeat_interleave(H // v.size(2), dim=2)  # (B, S, H, Dv)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * (softmax_scale or 1 / math.sqrt(D))  # (B, H, T, S)
    mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhts,bshd->bthd", weights, v)  # (B, T, H, Dv)


@pytest.mark.parametrize("spec", [dict(attn="mha", n_head=4), dict(attn="gqa", n_head=4, n_kv_heads=2),
                                  dict(attn="mqa", n_head=4), dict(attn="mla", n_head=4, kv_latent_dim=16)])
def test_flash_path_equals_sdpa_path(spec, monkeypatch):
    config = make_config(spec, pos_emb="learn" if spec["attn"] == "mla" else "rope")
    model = LLM(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, config.block_size))
    with torch.no_grad():
        sdpa_logits = model(idx).logits
        calls = []
        monkeypatch.setattr(kernels, "flash_attn_func", lambda *a, **kw: calls.append(1) or reference_flash_attn(*a, **kw))
        monkeypatch.setattr(kernels, "flash_usable", lambda q, v: True)
        flash_logits = model(idx).logits
    assert len(calls) == config.n_layer
    torch.testing.assert_close(flash_logits, sdpa_logits, rtol=1e-5, atol=1e-5)


def test_sdpa_backend_never_uses_flash(monkeypatch):
    monkeypatch.setattr(kernels, "flash_usable", lambda q, v: True)
    monkeypatch.setattr(kernels, "flash_attn_func", lambda *a, **kw: pytest.fail("flash used with backend sdpa"))
    model = LLM(make_config(dict(attn="gqa", n_head=4, n_kv_heads=2), attn_backend="sdpa"))
    model(torch.zeros(1, 8, dtype=torch.long))


def test_forced_flash_without_cuda_is_a_clear_error():
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="attn_backend=flash needs flash-attn"):
        kernels.causal_attention(q, q, q, "flash", 0.0)

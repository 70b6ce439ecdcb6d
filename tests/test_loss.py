"""The chunked cross-entropy (llm/model/chunked_loss.py): the loss and its gradients equal the plain
`F.cross_entropy` of the full logits, and training keeps no (tokens x vocabulary) tensor for backward."""
import pytest
import torch
import torch.nn.functional as F

from llm.model import LLM, build_model
from llm.model.chunked_loss import linear_cross_entropy
from llm.targets import IGNORE
from tests.conftest import make_config

N, C, V, V_PADDED = 60, 16, 97, 128


def assert_close_relative(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6) -> None:
    """|got - expected| within rtol of the largest |expected| entry."""
    error, largest = (got - expected).abs().max().item(), expected.abs().max().item()
    assert error <= rtol * largest, f"max error {error:.3g} vs largest |expected| {largest:.3g}"


def plain_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference: full logits sliced to the vocabulary, then F.cross_entropy."""
    return F.cross_entropy((hidden @ weight.T)[:, :V], targets, ignore_index=IGNORE)


def loss_and_grads(loss_fn, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_fn(hidden, weight, targets)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, C), a head weight (V_PADDED, C) with padding rows, targets (N,) with some ignored."""
    targets = torch.randint(0, V, (N,))
    targets[[3, 17, 59]] = IGNORE
    return torch.randn(N, C, dtype=dtype), torch.randn(V_PADDED, C, dtype=dtype), targets


@pytest.mark.parametrize("chunk", [1, 7, 20, N, 1000])  # 7 does not divide the 60 tokens
def test_chunked_loss_and_gradients_equal_the_plain_ones(chunk):
    hidden, weight, targets = inputs()
    expected = loss_and_grads(plain_loss, hidden, weight, targets)
    got = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, V, IGNORE, chunk), hidden, weight, targets)
    for g, e in zip(got, expected):
        assert_close_relative(g, e)
    assert not got[2][V:].any(), "padding rows of the head get no gradient"


@pytest.mark.parametrize("chunk", [7, 1000])
def test_token_weights_multiply_each_terms_loss_and_gradient(chunk):
    """With per-token weights w, the loss is sum(w * cross-entropy) over the counted tokens / their count."""
    hidden, weight, targets = inputs()
    w = torch.rand(N) * 2

    def weighted(h, w_, t):
        per_token = F.cross_entropy((h @ w_.T)[:, :V], t, ignore_index=IGNORE, reduction="none")  # (N,)
        return (per_token * w).sum() / (t != IGNORE).sum()

    expected = loss_and_grads(weighted, hidden, weight, targets)
    got = loss_and_grads(lambda h, w_, t: linear_cross_entropy(h, w_, t, V, IGNORE, chunk, w), hidden, weight, targets)
    for g, e in zip(got, expected):
        assert_close_relative(g, e)
    ones = linear_cross_entropy(hidden, weight, targets, V, IGNORE, chunk, torch.ones(N))
    assert torch.equal(ones, linear_cross_entropy(hidden, weight, targets, V, IGNORE, chunk))


def test_chunked_loss_passes_gradcheck_in_float64():
    hidden, weight, targets = inputs(torch.float64)
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, targets, V, IGNORE, 7),
                                    (hidden.requires_grad_(), weight.requires_grad_()), fast_mode=True)


def test_without_gradients_the_chunked_loss_equals_the_plain_one():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        assert_close_relative(linear_cross_entropy(hidden, weight, targets, V, IGNORE, 7),
                              plain_loss(hidden, weight, targets))


def test_all_targets_ignored_gives_nan_loss_and_zero_gradients_like_cross_entropy():
    hidden, weight, _ = inputs()
    targets = torch.full((N,), IGNORE)
    loss, d_hidden, d_weight = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, V, IGNORE, 7),
                                              hidden, weight, targets)
    assert loss.isnan() and plain_loss(hidden, weight, targets).isnan()
    assert not d_hidden.any() and not d_weight.any()


def model_loss_and_grads(model: LLM, idx: torch.Tensor, targets: torch.Tensor, return_logits: bool):
    model.zero_grad(set_to_none=True)
    out = model(idx, targets, return_logits=return_logits)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [5, 8, None])  # of 2 x 16 tokens: 5 does not divide them, 8 does
def test_model_loss_and_gradients_of_every_parameter_equal_the_plain_ones(tie, chunk):
    model = build_model(make_config({"attn": "gqa", "n_head": 4, "n_kv_heads": 2}, block_size=16, tie_embeddings=tie))
    model.objective.chunk = chunk
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    targets[0, :3] = IGNORE
    plain_loss_, plain_grads = model_loss_and_grads(model, idx, targets, return_logits=True)
    loss, grads = model_loss_and_grads(model, idx, targets, return_logits=False)
    assert_close_relative(loss, plain_loss_)
    assert grads.keys() == plain_grads.keys() and ("lm_head.weight" in grads) != tie
    for name in grads:
        assert_close_relative(grads[name], plain_grads[name])


def test_logits_are_returned_without_targets_or_when_asked_for():
    model = build_model(make_config(block_size=16))
    idx = torch.randint(0, 97, (2, 16))
    assert model(idx).logits.shape == (2, 16, 97) and model(idx).loss is None
    assert model(idx, idx).logits is None
    out = model(idx, idx, return_logits=True)
    assert out.logits.shape == (2, 16, 97)
    torch.testing.assert_close(out.loss, model(idx, idx).loss, rtol=1e-6, atol=0)


def largest_saved_tensor(model: LLM, idx: torch.Tensor, return_logits: bool) -> int:
    """Elements of the largest tensor the training forward saves for backward."""
    sizes = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(idx, idx, return_logits=return_logits).loss.backward()
    return max(sizes)


def test_training_forward_saves_no_tensor_of_tokens_by_vocabulary():
    B, T, vocab = 4, 64, 500
    model = build_model(make_config({"attn": "gqa", "n_head": 4, "n_kv_heads": 2}, vocab_size=vocab, block_size=T,
                            n_embd=32)).train()
    idx = torch.randint(0, vocab, (B, T))
    assert largest_saved_tensor(model, idx, return_logits=True) >= B * T * vocab  # the plain loss keeps its logits
    assert largest_saved_tensor(model, idx, return_logits=False) < B * T * vocab

"""Every cross-field check in one place. Each failure is a ConfigError naming the field, value and fix."""
import importlib.util
import re
from dataclasses import replace

from .errors import ConfigError
from .expr import eval_int_expr
from .schema import BlockConfig, LLMconfig, Trainconfig


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def resolve_block(block: BlockConfig, n_embd: int) -> BlockConfig:
    """Fills derived per-layer defaults (up_dim = 4 * n_embd when unset)."""
    return replace(block, up_dim=4 * n_embd) if block.up_dim is None else block


def validate_block(b: BlockConfig, m: LLMconfig, where: str) -> None:
    """Checks the values of one layer that apply to its attention and feed-forward kinds.

    `where` prefixes each message (a file and line, or '' for flags).
    """
    where = f"{where}: " if where else ""
    _require(b.n_head >= 1, f"{where}n_head={b.n_head} must be >= 1")
    _require(m.n_embd % b.n_head == 0,
             f"{where}n_head={b.n_head} does not divide n_embd={m.n_embd}; choose n_head dividing n_embd")
    head_size = m.n_embd // b.n_head
    if b.attn == "gqa":
        _require(b.n_kv_heads is not None, f"{where}attn=gqa needs n_kv_heads; set --n_kv_heads (a divisor of n_head)")
        _require(b.n_kv_heads >= 1 and b.n_head % b.n_kv_heads == 0,
                 f"{where}n_kv_heads={b.n_kv_heads} does not divide n_head={b.n_head}; choose a divisor of n_head")
    if b.attn in ("mha", "mqa", "gqa") and m.pos_emb == "rope":
        _require(head_size % 2 == 0,
                 f"{where}pos_emb=rope needs an even head size, got n_embd/n_head={head_size}; change n_head or n_embd")
    if b.attn == "mla":
        _require(b.kv_latent_dim is not None and b.kv_latent_dim >= 1,
                 f"{where}attn=mla needs kv_latent_dim >= 1, got {b.kv_latent_dim}; set --kv_latent_dim")
        _require(b.q_latent_dim is None or b.q_latent_dim >= 0,
                 f"{where}q_latent_dim={b.q_latent_dim} must be >= 0 (0 or unset: no query compression)")
        if m.pos_emb == "rope":
            _require(m.attn_backend != "flash",
                     f"{where}attn=mla with pos_emb=rope has query/key heads wider than value heads, which flash-attn "
                     "does not run; use --attn_backend auto")
            _require(b.rope_head_dim is not None and b.rope_head_dim >= 2 and b.rope_head_dim % 2 == 0,
                     f"{where}attn=mla with pos_emb=rope needs an even rope_head_dim >= 2, got {b.rope_head_dim}; set --rope_head_dim")
    _require(b.up_dim is not None and b.up_dim >= 1, f"{where}up_dim={b.up_dim} must be >= 1")
    if b.moe:
        _require(b.n_exp >= b.n_act > b.n_shared >= 0,
                 f"{where}moe needs n_exp >= n_act > n_shared >= 0, got n_exp={b.n_exp}, n_act={b.n_act}, "
                 f"n_shared={b.n_shared}; each token uses n_act experts, n_shared of them shared")
        _require(not (b.norm_topk and b.n_act - b.n_shared == 1),
                 f"{where}norm_topk with n_act - n_shared = 1 routed expert per token makes every gate weight 1, so the "
                 "router learns nothing from the language-model loss; use --no_norm_topk or raise n_act")
        for name in ("coeff", "alpha", "gamma"):
            value = getattr(b, name)
            _require(value >= 0, f"{where}{name}={value} must be >= 0")


def validate_model(m: LLMconfig, wheres: list[str] | None = None) -> None:
    """Checks model-wide values and every layer; `wheres[i]` tells where layer i was specified."""
    _require(m.vocab_size is None or m.vocab_size >= 1, f"vocab_size={m.vocab_size} must be >= 1")
    for name in ("block_size", "n_embd", "n_layer"):
        value = getattr(m, name)
        _require(value >= 1, f"{name}={value} must be >= 1")
    _require(0.0 <= m.dropout < 1.0, f"dropout={m.dropout} must be in [0, 1)")
    _require(m.rope_theta > 0, f"rope_theta={m.rope_theta} must be > 0")
    _require(m.norm_eps > 0, f"norm_eps={m.norm_eps} must be > 0")
    _require(len(m.layers) == m.n_layer,
             f"n_layer={m.n_layer} but {len(m.layers)} layer specs were given; make them equal or omit --n_layer")
    if m.attn_backend == "flash":
        _require(importlib.util.find_spec("flash_attn") is not None,
                 "attn_backend=flash but flash-attn is not installed; pip install 'llm[flash]' or use --attn_backend auto")
    wheres = wheres or [f"layer {i}" for i in range(m.n_layer)]
    for block, where in zip(m.layers, wheres):
        validate_block(block, m, where)


def total_batch_tokens(t: Trainconfig) -> int:
    """Tokens per optimizer step, from the total_batch_size_str expression."""
    return eval_int_expr(t.total_batch_size_str, "total_batch_size_str")


def validate_train(t: Trainconfig, m: LLMconfig) -> None:
    """Checks the run's values, including that the batch splits into whole micro-steps."""
    for name, low in (("batch_size", 1), ("max_iters", 0), ("warmup_steps", 0), ("eval_interval", 1),
                      ("eval_iters", 1), ("ckpt_interval", 1), ("log_interval", 1),
                      ("keep_last", 1)):
        value = getattr(t, name)
        _require(value >= low, f"{name}={value} must be >= {low}")
    _require(t.learning_rate > 0, f"learning_rate={t.learning_rate} must be > 0")
    _require(t.min_lr is None or 0 <= t.min_lr <= t.learning_rate,
             f"min_lr={t.min_lr} must be in [0, learning_rate={t.learning_rate}]")
    for name in ("beta1", "beta2"):
        value = getattr(t, name)
        _require(0 <= value < 1, f"{name}={value} must be in [0, 1)")
    _require(t.weight_decay >= 0, f"weight_decay={t.weight_decay} must be >= 0")
    _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None,
             f"device={t.device!r} is not a device; use auto, cpu, cuda or cuda:N")
    _require(t.init_from is None or (t.init_from.startswith("hf:") and len(t.init_from) > 3),
             f"init_from={t.init_from!r} is not supported; use hf:DIR (a transformers model directory)")
    _require(t.grad_clip >= 0, f"grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    total = total_batch_tokens(t)
    micro = t.batch_size * m.block_size
    _require(total > 0 and total % micro == 0,
             f"total_batch_size_str={t.total_batch_size_str!r} = {total} tokens is not a positive multiple of "
             f"batch_size * block_size = {micro}; change one of them")


def validate(m: LLMconfig, t: Trainconfig, wheres: list[str] | None = None) -> None:
    """The one validation step for a resolved model and run."""
    validate_model(m, wheres)
    validate_train(t, m)

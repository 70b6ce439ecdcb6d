"""Native sparse attention (`attn: nsa`), after Yuan et al., "Native Sparse Attention: Hardware-Aligned and Natively
Trainable Sparse Attention" (2025).

Each query attends through three branches, each with its own keys and values, and adds them under learned
per-head sigmoid gates:
  - compression: every block of compress_block_size keys (blocks start compress_stride apart) becomes one key by a
    learned MLP; a query sees the blocks that end at or before it;
  - selection: the query's KV group scores the selection blocks from the compression branch's attention
    probabilities (summed over the group's heads), keeps the top num_selected_blocks (always the first block and
    the query's own block) and attends to their tokens, causally;
  - sliding window: the last sliding_window_size tokens.

This is the plain PyTorch form: every branch is a masked dense attention over all keys (memory O(T·S) per head),
exact but without the paper's sparse kernels. All shapes follow from the sequence length and the config, so the
layer compiles whole.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ...config import BlockConfig, LLMconfig, require
from ..cache import TokenCache
from ..kinds import MixerKind, attention_flops
from ..positions import RopeScaling, apply_rope, rope_angles
from .attention import check_heads

BRANCHES = 3  # compression, selection, sliding window
KEYS_VALUES = 2 * BRANCHES  # per token: the compression, selection and window branches' key and value


class NSACache(TokenCache):
    """Per token and KV head, the six raw keys and values of the three branches, (B, max_len, KV, head_size) each:
    the compression branch's (unrotated: compressed blocks are recomputed from them at each call), then the
    selection branch's and the window branch's (rotated when RoPE is on)."""

    def __init__(self, batch: int, max_len: int, n_kv: int, head_size: int, dtype: torch.dtype, device: torch.device):
        super().__init__(batch, max_len, [(n_kv, head_size)] * KEYS_VALUES, dtype, device)


class BlockCompressor(nn.Module):
    """One learned summary per block: block (l, D) + intra-block position embedding (l, D), flattened, through
    Linear(l·D, D), GELU, Linear(D, D)."""

    def __init__(self, block_size: int, head_size: int, bias: bool):
        super().__init__()
        self.position = nn.Parameter(torch.randn(block_size, head_size) * 0.02)  # (l, D)
        self.up = nn.Linear(block_size * head_size, head_size, bias=bias)
        self.down = nn.Linear(head_size, head_size, bias=bias)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks (..., l, D) -> (..., D)."""
        flat = (blocks + self.position.to(blocks.dtype)).flatten(-2)  # (..., l·D)
        return self.down(F.gelu(self.up(flat)))  # (..., D)


def overlap_weights(n_compressed: int, n_selection: int, block: int, stride: int, selection_block: int,
                    device: torch.device) -> torch.Tensor:
    """(n_compressed, n_selection): tokens that compressed block i ([i·stride, i·stride + block)) shares with
    selection block j ([j·l', (j+1)·l')), divided by the stride. Selection scores are compression probabilities
    times this matrix: with the stride dividing both block sizes, the paper's Eq. 9 (each compressed block counted
    once per stride-long piece of the selection block that it covers)."""
    start = torch.arange(n_compressed, device=device)[:, None] * stride  # (N, 1)
    selection_start = torch.arange(n_selection, device=device)[None, :] * selection_block  # (1, NS)
    shared = (torch.minimum(start + block, selection_start + selection_block)
              - torch.maximum(start, selection_start)).clamp(min=0)  # (N, NS)
    return shared.float() / stride


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q (B, KV, G, T, D) over k, v (B, KV, S, D) where `allowed` (broadcast to
    (B, KV, G, T, S)) is True. A query with no allowed key gets zeros. Returns the output (B, KV, G, T, D) and the
    attention probabilities (B, KV, G, T, S) in fp32."""
    scores = torch.einsum("bkgtd,bksd->bkgts", q, k).float() * scale  # (B, KV, G, T, S)
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = scores.softmax(dim=-1) * allowed  # rows without an allowed key: uniform times 0
    return torch.einsum("bkgts,bksd->bkgtd", probs.to(v.dtype), v), probs  # (B, KV, G, T, D), (B, KV, G, T, S)


def choose_blocks(scores: torch.Tensor, query_pos: torch.Tensor, selection_block: int, n_selected: int,
                  causal: bool) -> torch.Tensor:
    """Which selection blocks each query of a KV group attends to: scores (B, KV, T, NS) of the group, query
    positions (B or 1, T) -> (B, KV, T, NS) bool. The first block and the query's own block are always chosen; the
    rest are the highest-scoring blocks that start at or before the query (all blocks when not causal), ties going to
    the earlier block."""
    n_blocks = scores.size(-1)
    block = torch.arange(n_blocks, device=scores.device)  # (NS,)
    own = (query_pos // selection_block)[:, None, :, None]  # (B or 1, 1, T, 1)
    forced = (block == 0) | (block == own)  # (B or 1, 1, T, NS)
    started = block * selection_block <= query_pos[:, None, :, None] if causal else torch.ones_like(forced)
    ranked = torch.where(forced, float("inf"), torch.where(started, scores, float("-inf")))  # (B, KV, T, NS)
    top = ranked.sort(dim=-1, descending=True, stable=True).indices[..., :min(n_selected, n_blocks)]  # (B, KV, T, n)
    return torch.zeros_like(ranked, dtype=torch.bool).scatter(-1, top, True)  # (B, KV, T, NS)


class NativeSparseAttention(nn.Module):
    """NSA over n_head query heads sharing n_kv_heads groups (n_head when unset) of head size n_embd // n_head.

    One projection gives the queries; one gives the three branches' keys and values (KV heads each); a gate
    Linear(n_embd, 3·n_head) gives each head's three branch weights (sigmoid). With RoPE the queries and the
    selection and window keys are rotated at their positions, and each compressed key at the position of its
    block's last token (the compressor reads unrotated keys).
    """

    def __init__(self, block: BlockConfig, config: LLMconfig):
        super().__init__()
        self.n_head, self.n_kv = block.n_head, block.n_kv_heads or block.n_head
        self.head_size = hs = config.n_embd // block.n_head
        self.block, self.stride = block.compress_block_size, block.compress_stride or block.compress_block_size
        self.selection_block, self.n_selected = block.selection_block_size, block.num_selected_blocks
        self.window = block.sliding_window_size
        self.q_proj = nn.Linear(config.n_embd, self.n_head * hs, bias=config.bias)
        self.kv_proj = nn.Linear(config.n_embd, KEYS_VALUES * self.n_kv * hs, bias=config.bias)
        self.compress_k = BlockCompressor(self.block, hs, config.bias)
        self.compress_v = BlockCompressor(self.block, hs, config.bias)
        self.gate = nn.Linear(config.n_embd, BRANCHES * self.n_head, bias=config.bias)
        self.c_proj = nn.Linear(self.n_head * hs, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.causal = True  # set by the model from its objective (False: bidirectional, masked LM)
        self.rope_theta = config.rope_theta if config.pos_emb == "rope" else None
        self.rope_scaling = RopeScaling.of(config)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> NSACache:
        return NSACache(batch, max_len, self.n_kv, self.head_size, dtype, device)

    def compress(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compressed keys and values (B, KV, N, D) of the N = ceil(S / stride) blocks starting in raw k, v
        (B, KV, S, D), and each block's last position (N,); blocks running past the end read zeros (never seen)."""
        S = k.size(2)
        n = -(-S // self.stride)
        extra = (n - 1) * self.stride + self.block - S  # zeros after the end so that every block is whole
        k, v = (F.pad(t, (0, 0, 0, extra)).unfold(2, self.block, self.stride) for t in (k, v))  # (B, KV, N, D, l)
        ends = torch.arange(n, device=k.device) * self.stride + self.block - 1  # (N,)
        return self.compress_k(k.transpose(-1, -2)), self.compress_v(v.transpose(-1, -2)), ends  # (B, KV, N, D) x2

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                cache: NSACache | None = None) -> torch.Tensor:
        """x (B, T, C) at positions (B or 1, T); with a cache, attends over the cached tokens as well. With a padding
        mask (left-padded rows) each row's tokens are realigned to start at its first real token."""
        B, T, _ = x.shape
        H, KV, hs = self.n_head, self.n_kv, self.head_size
        q = self.q_proj(x).view(B, T, H, hs)  # (B, T, H, hs)
        k_cmp, v_cmp, k_slc, v_slc, k_win, v_win = self.kv_proj(x).view(B, T, KEYS_VALUES, KV, hs).unbind(2)
        if self.rope_theta is not None:
            cos, sin = rope_angles(positions, hs, self.rope_theta, self.rope_scaling)
            q, k_slc, k_win = (apply_rope(t, cos, sin) for t in (q, k_slc, k_win))
        raw = (k_cmp, v_cmp, k_slc, v_slc, k_win, v_win)  # (B, T, KV, hs) each
        if cache is not None:
            raw = cache.append(*raw)  # (B, S, KV, hs) each
            if mask is not None:
                raw = from_first_real_token(raw, positions)
        q = q.view(B, T, KV, H // KV, hs).permute(0, 2, 3, 1, 4)  # (B, KV, G, T, hs)
        y = self.branches(q, *(t.transpose(1, 2) for t in raw), positions)  # (B, KV, 3, G, T, hs)
        y = y.permute(0, 4, 2, 1, 3, 5).reshape(B, T, BRANCHES, H, hs)  # (B, T, 3, H, hs), head h = kv·G + g
        gates = torch.sigmoid(self.gate(x)).view(B, T, BRANCHES, H, 1)  # (B, T, 3, H, 1)
        y = (gates * y).sum(dim=2)  # (B, T, H, hs)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, H * hs)))  # (B, T, C)

    def branches(self, q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
                 v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """The three branches' outputs (B, KV, 3, G, T, hs) for queries q (B, KV, G, T, hs) at positions (B or 1, T)
        over the raw keys and values (B, KV, S, hs) of positions 0..S-1."""
        S, hs = k_slc.size(2), self.head_size
        key_pos = torch.arange(S, device=q.device)  # (S,)
        query_pos = positions[:, None, None, :, None]  # (B or 1, 1, 1, T, 1)
        if self.causal:
            seen = key_pos <= query_pos  # (B or 1, 1, 1, T, S)
            in_window = seen & (key_pos > query_pos - self.window)
        else:
            seen = torch.ones_like(key_pos, dtype=torch.bool)
            in_window = (key_pos - query_pos).abs() < self.window
        k_cmp, v_cmp, ends = self.compress(k_cmp, v_cmp)  # (B, KV, N, hs) x2, (N,)
        if self.rope_theta is not None:
            cos, sin = rope_angles(ends[None], hs, self.rope_theta, self.rope_scaling)  # (1, N, 1, hs) each
            k_cmp = apply_rope(k_cmp, cos.transpose(1, 2), sin.transpose(1, 2))
        scale = hs ** -0.5
        complete = ends <= (query_pos if self.causal else S - 1)  # (B or 1, 1, 1, T, N)
        y_cmp, probs = attend(q, k_cmp, v_cmp, complete, scale)  # (B, KV, G, T, hs), (B, KV, G, T, N)
        n_selection = -(-S // self.selection_block)
        weights = overlap_weights(probs.size(-1), n_selection, self.block, self.stride, self.selection_block,
                                  q.device)  # (N, NS)
        scores = probs.detach().sum(dim=2) @ weights  # (B, KV, T, NS): shared by the heads of a group
        chosen = choose_blocks(scores, positions, self.selection_block, self.n_selected, self.causal)  # (B, KV, T, NS)
        selected = chosen[..., key_pos // self.selection_block][:, :, None] & seen  # (B, KV, 1, T, S)
        y_slc, _ = attend(q, k_slc, v_slc, selected, scale)  # (B, KV, G, T, hs)
        y_win, _ = attend(q, k_win, v_win, in_window, scale)  # (B, KV, G, T, hs)
        return torch.stack((y_cmp, y_slc, y_win), dim=2)  # (B, KV, 3, G, T, hs)


def from_first_real_token(tensors: tuple[torch.Tensor, ...], positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cached tensors (B, S, ...) of left-padded rows shifted left so that index p holds position p of each row
    (the slots past a row's end repeat its last token; no query sees them). A row's padding is read from the
    position of its last query, which is always a real token."""
    S = tensors[0].size(1)
    pad = S - 1 - positions[:, -1]  # (B,)
    index = (torch.arange(S, device=positions.device)[None] + pad[:, None]).clamp(max=S - 1)  # (B, S)
    return tuple(t.gather(1, index.view(*index.shape, *[1] * (t.dim() - 2)).expand_as(t)) for t in tensors)


def validate(block: BlockConfig, config: LLMconfig) -> None:
    """Heads and KV groups divide evenly, RoPE has an even head size, and the block sizes are positive with the
    stride at most the compression block and at least two selected blocks."""
    check_heads(block, config)
    require(block.n_kv_heads is None or (block.n_kv_heads >= 1 and block.n_head % block.n_kv_heads == 0),
            f"n_kv_heads={block.n_kv_heads} does not divide n_head={block.n_head}; choose a divisor of n_head "
            "(unset: n_head)")
    head_size = config.n_embd // block.n_head
    if config.pos_emb == "rope":
        require(head_size % 2 == 0, f"pos_emb=rope needs an even head size, got n_embd/n_head={head_size}; "
                                    "change n_head or n_embd")
    for name in ("compress_block_size", "selection_block_size", "sliding_window_size"):
        value = getattr(block, name)
        require(value >= 1, f"attn=nsa needs {name} >= 1, got {value}; set --{name}")
    stride = block.compress_stride
    require(stride is None or 1 <= stride <= block.compress_block_size,
            f"compress_stride={stride} must be in [1, compress_block_size={block.compress_block_size}] (a larger "
            "stride skips tokens); lower it or leave it unset")
    require(block.num_selected_blocks >= 2,
            f"num_selected_blocks={block.num_selected_blocks} must be >= 2 (the first block and the query's own "
            "block are always selected); raise it")


def mixing_flops(block: BlockConfig, config: LLMconfig) -> float:
    """The three branches' attention as the method defines it (not this dense form's masked work): ceil(T / stride)
    compressed keys, the selected blocks' tokens and the window's, with heads of n_embd // n_head."""
    T, head = config.block_size, config.n_embd // block.n_head
    compressed = -(-T // (block.compress_stride or block.compress_block_size))
    selected = min(block.num_selected_blocks * block.selection_block_size, T)
    keys = compressed + selected + min(block.sliding_window_size, T)
    return attention_flops(keys, block.n_head, head, head)


NSA = MixerKind("nsa", NativeSparseAttention, validate, {
    "nsa": dict(attn="nsa", n_head=4, n_kv_heads=2, compress_block_size=4, selection_block_size=4,
                num_selected_blocks=4, sliding_window_size=32),
    "nsa_strided": dict(attn="nsa", n_head=4, n_kv_heads=2, compress_block_size=4, compress_stride=2,
                        selection_block_size=2, num_selected_blocks=3, sliding_window_size=3),
}, mixing_flops=mixing_flops)

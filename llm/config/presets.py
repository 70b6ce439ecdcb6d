"""Named starting points: `--preset NAME` sets the defaults that flags then override."""
from .schema import BlockConfig, LLMconfig, Trainconfig

PRESETS: dict[str, tuple[LLMconfig, BlockConfig, Trainconfig]] = {
    # A small model that trains on a laptop CPU in minutes.
    "tiny": (LLMconfig(), BlockConfig(), Trainconfig()),
    # GPT-2 small: 124M parameters with its 50257-token vocabulary (gelu_tanh is GPT-2's GELU), on FineWeb-Edu.
    "gpt2-124m": (
        LLMconfig(vocab_size=50257, block_size=1024, n_embd=768, n_layer=12, pos_emb="learn", norm="layer",
                  bias=True, tie_embeddings=True),
        BlockConfig(attn="mha", n_head=12, up_dim=3072, non_linearity="gelu_tanh"),
        Trainconfig(dataset="fineweb", total_batch_size_str="2**19", batch_size=16, max_iters=600000,
                    learning_rate=6e-4, warmup_steps=2000),
    ),
    # Llama-3-8B's shape on a byte-level (nucleotide) vocabulary of 256 and an 8192-token context.
    "llama3-8b-genomic": (
        LLMconfig(vocab_size=256, block_size=8192, n_embd=4096, n_layer=32, pos_emb="rope", rope_theta=500000.0,
                  norm="rms", bias=False, tie_embeddings=False),
        BlockConfig(attn="gqa", n_head=32, n_kv_heads=8, up_dim=14336, non_linearity="swiglu"),
        Trainconfig(dataset="genomic", total_batch_size_str="2**20", batch_size=1, max_iters=100000,
                    learning_rate=3e-4, warmup_steps=2000, dist="fsdp", act_recomp=True, compile=True),
    ),
}

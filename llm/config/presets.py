"""Named starting points: `--preset NAME` sets the defaults that flags then override."""
from dataclasses import replace

from .schema import BlockConfig, LLMconfig, Trainconfig


def record_long_layers(n_layer: int) -> set[int]:
    """The record GPT's long-window layers: in the first half (n_layer // 2 layers) every fourth from the first
    (L S S S L S for six), mirrored in the second half."""
    first = {i for i in range(n_layer // 2) if i % 4 == 0}
    return first | {n_layer - 1 - i for i in first}


def record_layers(n_layer: int, block: BlockConfig, long: int, short: int) -> list[BlockConfig]:
    """n_layer copies of `block` with the record GPT's long and short windows."""
    return [replace(block, window=long if i in record_long_layers(n_layer) else short) for i in range(n_layer)]


RECORD_TRAIN = dict(optimizer="muon", lr_schedule="trapezoid", cooldown_frac=0.4, warmup_steps=0, beta1=0.8,
                    beta2=0.95, adam_eps=1e-10, weight_decay=0.0, window_schedule="scaled")
"""The record GPT's optimizer (Muon with Adam (0.8, 0.95) on the rest at its rates: our defaults), schedule and
window schedule."""
RECORD_MODEL = dict(pos_emb="rope", norm="rms", bias=False, tie_embeddings=False, x0_mix=True, unet_skips=True,
                    logit_softcap=15.0)
RECORD_BLOCK = BlockConfig(attn="mha", non_linearity="relu2", qk_norm=True)

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
    # bionemo's OpenGenome2 Llama-3 recipe: Llama-3-8B's shape on the nucleotide tokenizer (256 ids), windows of 8192
    # tokens overlapping by 200 with <BOS>/<EOS> on each, labels outside ACGT left out of the loss, AdamW (0.9, 0.95,
    # eps 1e-8) with weight decay 0.1 on matrices but not embeddings, 2,500 warmup steps then cosine to 0.02 x peak,
    # embeddings initialised with std 1.0 (untied), 384 windows per step.
    "llama3-8b-genomic": (
        LLMconfig(vocab_size=256, block_size=8192, n_embd=4096, n_layer=32, pos_emb="rope", rope_theta=500000.0,
                  norm="rms", bias=False, tie_embeddings=False, emb_init_std=1.0),
        BlockConfig(attn="gqa", n_head=32, n_kv_heads=8, up_dim=14336, non_linearity="swiglu"),
        Trainconfig(dataset="genomic", data_order="windows", window_stride=200, window_specials="every",
                    loss_mask="acgt", total_batch_size_str="384*8192", batch_size=2, max_iters=182314,
                    learning_rate=3e-5, min_lr=6e-7, warmup_steps=2500, beta1=0.9, beta2=0.95, adam_eps=1e-8,
                    weight_decay=0.1, decay_embeddings=False, grad_clip=1.0, dist="fsdp", act_recomp=True,
                    compile=True),
    ),
    # HELM's GPT-2 masked LM on codons: 10 layers of width 640, MLP 2560, learned positions over 2048 tokens, the 3mer
    # tokenizer (prepare with --tokenizer 3mer --out data/genomic_3mer), every chosen codon masked with p 0.15.
    "helm-gpt2-mlm": (
        LLMconfig(block_size=2048, n_embd=640, n_layer=10, pos_emb="learn", norm="layer", bias=True,
                  tie_embeddings=True, objective="mlm"),
        BlockConfig(attn="mha", n_head=10, up_dim=2560, non_linearity="gelu_tanh"),
        Trainconfig(dataset="genomic_3mer", data_order="windows", total_batch_size_str="128*2048", batch_size=8,
                    learning_rate=1e-3, min_lr=1e-5, weight_decay=0.1, mask_prob=0.15, mask_strategy="helm"),
    ),
    # nGPT (Loshchilov et al. 2024) at the tiny size: RoPE, SwiGLU, untied embeddings as in the paper, no weight
    # decay and no warmup (the weights stay on the unit sphere).
    "ngpt": (
        LLMconfig(arch="ngpt", pos_emb="rope", tie_embeddings=False),
        BlockConfig(attn="mha", non_linearity="swiglu"),
        Trainconfig(weight_decay=0.0, warmup_steps=0),
    ),
    # The discrete diffusion objectives at the tiny size (docs/diffusion.md): MDLM (masked, loglinear, no time
    # conditioning), SEDD (absorbing graph, time-conditioned) and D3PM (absorbing, T = 1000, hybrid weight 0.01),
    # with rotary positions as MDLM's and SEDD's DiT (a masked position learns from its neighbours only through
    # attention, which learned absolute positions make slow to find).
    "mdlm-tiny": (LLMconfig(objective="mdlm", pos_emb="rope"), BlockConfig(), Trainconfig()),
    "sedd-tiny": (LLMconfig(objective="sedd", pos_emb="rope"), BlockConfig(), Trainconfig()),
    "d3pm-tiny": (LLMconfig(objective="d3pm", pos_emb="rope"), BlockConfig(), Trainconfig()),
    # MegaByte over the bytes of Tiny Shakespeare (docs/byte-models.md): 256-byte contexts in patches of 4, a global
    # model of 2 layers at width 4 x 32 over the 64 patches, a local model of 2 layers at width 128 within each.
    "megabyte-tiny": (
        LLMconfig(arch="megabyte", block_size=256, patch_size=4, n_global_layer=2, global_byte_embd=32),
        BlockConfig(),
        Trainconfig(dataset="shakespeare_byte"),
    ),
    # H-Net over the bytes of Tiny Shakespeare (docs/byte-models.md): one stage, an encoder and a decoder of one
    # layer each around a main network of 4 layers that reads one position in 4 (the ratio loss's target), RoPE.
    "hnet-tiny": (
        LLMconfig(arch="hnet", block_size=256, n_layer=6, pos_emb="rope", hnet_encoder_layers=[1],
                  hnet_decoder_layers=[1], hnet_ratios=[4.0]),
        BlockConfig(),
        Trainconfig(dataset="shakespeare_byte"),
    ),
    # The modded-nanogpt record GPT (docs/record-gpt.md) at a CPU size: 6 layers of 128 over 256 characters, three
    # value-embedding tables, x0 mixing, U-net skips, logits capped at 15, block windows of 16 tokens (long 128,
    # short 64) grown by the scaled schedule, Muon.
    "record-gpt-tiny": (
        LLMconfig(block_size=256, n_layer=6, value_embeds=3, window_unit=16, **RECORD_MODEL,
                  layers=record_layers(6, replace(RECORD_BLOCK, n_head=4), 128, 64)),
        replace(RECORD_BLOCK, n_head=4),
        Trainconfig(window_max=128, window_block=16, **RECORD_TRAIN),
    ),
    # The record itself (KellerJordan/modded-nanogpt, 2025-01-16): 12 layers of 768, 6 heads of 128, a 4x ReLU² MLP,
    # one 64K-token sequence per GPU on 8 GPUs, 1,393 steps, windows of 128-token blocks growing to 1792/896, on
    # FineWeb with the GPT-2 vocabulary; validation reads 10,485,760 tokens (160 sequences).
    "record-gpt": (
        LLMconfig(vocab_size=50257, block_size=65536, n_embd=768, n_layer=12, value_embeds=3, window_unit=128,
                  **RECORD_MODEL, layers=record_layers(12, replace(RECORD_BLOCK, n_head=6, up_dim=3072), 1792, 896)),
        replace(RECORD_BLOCK, n_head=6, up_dim=3072),
        Trainconfig(dataset="fineweb", total_batch_size_str="8*65536", batch_size=1, max_iters=1393,
                    eval_iters=160, window_max=1792, window_block=128, compile=True, **RECORD_TRAIN),
    ),
    # MDLM's OpenWebText model (its configs/model/small.yaml): 12 layers of 768, 12 heads, 1024 tokens, the GPT-2
    # vocabulary plus [MASK], untied head, dropout 0.1; AdamW 3e-4 (0.9, 0.999), no weight decay, 2,500 warmup
    # steps, batch 512, gradient clipping 1; on FineWeb-Edu (OpenWebText has no source here).
    "mdlm-owt": (
        LLMconfig(objective="mdlm", vocab_size=50257, block_size=1024, n_embd=768, n_layer=12, pos_emb="rope",
                  tie_embeddings=False, dropout=0.1),
        BlockConfig(attn="mha", n_head=12),
        Trainconfig(dataset="fineweb", total_batch_size_str="512*1024", batch_size=16, learning_rate=3e-4,
                    min_lr=3e-4, beta2=0.999, weight_decay=0.0, warmup_steps=2500, max_iters=1000000, grad_clip=1.0),
    ),
}

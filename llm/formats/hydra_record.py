"""current_best_gpt of the modded-nanogpt configs: the speedrun's record GPT (KellerJordan/modded-nanogpt, the
2025-01-16 record), mapped onto `arch: gpt` with the record's parts (docs/record-gpt.md).

RoPE, RMSNorm, no biases, an untied head, a 4x ReLU² MLP and QK norm; three value-embedding tables (the first and
the last three layers), x0 mixing, U-net skips, the logit cap 15 (their 30 * sigmoid(z / 7.5) is 15 * tanh(z / 15)
+ 15, the same softmax), and block windows of BLOCK_SIZE tokens: long layers (each half's first and fifth layer,
mirrored in the second half) end at 1728 tokens rounded up to whole blocks (1792), short layers at half that, both
grown by the scaled window schedule.
"""
from dataclasses import replace

from ..config import BlockConfig
from ..config.presets import RECORD_MODEL, RECORD_TRAIN, record_layers
from .common import Unmapped

RECORD_WINDOW = 1728  # tokens the record's window warm-up ends at, before rounding up to whole blocks
RECORD_VALUE_EMBEDS = 3
NOT_REPRODUCED = ("its parameter-free norm of the embedding, its attention scale 0.12, half-truncated RoPE, "
                  "the missing attention of layer 7, zero-initialised projections and head, and document masks")
"""The record's details that the mapped model leaves out (docs/record-gpt.md says why)."""


def record_gpt(model: dict, block: BlockConfig, train: dict, unmapped: Unmapped) -> tuple[dict, list[BlockConfig]]:
    """The record GPT's model settings, per-layer windows and window schedule (train: BLOCK_SIZE as the block)."""
    n_layer, unit = model["n_layer"], train.get("window_block", 128)
    long = -(-RECORD_WINDOW // unit) * unit  # whole blocks: 1792 for blocks of 128
    short = max(unit, long // unit // 2 * unit)
    model.update(RECORD_MODEL, unet_skips=n_layer >= 2, value_embeds=min(RECORD_VALUE_EMBEDS, n_layer // 2),
                 window_unit=unit)
    train.update(window_schedule=RECORD_TRAIN["window_schedule"], window_max=long, window_block=unit)
    unmapped.explain("model_cfg.type=current_best_gpt", f"the record GPT's parts, without {NOT_REPRODUCED} "
                                                        "(docs/record-gpt.md)")
    return model, record_layers(n_layer, replace(block, non_linearity="relu2", qk_norm=True), long, short)

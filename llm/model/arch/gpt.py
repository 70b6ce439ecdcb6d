"""`arch: gpt`: pre-norm residual blocks of the layers' own kinds, as GPT-2 and Llama stack them (`LLM` itself), with
the record GPT's paths from the input as options (`llm/model/shortcuts.py`)."""
from ...config import LLMconfig, require
from ..kinds import ArchKind
from ..llm import LLM
from ..parts import BLOCK_KINDS
from ..shortcuts import value_embed_layers, value_width

FIELDS = ("value_embeds", "x0_mix", "unet_skips")  # the LLMconfig fields only this kind reads
VALUE_KINDS = ("mha", "mqa", "gqa")  # the attention kinds that mix a value embedding into their values


def validate(config: LLMconfig) -> None:
    """value_embeds: k >= 0 tables for 2k <= n_layer layers, each an mha/mqa/gqa layer of the plain block kind, and
    the two layers sharing a table of one value width; unet_skips: at least two layers to pair."""
    k = config.value_embeds
    require(k >= 0, f"value_embeds={k} must be >= 0 (0: none)")
    require(2 * k <= config.n_layer, f"value_embeds={k} tables feed the first and the last {k} layers, which needs "
                                     f"n_layer >= {2 * k}, not {config.n_layer}; lower --value_embeds")
    require(not config.unet_skips or config.n_layer >= 2,
            f"unet_skips pairs the first n_layer // 2 layers with the last, but n_layer={config.n_layer}; add layers "
            "or drop --unet_skips")
    widths: dict[int, int] = {}
    for i, table in value_embed_layers(config.n_layer, k).items():
        block = config.layers[i]
        require(block.attn in VALUE_KINDS, f"layer {i}: value_embeds mixes a table into its attention values, which "
                                           f"attn={block.attn} does not take; use attn in {'/'.join(VALUE_KINDS)} "
                                           "there or lower --value_embeds")
        require(not any(kind.claims(config, i) for kind in BLOCK_KINDS.values()),
                f"layer {i}: value_embeds feeds plain blocks only, not a routed or other block kind (mod); lower "
                "--value_embeds or drop mod there")
        width = value_width(config, i)
        require(widths.setdefault(table, width) == width,
                f"layer {i}: its values are {width} wide but layer {table} shares its value embedding at "
                f"{widths[table]}; give both the same key/value heads and head size")


GPT = ArchKind("gpt", LLM, validate, fields=FIELDS)

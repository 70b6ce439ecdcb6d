"""Conversion to and from Hugging Face transformers, one module per model family.

A model is exported to the one registered family whose configuration fields mean what ours do; anything no family
can represent is refused with the feature that blocks it. transformers is imported only here (pip install 'llm[hf]').

A family is a `Family` record (llm/hf/common.py) in its own module, e.g. llama.py, declaring:
  - the mixer kinds (`attn`), feed-forward kinds (`ffn`) and `pos_emb` values it represents, and `check(config)`
    for its other refusals ("cannot export: ..." with the fix);
  - `config_class` with `hf_fields(config)` (our config -> transformers') and `our_fields(hf_cfg)` (the way back,
    with its "cannot import ..." refusals);
  - its weight map: model-wide and per-layer ("{i}") `Weight` entries pairing a transformers tensor name with our
    tensor's name and, where the layouts differ, a named transform (transposed, q_rows, gate_rows, vocab_rows, ...)
    that gives a view of our tensor, so that export reads it and import copies into it in place.

Adding a family: write llm/hf/NAME.py ending in `NAME = Family(...)`, add it to FAMILIES below, and add a model of it
to FAMILIES in tests/test_hf.py (the parity tests and the weight-map coverage test then run on it).
"""
import dataclasses

import torch

from ..config import ConfigError, LLMconfig, resolve_block
from ..model import ARCHS, LLM, build_model
from ..model.mod import routes
from ..validate import validate_model
from .common import Family, copy_weight, refuse, saved_tensors, weight_pairs
from .deepseek_v3 import DEEPSEEK_V3
from .gpt2 import GPT2
from .llama import LLAMA
from .mamba import MAMBA
from .mistral import MISTRAL
from .mixtral import MIXTRAL
from .qwen import QWEN2, QWEN3

FAMILIES: dict[str, Family] = {f.model_type: f for f in (GPT2, LLAMA, MISTRAL, MIXTRAL, QWEN2, QWEN3, DEEPSEEK_V3, MAMBA)}
"""transformers' model_type -> family; a model exports to the first one that represents it."""

KIND_FIELDS = {"attn": "attention", "ffn": "feed-forward"}
POSITION_NAMES = {"learn": "learned positions", "sin": "sinusoidal positions", "rope": "RoPE", "none": "no positions"}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("Hugging Face export and import need transformers: pip install 'llm[hf]'") from None
    return transformers


RECORD_NEUTRAL = {"value_embeds": 0, "x0_mix": False, "unet_skips": False, "logit_softcap": None, "window_unit": 1}
"""The record GPT's options at the values that leave them out."""


def family(config: LLMconfig) -> str:
    """The model_type of the registered family that represents this model exactly (its kinds and positions, then
    its own checks); otherwise ConfigError("cannot export: ...") naming what blocks it."""
    if config.objective != "clm":
        refuse(f"objective={config.objective!r}; the transformers families here are causal LMs (objective clm)")
    if any(routes(config, i) for i in range(len(config.layers))):
        refuse("mod=true (mixture-of-depths routing); no transformers family represents it")
    if ARCHS[config.arch].export_refusal is not None:
        refuse(ARCHS[config.arch].export_refusal)
    record = [f"{name}={getattr(config, name)}" for name, neutral in RECORD_NEUTRAL.items()
              if getattr(config, name) != neutral]
    if record:
        refuse(f"{', '.join(record)} (the record GPT's parts); no transformers family here represents them")
    used = {field: {getattr(b, field) for b in config.layers} for field in KIND_FIELDS}
    for field, label in KIND_FIELDS.items():
        known = set().union(*(getattr(f, field) for f in FAMILIES.values()))
        unknown = sorted(used[field] - known)
        if unknown:
            refuse(f"{field}={unknown[0]!r} is a kind no transformers family represents; use {field} in "
                   f"{', '.join(sorted(known))}, or add a family for it in llm/hf/")
        if not any(used[field] <= getattr(f, field) for f in FAMILIES.values()):
            refuse(f"the layers mix {label} kinds ({', '.join(sorted(used[field]))}); no transformers model does")
    fits = [f for f in FAMILIES.values() if used["attn"] <= f.attn and used["ffn"] <= f.ffn]
    if not fits:
        homes = [f for f in FAMILIES.values() if used["ffn"] <= f.ffn]
        refuse(f"ffn={'/'.join(sorted(used['ffn']))} layers export only with "
               f"{'/'.join(sorted({k.upper() for f in homes for k in f.attn}))} attention "
               f"({', '.join(f.title for f in homes)}), not attn={'/'.join(sorted(used['attn']))}")
    pos = config.pos_emb
    placed = [f for f in fits if pos in f.pos_emb]
    if not placed:
        options = " or ".join(f"{POSITION_NAMES.get(p, p)} ({f.title})" for f in fits for p in sorted(f.pos_emb))
        refuse(f"{POSITION_NAMES.get(pos, pos)} (pos_emb={pos}); transformers models with attn="
               f"{'/'.join(sorted(used['attn']))} use {options}")
    windows = sorted({b.window for b in config.layers if b.window is not None})
    if windows and not any(f.windows for f in placed):
        refuse(f"sliding-window attention (window={windows[0]}) exports only with "
               f"{', '.join(f.title for f in FAMILIES.values() if f.windows)} attention; train without --window")
    placed = [f for f in placed if f.windows or not windows]
    refusals: dict[str, list[str]] = {}  # reason -> the families refusing for it
    for candidate in placed:  # the first family whose own checks pass
        try:
            candidate.check(config)
            return candidate.model_type
        except ConfigError as e:
            refusals.setdefault(str(e).removeprefix("cannot export: "), []).append(candidate.title)
    if len(refusals) == 1:
        refuse(next(iter(refusals)))
    refuse("; ".join(f"as {'/'.join(titles)}: {reason}" for reason, titles in refusals.items()))


def hf_config(config: LLMconfig, bos: int | None = None, eos: int | None = None):
    """The transformers configuration of our model with the given begin and end token ids."""
    t = _transformers()
    fam = FAMILIES[family(config)]
    return getattr(t, fam.config_class)(vocab_size=config.vocab_size, tie_word_embeddings=config.tie_embeddings,
                                        bos_token_id=bos, eos_token_id=eos, **fam.hf_fields(config))


def to_hf(model: LLM, bos: int | None = None, eos: int | None = None):
    """A transformers model equal to ours (fp32), built from its config with our weights copied in."""
    if not model.causal:
        raise ConfigError(f"objective={model.config.objective} is bidirectional; transformers' causal LMs would mask "
                          "its attention, so it is not exported")
    hf = _transformers().AutoModelForCausalLM.from_config(hf_config(model.config, bos, eos)).float()
    theirs = saved_tensors(hf)
    pairs = weight_pairs(model, FAMILIES[family(model.config)])
    missing = sorted(set(theirs) - {p.theirs for p in pairs})
    unexpected = [p.theirs for p in pairs if p.theirs not in theirs]
    if missing or unexpected:
        raise RuntimeError(f"export mapping is incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, _, ours in pairs:
            if ours is None:
                theirs[name].zero_()  # a tensor transformers always has and we do not (a bias)
            else:
                copy_weight(theirs[name], ours, name)
    return hf


def config_from_hf(hf_cfg) -> LLMconfig:
    """Our configuration of a transformers configuration of a registered family (GPT-2, Llama, Mistral, Mixtral,
    Qwen2, Qwen3, DeepseekV3, Mamba)."""
    fam = FAMILIES.get(hf_cfg.model_type)
    if fam is None:
        raise ConfigError(f"cannot import model_type {hf_cfg.model_type!r}; supported: {', '.join(FAMILIES)}")
    for refusal in fam.refusals:
        if not refusal.accepts(hf_cfg):
            raise ConfigError(f"cannot import {fam.title} with {refusal.field}="
                              f"{getattr(hf_cfg, refusal.field, None)!r}: {refusal.reason}")
    config = LLMconfig(vocab_size=hf_cfg.vocab_size, tie_embeddings=hf_cfg.tie_word_embeddings,
                       **fam.our_fields(hf_cfg))
    config = dataclasses.replace(config, layers=[resolve_block(b, config.n_embd) for b in config.layers])
    validate_model(config)
    return config


def config_of(directory: str) -> LLMconfig:
    """Our configuration of a transformers directory's config.json (the weights are not read)."""
    t = _transformers()
    try:
        hf_cfg = t.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read a transformers config from {directory!r}: {str(e).splitlines()[0]}") from None
    return config_from_hf(hf_cfg)


IMPORT_TOLERANCE = 1e-4
"""The largest max abs logit difference (fp32) between an imported model and transformers' that import accepts."""


def from_hf(directory: str, check: bool = True, **overrides) -> LLM:
    """Our model with the weights of a transformers directory of a registered family; `overrides` set model
    fields that do not change the weights (dropout, attn_backend). With `check`, both models run on a short random
    batch first and the import is refused if their logits differ by more than IMPORT_TOLERANCE."""
    t = _transformers()
    try:
        hf = t.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a transformers model from {directory!r}: {str(e).splitlines()[0]}") from None
    model = build_model(config_from_hf(hf.config))
    kind = family(model.config)
    theirs = hf.state_dict()
    with torch.no_grad():
        for name, _, ours in weight_pairs(model, FAMILIES[kind]):
            if ours is None:
                continue  # transformers' tensor is zero where we have none
            if name not in theirs:
                raise ConfigError(f"{directory}: weight {name} not found; is it a {kind} checkpoint?")
            copy_weight(ours, theirs[name], name)  # `ours` is a view of our parameter in transformers' layout
    if check:
        check_import(model, hf, directory)
    if any(getattr(model.config, name) != value for name, value in overrides.items()):
        tuned = LLM(dataclasses.replace(model.config, **overrides))  # built after the check, which runs on CPU
        tuned.load_state_dict(model.state_dict())
        model = tuned
    return model


def check_import(ours: LLM, theirs, directory: str, tokens: int = 16) -> None:
    """Refuses the import unless our model and transformers' give the same logits (within IMPORT_TOLERANCE, fp32,
    eval mode) on a random batch of 2 x `tokens` tokens."""
    idx = torch.randint(0, ours.config.vocab_size, (2, min(tokens, ours.config.block_size)),
                        generator=torch.Generator().manual_seed(0))  # (2, T)
    with torch.no_grad():
        diff = (ours.eval()(idx).logits - theirs.eval()(input_ids=idx).logits).abs().max().item()
    ours.train()
    if not diff <= IMPORT_TOLERANCE:
        raise ConfigError(f"import check failed for {directory}: logits differ from transformers' by {diff:.2e} "
                          f"(> {IMPORT_TOLERANCE:.0e}, fp32), so a field is not represented; please report it "
                          "(--no_import_check skips the check)")

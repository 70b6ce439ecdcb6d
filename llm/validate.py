"""Every cross-field check in one place. Each failure is a ConfigError naming the field, value and fix.

It sits above the model: a kind's own rules come from its record in the model's registries."""
import dataclasses
import math
import re
from pathlib import Path

from .config import BlockConfig, ConfigError, LLMconfig, Trainconfig, micro_steps, parse_mix, require, run_dir_name
from .config.fields import did_you_mean
from .model.arch import ARCHS
from .model.mixers import attention
from .model.parts import BLOCK_KINDS, HEADS
from .model.registry import FFNS, MIXERS, OBJECTIVES

CODON_VOCAB = 70  # the 3mer tokenizer's vocabulary: what the codon-tree losses (hxe, soft_labels) are defined on


def check_finite(config) -> None:
    """Every float field of a config dataclass is a finite number (inf and nan parse as floats)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        require(not isinstance(value, float) or math.isfinite(value),
                f"{field.name}={value} must be a finite number")


def check_kind(field: str, name: str, registry: dict) -> None:
    """Refuses a kind name that is not registered, listing the registered ones."""
    require(name in registry, f"{field}={name!r} is not a registered kind; use --{field} with one of "
                              f"{', '.join(registry)}{did_you_mean(name, registry)} (a kind of your own: pass "
                              "--import MODULE, the module that registers it)")


def validate_block(b: BlockConfig, m: LLMconfig, where: str) -> None:
    """Checks one layer: its kinds are registered, and each kind's own checks of the fields it uses pass.

    `where` prefixes each message (a file and line, or '' for flags).
    """
    try:
        check_finite(b)
        check_kind("attn", b.attn, MIXERS)
        check_kind("ffn", b.ffn, FFNS)
        check_direction(b, m)
        MIXERS[b.attn].validate(b, m)
        FFNS[b.ffn].validate(b, m)
        for kind in BLOCK_KINDS.values():
            kind.validate(b, m)
        ARCHS[m.arch].validate_block(b, m)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def check_direction(b: BlockConfig, m: LLMconfig) -> None:
    """A mixer kind that reads one way only (MixerKind.direction) serves only objectives of that way."""
    kind, causal = MIXERS[b.attn], OBJECTIVES[m.objective].causal
    instead = f"use --attn {kind.counterpart}" if kind.counterpart else "use a kind that reads both ways"
    require(kind.direction != "causal" or causal,
            f"attn={b.attn} reads left to right only, but objective={m.objective} needs every position to see the "
            f"whole sequence; {instead}")
    require(kind.direction != "bidirectional" or not causal,
            f"attn={b.attn} reads the sequence both ways, which the causal objective={m.objective} forbids; use "
            f"--objective mlm, or {instead.removeprefix('use ')}")


def check_logits_and_windows(m: LLMconfig) -> None:
    """A positive logit cap, read by the token objectives' loss; a window unit >= 1 that divides every window, and
    block windows on kernels that count them (not flash-attn)."""
    require(m.logit_softcap is None or m.logit_softcap > 0,
            f"logit_softcap={m.logit_softcap} must be > 0 (or unset: no cap)")
    require(m.logit_softcap is None or not OBJECTIVES[m.objective].diffusion,
            f"logit_softcap is read by the clm and mlm losses, not by objective={m.objective}; drop --logit_softcap")
    require(m.window_unit >= 1, f"window_unit={m.window_unit} must be >= 1 (1: windows counted in tokens)")
    for i, block in enumerate(m.layers):
        require(block.window is None or block.window % m.window_unit == 0,
                f"layer {i}: window={block.window} is not a multiple of window_unit={m.window_unit}; give windows in "
                f"whole blocks of {m.window_unit} tokens")
    require(m.window_unit == 1 or m.attn_backend != "flash",
            f"attn_backend=flash counts windows in tokens, but window_unit={m.window_unit}; use --attn_backend auto")


def check_attn_backend(m: LLMconfig) -> None:
    """What the model alone tells about --attn_backend: flash needs flash-attn installed, and flex no dropout (the
    kernel is checked per call as well, where the device, dtype and head sizes are known)."""
    require(m.attn_backend != "flash" or bool(attention.FLASH),
            "attn_backend=flash but flash-attn is not installed; pip install 'llm[flash]' (flash-attn-4, for Hopper "
            "and Blackwell) or use --attn_backend auto")
    require(m.attn_backend != "flex" or m.dropout == 0,
            f"attn_backend=flex has no attention dropout but dropout={m.dropout}; set --dropout 0 or use "
            "--attn_backend auto")


def check_cpu_run(t: Trainconfig, m: LLMconfig) -> None:
    """A training run on --device cpu refuses what needs a GPU: the flash and cudnn kernels, FlexAttention (no backward
    on CPU) and float8."""
    if t.device != "cpu":
        return
    require(m.attn_backend not in ("flash", "cudnn", "flex"),
            f"attn_backend={m.attn_backend} cannot train on device=cpu "
            f"({'FlexAttention has no backward on CPU' if m.attn_backend == 'flex' else 'it needs a CUDA GPU'}); "
            "use --attn_backend auto")
    require(not t.fp8, "fp8 needs a GPU with float8 (compute capability 8.9+: Ada, Hopper, Blackwell) but "
                       "device=cpu; drop --fp8")
    require(not t.fp8_head, "fp8_head needs a GPU with float8 (compute capability 8.9+: Ada, Hopper, Blackwell) but "
                            "device=cpu; drop --fp8_head")


def check_fp8_head(t: Trainconfig, m: LLMconfig) -> None:
    """--fp8_head runs the chunked cross-entropy of the token objectives (clm, mlm with --loss ce) in float8."""
    require(not t.fp8_head or (not OBJECTIVES[m.objective].diffusion and m.loss == "ce"),
            f"fp8_head runs the head of the cross-entropy loss of objectives clm and mlm, not objective={m.objective} "
            f"with loss={m.loss}; drop --fp8_head")


def check_window_schedule(t: Trainconfig, m: LLMconfig) -> None:
    """--window_schedule linear/scaled: positive blocks up to window_max, which reaches every layer's window, a
    windowed layer to grow, limits in whole --window_unit blocks (linear), and a kernel that takes the limit as a
    tensor (not flash-attn)."""
    if t.window_schedule == "none":
        return
    name = f"window_schedule={t.window_schedule}"
    require(t.window_block >= 1, f"window_block={t.window_block} must be >= 1")
    require(t.window_max >= t.window_block, f"window_max={t.window_max} must be >= window_block={t.window_block}; "
                                            "raise --window_max or lower --window_block")
    windows = [b.window for b in m.layers if b.window is not None]
    require(bool(windows), f"{name} grows sliding windows but no layer sets window; set --window (the final "
                           "window) or use --window_schedule none")
    require(t.window_max >= max(windows), f"window_max={t.window_max} is below the window={max(windows)} of a layer, "
                                          f"so training would end short of it; set --window_max {max(windows)} or more")
    for field in ("window_block", "window_max"):
        value = getattr(t, field)
        require(t.window_schedule == "scaled" or value % m.window_unit == 0,
                f"{field}={value} is not a multiple of window_unit={m.window_unit}, so {name} would cut a window "
                f"inside a block; make it a multiple of {m.window_unit} or use --window_schedule scaled")
    require(m.attn_backend != "flash",
            f"attn_backend=flash takes a fixed window, but {name} changes it; use --attn_backend auto "
            "(FlexAttention on CUDA)")


def check_arch_fields(m: LLMconfig) -> None:
    """The fields an architecture kind alone reads (ArchKind.fields) keep their defaults under any other arch."""
    default = LLMconfig()
    for owner in ARCHS.values():
        if owner.name == m.arch:
            continue
        for name in owner.fields:
            value = getattr(m, name)
            require(value == getattr(default, name), f"{name}={value} is read only by arch={owner.name} models; add "
                                                       f"--arch {owner.name} or drop --{name}")


def check_objective_fields(m: LLMconfig) -> None:
    """The fields an objective kind alone reads (ObjectiveKind.fields) keep their defaults under any other; fields
    that several kinds read are allowed under each of them."""
    mine = set(OBJECTIVES[m.objective].fields)
    for owner in OBJECTIVES.values():
        for name in set(owner.fields) - mine:
            value = getattr(m, name)
            readers = [kind.name for kind in OBJECTIVES.values() if name in kind.fields]
            require(value == getattr(LLMconfig, name), f"{name}={value} is read only by objective={'/'.join(readers)} "
                                                       f"models; add --objective {readers[0]} or drop --{name}")


def check_rope_scaling(m: LLMconfig) -> None:
    """RoPE scaling needs RoPE in attention that applies it, and parameters its formulas are defined for."""
    if m.rope_scaling == "none":
        return
    require(m.pos_emb == "rope", f"rope_scaling={m.rope_scaling} needs pos_emb=rope, got pos_emb={m.pos_emb}; "
                                 "add --pos_emb rope or drop --rope_scaling")
    require(m.rope_factor > 0, f"rope_factor={m.rope_factor} must be > 0 (the context extension factor)")
    original = m.rope_original_max_position_embeddings
    require(original is None or original >= 1,
            f"rope_original_max_position_embeddings={original} must be >= 1 (or unset: block_size)")
    if m.rope_scaling == "llama3":
        require(0 < m.rope_low_freq_factor < m.rope_high_freq_factor,
                f"rope_low_freq_factor={m.rope_low_freq_factor} and rope_high_freq_factor={m.rope_high_freq_factor} "
                "must satisfy 0 < low < high (Llama 3.1: 1 and 4)")
    if m.rope_scaling == "yarn":
        require(0 < m.rope_beta_slow < m.rope_beta_fast,
                f"rope_beta_slow={m.rope_beta_slow} and rope_beta_fast={m.rope_beta_fast} must satisfy "
                "0 < beta_slow < beta_fast (YaRN: 1 and 32)")
        require(m.rope_attention_factor is None or m.rope_attention_factor > 0,
                f"rope_attention_factor={m.rope_attention_factor} must be > 0 (or unset: derived from rope_factor)")


def validate_model(m: LLMconfig, wheres: list[str] | None = None) -> None:
    """Checks model-wide values and every layer; `wheres[i]` tells where layer i was specified."""
    check_kind("objective", m.objective, OBJECTIVES)
    check_kind("arch", m.arch, ARCHS)
    check_finite(m)
    require(m.vocab_size is None or m.vocab_size >= 1, f"vocab_size={m.vocab_size} must be >= 1")
    for name in ("block_size", "n_embd", "n_layer"):
        value = getattr(m, name)
        require(value >= 1, f"{name}={value} must be >= 1")
    require(0.0 <= m.dropout < 1.0, f"dropout={m.dropout} must be in [0, 1)")
    require(m.rope_theta > 0, f"rope_theta={m.rope_theta} must be > 0")
    check_rope_scaling(m)
    require(m.norm_eps > 0, f"norm_eps={m.norm_eps} must be > 0")
    require(m.emb_init_std > 0, f"emb_init_std={m.emb_init_std} must be > 0")
    require(m.emb_init_std == 0.02 or not m.tie_embeddings,
            f"emb_init_std={m.emb_init_std} needs an untied embedding (a tied one is initialised as the output head, "
            "std 0.02); add --no_tie_embeddings or drop --emb_init_std")
    require(m.hxe_alpha >= 0, f"hxe_alpha={m.hxe_alpha} must be >= 0 (0: every edge of the codon tree weighs the same)")
    require(m.soft_label_beta > 0, f"soft_label_beta={m.soft_label_beta} must be > 0")
    require(m.loss == "ce" or m.vocab_size in (None, CODON_VOCAB),
            f"loss={m.loss} needs the 3mer tokenizer's {CODON_VOCAB} tokens, but vocab_size={m.vocab_size}; prepare the "
            "data with --tokenizer 3mer and leave --vocab_size unset, or use --loss ce")
    for head in HEADS.values():
        head.validate(m)
    require(len(m.layers) == m.n_layer,
            f"n_layer={m.n_layer} but {len(m.layers)} layer specs were given; make them equal or omit --n_layer")
    check_attn_backend(m)
    check_logits_and_windows(m)
    check_arch_fields(m)
    check_objective_fields(m)
    ARCHS[m.arch].validate(m)
    OBJECTIVES[m.objective].validate(m)
    wheres = wheres or [f"layer {i}" for i in range(m.n_layer)]
    for i, (block, where) in enumerate(zip(m.layers, wheres)):
        stage = ARCHS[m.arch].layer_config(m, i)  # the layer is built at its stage's width and length
        if stage.n_embd != m.n_embd:
            where = f"{where or f'layer {i}'} (arch={m.arch}: its stage is n_embd={stage.n_embd} wide)"
        validate_block(block, stage, where)
    for kind in BLOCK_KINDS.values():
        kind.validate_model(m)


def validate_saved(m: LLMconfig, source: str) -> None:
    """validate_model for a model config read back from a file (a run's or checkpoint's config.json at `source`):
    its kinds must be registered here (--import MODULE for kinds of one's own); messages name the file."""
    try:
        validate_model(m)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def validate_train(t: Trainconfig, m: LLMconfig) -> None:
    """Checks the run's values, including that the batch splits into whole micro-steps."""
    check_finite(t)
    for name, low in (("batch_size", 1), ("max_iters", 0), ("eval_interval", 1),
                      ("eval_iters", 1), ("ckpt_interval", 1), ("log_interval", 1),
                      ("keep_last", 1)):
        value = getattr(t, name)
        require(value >= low, f"{name}={value} must be >= {low}")
    require(t.warmup_steps is None or 0 <= t.warmup_steps <= t.max_iters,
            f"warmup_steps={t.warmup_steps} must be in [0, max_iters={t.max_iters}]; pass --warmup_steps "
            f"{t.max_iters // 10} (a tenth of the run, its default) or raise --max_iters")
    require(t.learning_rate > 0, f"learning_rate={t.learning_rate} must be > 0")
    require(t.min_lr is None or 0 <= t.min_lr <= t.learning_rate,
            f"min_lr={t.min_lr} must be in [0, learning_rate={t.learning_rate}]")
    for name in ("beta1", "beta2"):
        value = getattr(t, name)
        require(0 <= value < 1, f"{name}={value} must be in [0, 1)")
    require(t.weight_decay >= 0, f"weight_decay={t.weight_decay} must be >= 0")
    require(t.adam_eps > 0, f"adam_eps={t.adam_eps} must be > 0")
    for name in ("muon_lr", "embed_lr", "head_lr", "scalar_lr"):
        require(getattr(t, name) > 0, f"{name}={getattr(t, name)} must be > 0")
    for name in ("muon_momentum", "muon_momentum_start"):
        require(0 <= getattr(t, name) < 1, f"{name}={getattr(t, name)} must be in [0, 1)")
    require(t.muon_momentum_warmup >= 0, f"muon_momentum_warmup={t.muon_momentum_warmup} must be >= 0 (0: no warm-up)")
    require(t.muon_weight_decay >= 0, f"muon_weight_decay={t.muon_weight_decay} must be >= 0")
    require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None,
            f"device={t.device!r} is not a device; use auto, cpu, cuda or cuda:N")
    if t.init_from is not None and t.init_from.startswith("hf:"):
        require(Path(t.init_from.removeprefix("hf:")).is_dir() and len(t.init_from) > 3,
                f"init_from={t.init_from!r}: no such directory; pass a transformers model directory on this machine "
                "(nothing is downloaded)")
    require(t.import_check or (t.init_from or "").startswith("hf:"),
            "import_check=False turns off the check of an import from transformers, but there is no --init_from "
            "hf:DIR; drop --no_import_check")
    require(t.init_from is None or t.init_from.startswith("hf:") or Path(t.init_from).is_dir(),
            f"init_from={t.init_from!r} is not supported; use hf:DIR (a transformers model directory) or a run or "
            "checkpoint folder of ours (out/RUN)")
    run_dir_name(t.wandb_run_name)
    require(not t.allow_data_change or t.resume is not None,
            "allow_data_change=True lets a resume continue on changed data, but no --resume was given; drop "
            "--allow_data_change or add --resume")
    require(t.grad_clip >= 0, f"grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    if t.data_mix is not None:
        parse_mix(t.data_mix)
    require(t.eval_tasks is None or t.eval, f"eval_tasks={t.eval_tasks!r} is scored at evaluations, which --no_eval "
            "turns off; drop --no_eval")
    require(0 <= t.cooldown_frac <= 1, f"cooldown_frac={t.cooldown_frac} must be in [0, 1]")
    require(0 < t.mask_prob < 1, f"mask_prob={t.mask_prob} must be in (0, 1)")
    require(t.window_stride >= 0, f"window_stride={t.window_stride} must be >= 0 (tokens shared by consecutive windows)")
    check_window_schedule(t, m)
    check_fp8_head(t, m)
    require(all(r >= 1 for r in t.recurrence_sweep),
            f"recurrence_sweep={t.recurrence_sweep} must hold recurrences >= 1")
    check_cpu_run(t, m)
    ARCHS[m.arch].validate_run(t, m)
    require(t.antithetic_time or OBJECTIVES[m.objective].diffusion,
            f"antithetic_time=False changes how diffusion times are drawn, but objective={m.objective} draws none; "
            "drop --no_antithetic_time")
    OBJECTIVES[m.objective].validate_run(t, m)
    if t.init_from is None:  # else the model comes with the weights, and set-up checks the batch against it
        micro_steps(t, m)


def validate(m: LLMconfig, t: Trainconfig, wheres: list[str] | None = None) -> None:
    """The one validation step for a resolved model and run."""
    validate_model(m, wheres)
    validate_train(t, m)

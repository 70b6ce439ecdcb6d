"""Typed configuration: one layer (`BlockConfig`), the model (`LLMconfig`) and the run (`Trainconfig`).

These dataclasses are the single source of truth: the CLI, its help text, config files, presets and
checkpoints all derive from them. Field names are unique across the three classes so that every
field has one flat flag (`--n_layer`, `--attn`, `--learning_rate`).
"""
from dataclasses import dataclass, field
from typing import Literal

import tyro

PositionKind = Literal["learn", "sin", "rope", "none"]
NormKind = Literal["layer", "rms"]
RouterScore = Literal["softmax", "sigmoid", "mixtral"]
Activation = Literal[
    "relu", "relu2", "gelu", "gelu_tanh", "silu", "swish", "mish", "selu", "celu", "elu", "leaky_relu", "lrelu",
    "tanh", "sigmoid", "swiglu", "geglu", "reglu", "glu",
]
ACTIVATION_ALIASES = {"swish": "silu", "lrelu": "leaky_relu"}


@dataclass
class BlockConfig:
    """One layer: its sequence-mixer kind (`attn`) and its feed-forward kind (`ffn`), each a registered name.

    Fields that the chosen kinds do not use are accepted and ignored, so one template may carry every key.
    """

    attn: str = "mha"
    """Sequence-mixer kind: mha (n_head KV heads), mqa (one KV head), gqa (n_kv_heads), mla (latent attention), nsa
    (native sparse attention), hyena (long implicit convolutions with gating), mamba (selective state space), bimamba
    (Mamba both ways, for objective mlm)."""
    n_head: int = 4
    """Number of query heads; must divide n_embd (head size = n_embd // n_head) unless head_dim is set."""
    head_dim: int | None = None
    """mha, mqa, gqa: the width of each query, key and value head; unset means n_embd // n_head. Set it for heads
    wider or narrower than n_embd / n_head (Qwen3-0.6B: 16 heads of 128 at width 1024); c_proj then maps
    n_head * head_dim back to n_embd."""
    n_kv_heads: int | None = None
    """Key/value heads for gqa and nsa (nsa: unset means n_head); must divide n_head. Ignored by mha (uses n_head),
    mqa (uses 1) and mla."""
    q_latent_dim: int | None = None
    """MLA query compression width (DeepSeek q_lora_rank); unset or 0 means no query down-projection."""
    kv_latent_dim: int | None = None
    """MLA joint key/value compression width (DeepSeek kv_lora_rank); required by mla."""
    rope_head_dim: int | None = None
    """MLA decoupled RoPE width per head (one rope key shared by all heads); required by mla with rope."""
    ffn: str = "dense"
    """Feed-forward kind: dense (MLP), moe (Mixture-of-Experts), peer (product-key retrieval of tiny experts) or none
    (no feed-forward sublayer: the layer is its mixer alone, as in Mamba); --moe is short for --ffn moe, --no_moe for
    --ffn dense."""
    up_dim: int | None = None
    """Hidden width of the MLP (and of each expert); unset means 4 * n_embd."""
    non_linearity: Activation = "gelu"
    """MLP activation; swiglu, geglu, reglu and glu are gated (three weight matrices). relu2 is relu(x)^2 (Primer; the
    modded-nanogpt speedrun's MLP). swish = silu, lrelu = leaky_relu."""
    n_exp: int = 8
    """MoE: experts in total, shared ones included."""
    n_shared: int = 1
    """MoE: shared experts that every token goes through."""
    n_act: int = 3
    """MoE: experts active per token, shared ones included (each token picks n_act - n_shared routed experts)."""
    router_score: RouterScore = "softmax"
    """MoE: router scores over the routed experts: softmax, sigmoid as in DeepSeek-V3, or mixtral (top-k of the
    logits, gate weights a softmax over those k logits only)."""
    jitter_noise: float = 0.0
    """MoE: multiply the router's inputs by uniform noise from [1 - jitter_noise, 1 + jitter_noise] in training
    (Mixtral's jitter); 0 disables."""
    norm_topk: bool = True
    """MoE: renormalise the chosen experts' gate weights to sum to 1."""
    coeff: float = 0.01
    """MoE: weight of the Switch-style load-balancing loss coeff * N_routed * sum_i f_i * P_i (when aux_free is off)."""
    aux_free: bool = False
    """MoE: DeepSeek-V3 auxiliary-loss-free balancing (a selection-only bias moved by gamma after each optimizer step)."""
    alpha: float = 1e-4
    """MoE with aux_free: weight of the complementary sequence-wise balance loss."""
    gamma: float = 1e-3
    """MoE with aux_free: step size of the selection bias update."""
    num_experts: int = 1024 * 1024
    """PEER: experts in the pool; must equal the product of product_key_dim."""
    num_experts_per_tok: int = 16
    """PEER: experts each retrieval head picks per token (top-k)."""
    num_heads: int = 8
    """PEER: retrieval heads, each with its own query and top-k experts; their outputs are summed."""
    expert_hidden_size: int = 1
    """PEER: hidden neurons of each expert (1: each expert is one GELU neuron)."""
    product_key_dim: list[int] = field(default_factory=lambda: [1024, 1024])
    """PEER: sizes of the sub-key tables (one or more); expert ids are the Cartesian product of their rows."""
    query_dim: int = 256
    """PEER: query width per head; split into len(product_key_dim) equal chunks, one per sub-key table."""
    batch_norm_query: bool = True
    """PEER: a LayerNorm over each head's query before retrieval."""
    window: int | None = None
    """Sliding-window attention (mha, mqa, gqa, mla): a query at position t sees only the keys t-window+1..t (window
    tokens, itself included; |t - s| < window under a bidirectional objective); in blocks with --window_unit;
    unset: full attention."""
    mod: bool = False
    """Mixture-of-depths (Raposo et al. 2024): route this layer; a router picks the top capacity * T tokens of each
    sequence for the block and the others pass it on the residual stream (see --mod_every_other)."""
    capacity: float = 0.125
    """MoD: fraction of each sequence's tokens that a routed layer processes, in (0, 1]."""
    mod_predictor_dim: int = 64
    """MoD: hidden width of the causal predictor (an MLP on the stop-gradient input, trained to predict the top-k
    choice) that decides per token at evaluation and generation."""
    compress_block_size: int = 4
    """NSA: tokens per compressed block (each block of keys/values becomes one by a learned MLP)."""
    compress_stride: int | None = None
    """NSA: tokens between the starts of consecutive compressed blocks, at most compress_block_size; unset means
    compress_block_size (no overlap)."""
    selection_block_size: int = 4
    """NSA: tokens per selection block (the unit that each query's top blocks are chosen in)."""
    num_selected_blocks: int = 4
    """NSA: selection blocks each query attends to, the first block and its own block included (>= 2)."""
    sliding_window_size: int = 32
    """NSA: tokens the sliding-window branch sees, the query's own included."""
    hyena_order: int = 2
    """Hyena: order N of the operator, >= 2 (N multiplicative gates and N - 1 long convolutions)."""
    hyena_filter_order: int = 64
    """Hyena: width of the implicit filter's MLP (the Sin network that maps positional features to filter values)."""
    hyena_emb_dim: int = 3
    """Hyena: positional features fed to the filter MLP, odd and >= 3: the normalised position t plus
    (hyena_emb_dim - 1) / 2 cosine and sine bands."""
    hyena_short_filter: int = 3
    """Hyena: kernel size of the short depthwise convolution over the projections (>= 1)."""
    hyena_sin_freq: float = 1.0
    """Hyena: initial frequency w of the filter MLP's Sin activations sin(w x), learned (safari: 1, HyenaDNA: 10)."""
    hyena_fast_decay: float = 0.3
    """Hyena: the fastest-decaying filter channel's window exp(-|delta| t) falls to 1e-2 at this fraction of
    block_size (> 0)."""
    hyena_slow_decay: float = 1.5
    """Hyena: the slowest-decaying filter channel's window falls to 1e-2 at this fraction of block_size (> 0)."""
    hyena_decay_shift: float = 0.0
    """Hyena: added to the decay window, so no channel's filter fades to zero (safari: 0, HyenaDNA: 0.05; >= 0)."""
    d_state: int = 16
    """Mamba: SSM state size N per inner channel."""
    expand: int = 2
    """Mamba: inner width d_inner = expand * n_embd."""
    d_conv: int = 4
    """Mamba: kernel width of the causal depthwise convolution before the scan."""
    dt_rank: int | None = None
    """Mamba: rank of the time-step projection; unset means ceil(n_embd / 16) (the paper's 'auto')."""
    dt_min: float = 0.001
    """Mamba: smallest initial time step (initial steps are log-uniform in [dt_min, dt_max])."""
    dt_max: float = 0.1
    """Mamba: largest initial time step."""
    dt_init: Literal["random", "constant"] = "random"
    """Mamba: initial time-step projection weights, uniform in +-dt_rank**-0.5 (random) or all dt_rank**-0.5."""
    dt_init_floor: float = 1e-4
    """Mamba: initial time steps below this value are raised to it."""
    conv_bias: bool = True
    """Mamba: a bias in the depthwise convolution (the linear projections follow --bias)."""
    qk_nope_head_dim: int | None = None
    """MLA: per-head width of the non-rotary query/key part (DeepSeek qk_nope_head_dim); unset means n_embd // n_head."""
    v_head_dim: int | None = None
    """MLA: per-head value width (DeepSeek v_head_dim); unset means n_embd // n_head."""
    rope_interleave: bool = False
    """MLA: the rotary dimensions pair as (0, 1), (2, 3), ... (DeepSeek's rope_interleave) instead of i with i + dr/2."""
    n_group: int = 1
    """MoE: groups of routed experts (DeepSeek-V3 n_group); with topk_group < n_group each token picks its experts
    within the topk_group groups whose two best selection scores sum highest."""
    topk_group: int = 1
    """MoE: groups each token may route to (DeepSeek-V3 topk_group), at most n_group; equal to n_group: no limit."""
    routed_scaling_factor: float = 1.0
    """MoE: factor on the routed experts' gate weights, after norm_topk (DeepSeek-V3 routed_scaling_factor)."""
    router_z_loss: float = 0.0
    """MoE: weight of ST-MoE's router z-loss, the mean over tokens of logsumexp(router logits)^2 (Zoph et al. 2022:
    1e-3), which keeps the router's logits small; 0 disables."""
    qkv_bias: bool = False
    """mha/mqa/gqa: biases on the query, key and value projections even without --bias (Qwen2)."""
    qk_norm: bool = False
    """mha/mqa/gqa: an RMSNorm over each query and key head (learned weight per head dimension) before RoPE (Qwen3)."""


@dataclass
class LLMconfig:
    """The model: sizes, positions and norm shared by all layers, plus the list of per-layer specs."""

    vocab_size: int | None = None
    """Vocabulary size; unset takes the prepared dataset's (the embedding is padded to a multiple of 64, logits are sliced back)."""
    block_size: int = 128
    """Context length in tokens."""
    n_embd: int = 128
    """Model width (residual stream size)."""
    n_layer: int = 4
    """Number of layers; with --layer_configs/--layer_configs_jsonl it must equal the number of specs when given."""
    pos_emb: PositionKind = "learn"
    """Positions: learn (learned table), sin (fixed sinusoids), rope (rotary, applied in attention), none (no position
    information besides causality: Mamba stacks)."""
    rope_theta: float = 10000.0
    """RoPE base frequency theta."""
    rope_scaling: Literal["none", "linear", "llama3", "yarn"] = "none"
    """RoPE scaling for contexts beyond the original one (pos_emb rope): none; linear (position interpolation, Chen
    et al. 2023: every frequency / rope_factor); llama3 (Llama 3.1: low frequencies / rope_factor, high ones kept,
    a smooth ramp between); yarn (Peng et al. 2023: per-frequency ramp between interpolation and extrapolation, and
    cos/sin scaled by an attention factor). The rope_* fields below are transformers' rope_parameters."""
    rope_factor: float = 8.0
    """rope_scaling linear, llama3, yarn: the context extension factor (transformers' factor)."""
    rope_original_max_position_embeddings: int | None = None
    """rope_scaling llama3, yarn: the context length the model was pretrained with; unset means block_size."""
    rope_low_freq_factor: float = 1.0
    """rope_scaling llama3: wavelengths above original / rope_low_freq_factor are divided by rope_factor."""
    rope_high_freq_factor: float = 4.0
    """rope_scaling llama3: wavelengths below original / rope_high_freq_factor are kept."""
    rope_beta_fast: float = 32.0
    """rope_scaling yarn: frequencies making more than rope_beta_fast turns over the original context are kept."""
    rope_beta_slow: float = 1.0
    """rope_scaling yarn: frequencies making fewer than rope_beta_slow turns are divided by rope_factor."""
    rope_mscale: float | None = None
    """rope_scaling yarn: with rope_mscale_all_dim, attention factor (0.1 m ln f + 1) / (0.1 m_all ln f + 1)
    (DeepSeek); unset: 0.1 ln f + 1."""
    rope_mscale_all_dim: float | None = None
    """rope_scaling yarn: the m_all of the attention factor (see rope_mscale); MLA also multiplies its softmax scale
    by (0.1 m_all ln f + 1)^2, as DeepSeek-V2/V3."""
    rope_attention_factor: float | None = None
    """rope_scaling yarn: cos and sin are multiplied by this; unset derives it from rope_factor (see rope_mscale)."""
    norm: NormKind = "layer"
    """Normalisation: layer (LayerNorm) or rms (RMSNorm)."""
    norm_eps: float = 1e-5
    """Epsilon of every norm."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention weights and residual branches."""
    bias: bool = False
    """Biases in linear layers and LayerNorm."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    emb_init_std: float = 0.02
    """Standard deviation of the untied token embedding's initial weights (the OpenGenome2 recipe: 1.0)."""
    objective: str = "clm"
    """Training objective: clm (causal language modelling: next-token prediction), mlm (masked language modelling:
    bidirectional attention, the loss at masked positions only; needs a tokenizer with a <mask> token), or a discrete
    diffusion model over a bidirectional stack: mdlm (masked diffusion, Sahoo et al. 2024), sedd (score entropy,
    Lou et al. 2024) or d3pm (discrete-time, Austin et al. 2021); see docs/diffusion.md."""
    noise_schedule: Literal["loglinear", "cosine", "cosinesqr", "geometric"] = "loglinear"
    """mdlm, sedd, d3pm: how much noise at time t. loglinear: a token is noised with probability (1 - noise_eps) t
    (d3pm: exactly t/T, beta_t = 1/(T - t + 1)); cosine: kept with probability eps + (1 - eps) cos(pi t / 2) (d3pm:
    Hoogeboom's cosine betas); cosinesqr (mdlm, sedd): cos^2 instead of cos; geometric (mdlm, sedd): total noise
    sigma_min^(1-t) sigma_max^t."""
    noise_eps: float = 1e-3
    """mdlm, sedd: the loglinear and cosine schedules keep a token with probability noise_eps at t = 1, and training
    draws t from [noise_eps, 1] (MDLM's and SEDD's 1e-3)."""
    sigma_min: float = 1e-4
    """noise_schedule=geometric: the total noise at t = 0."""
    sigma_max: float = 20.0
    """noise_schedule=geometric: the total noise at t = 1."""
    diffusion_graph: Literal["absorbing", "uniform"] = "absorbing"
    """sedd, d3pm: absorbing (a noised token becomes the added [MASK] token) or uniform (a noised token becomes a
    uniformly drawn token); mdlm is absorbing."""
    diffusion_steps: int = 1000
    """d3pm: the number of discrete time steps T."""
    hybrid_weight: float = 0.01
    """d3pm: lambda of the hybrid loss L_vb + lambda * CE(x0 | x_t) (D3PM's text models: 0.01; 0: the bound alone)."""
    time_conditioning: bool | None = None
    """mdlm, sedd, d3pm: add an embedding of the diffusion time t to every position's token embedding; unset: off for
    mdlm (as MDLM), on for sedd and d3pm, which need it."""
    loss: Literal["ce", "hxe", "soft_labels"] = "ce"
    """Token loss: ce (cross-entropy), hxe (hierarchical cross-entropy over the codon tree, HELM) or soft_labels (KL
    to soft labels from codon-tree distances, HELM); hxe and soft_labels need the 3mer tokenizer."""
    mtp: Literal["none", "sequential", "parallel"] = "none"
    """Multi-token prediction (training only; inference uses the main head): sequential (DeepSeek-V3: module k combines
    the previous depth's hidden state with the embedding of token t+k, runs one block and predicts token t+k+1) or
    parallel (Gloeckle et al. 2024: n_mtp_tokens independent one-block heads on the trunk, head k predicting token
    t+k+1); none disables."""
    n_mtp_tokens: int = 2
    """mtp: extra tokens predicted, one module (sequential) or head (parallel) each."""
    mtp_lambda: float = 0.1
    """mtp: weight of the mean of the extra depths' losses, added to the main loss."""
    hxe_alpha: float = 0.2
    """loss=hxe: the edge into a node at depth d weighs exp(-hxe_alpha * d) (weights normalised to sum to 1)."""
    soft_label_beta: float = 15.0
    """loss=soft_labels: target distribution softmax(-soft_label_beta * normalised tree distance)."""
    logit_softcap: float | None = None
    """Soft-caps the output logits at c: logits = c * tanh(z / c) (Gemma 2; the speedrun's record GPT caps at 15,
    its 30 * sigmoid(z / 7.5) being 15 * tanh(z / 15) + 15, the same softmax); unset: no cap."""
    window_unit: int = 1
    """Tokens per unit of a sliding window (--window): 1 counts windows in tokens; 128 counts them in blocks of 128
    tokens as the speedrun's block masks do (query t sees the keys s <= t with t // 128 - s // 128 < window / 128).
    Every window (and --window_block under a schedule) must be a multiple of it."""
    value_embeds: int = 0
    """arch=gpt: k extra embedding tables whose rows are mixed into the attention values of the first k and the
    last k layers (layer i and layer n_layer - k + i share table i), as the speedrun's record GPT (k = 3); every
    attention layer then mixes v <- l0 * v + l1 * ve by learned lambdas (0.5, 0.5). 0: none."""
    x0_mix: bool = False
    """arch=gpt: each block first mixes the residual stream with the embedded input, x <- l0 * x + l1 * x0, by
    learned lambdas (1, 0) (the speedrun's record GPT)."""
    unet_skips: bool = False
    """arch=gpt: U-net skips: layer n_layer - 1 - i adds w_i times the output of layer i (i < n_layer // 2) to its
    input, with learned weights w (ones at init; the speedrun's record GPT)."""
    attn_backend: Literal["auto", "sdpa", "flash", "cudnn", "flex"] = "auto"
    """Attention kernel: auto (the fastest that runs: flash-attn-4, cuDNN on Hopper+, flash-attn 2, else SDPA), sdpa
    (PyTorch chooses), flash (flash-attn-4 or 2: pip install 'llm[flash]'), cudnn (SDPA's cuDNN kernel only), flex
    (FlexAttention)."""
    mod_every_other: bool = False
    """MoD: only the odd layers (1, 3, 5, ...) among those with mod route; the others run in full (the paper's
    interleaving of routed and full blocks)."""
    n_prelude: int = 2
    """arch=recurrent: the first n_prelude layers, run once, embed the input."""
    n_core: int = 4
    """arch=recurrent: the next n_core layers, iterated r times (n_prelude + n_core + n_coda must equal n_layer)."""
    n_coda: int = 2
    """arch=recurrent: the last n_coda layers, run once on the final state."""
    mean_recurrence: int = 32
    """arch=recurrent: r-bar, the mean of the log-normal rate from which each training step's r is drawn."""
    lognorm_var: float = 0.25
    """arch=recurrent: sigma^2 of tau ~ N(log r-bar - sigma^2 / 2, sigma^2), r ~ Poisson(e^tau) + 1 (the paper's
    sigma = 0.5: 0.25; 0 makes r - 1 a plain Poisson draw of mean r-bar)."""
    r_max: int = 64
    """arch=recurrent: training recurrences are capped at r_max."""
    k_trunc: int = 8
    """arch=recurrent: backpropagation through the last k_trunc iterations only (the earlier ones run without
    gradients)."""
    s0_std: float = 0.02
    """arch=recurrent: standard deviation of the Gaussian noise the state starts from in training (zeros in eval
    mode)."""
    eval_recurrence: int | None = None
    """arch=recurrent: r in eval mode: validation loss, benchmarks and generation; unset: mean_recurrence (the
    recurrence the model trains at on average)."""
    adapter_mode: Literal["concat", "add"] = "concat"
    """arch=recurrent: the core's input from the state s and the prelude's output e: concat (a linear adapter
    W [s; e], 2 n_embd -> n_embd) or add (s + e, no parameters)."""
    arch: str = "gpt"
    """Architecture kind: gpt (pre-norm residual blocks), ngpt (the normalized transformer, Loshchilov et al. 2024:
    embeddings, hidden states and the weights' vectors along the width on the unit sphere, no norm layers; needs
    pos_emb rope, a gated MLP and weight_decay 0; see --preset ngpt) or recurrent (recurrent depth, Geiping et al.
    2025: the layers split into a prelude (n_prelude), a core (n_core) iterated r times on a latent state, and a coda
    (n_coda); --recurrent_depth is its other spelling) or megabyte (Yu et al. 2023, over bytes: a global model over
    patches of patch_size bytes and a local model within each patch) or hnet (Hwang et al. 2025, over bytes:
    encoder, dynamic chunking, main network, de-chunking, decoder, in one or more stages); see docs/byte-models.md
    and docs/model-kinds.md."""
    ngpt_alpha_attn_init: float = 0.05
    """arch=ngpt: initial value of the attention eigen learning rates alpha_A (one per channel)."""
    ngpt_alpha_mlp_init: float = 0.05
    """arch=ngpt: initial value of the MLP eigen learning rates alpha_M (one per channel)."""
    ngpt_alpha_scale: float | None = None
    """arch=ngpt: alpha_A and alpha_M are stored at this value and used as stored * init / scale, which scales their
    effective learning rate; unset means 1/sqrt(n_embd) (the paper's)."""
    patch_size: int = 4
    """arch=megabyte: bytes per patch P (block_size must be a multiple of it); the global model runs once per patch,
    the local model over the P bytes of each patch."""
    n_global_layer: int = 2
    """arch=megabyte: the first n_global_layer layers form the global model over patches, the other n_layer -
    n_global_layer the local model within each patch (0 local layers: each byte is read from the global output and
    the previous byte's embedding alone)."""
    global_byte_embd: int = 32
    """arch=megabyte: width D_G of each byte's global embedding; the global model's width is patch_size *
    global_byte_embd (a patch is its bytes' embeddings side by side), the local model's n_embd."""
    hnet_encoder_layers: list[int] = field(default_factory=lambda: [2])
    """arch=hnet: the encoder's layers in each stage, outermost first (one entry per stage: [4] one stage, [4, 2]
    two); the layers are listed encoders first (outermost first), then the main network, then the decoders
    (innermost first)."""
    hnet_decoder_layers: list[int] = field(default_factory=lambda: [2])
    """arch=hnet: the decoder's layers in each stage, outermost first (as many entries as hnet_encoder_layers); the
    main network has the n_layer layers that no encoder or decoder takes."""
    hnet_widths: list[int] = field(default_factory=list)
    """arch=hnet: the width of each inner stage, the main network's last (one entry per stage, each at least the
    width outside it); empty: n_embd throughout. A chunk is widened by a learned vector (zeros at init)."""
    hnet_ratios: list[float] = field(default_factory=lambda: [4.0])
    """arch=hnet: the target downsampling N of each stage's dynamic chunking (> 1): the ratio loss pulls the
    fraction of positions that begin a chunk toward 1/N."""
    ratio_loss_weight: float = 0.03
    """arch=hnet: alpha, the weight of the summed ratio losses added to the training loss (the paper's 0.03)."""
    layers: tyro.conf.Suppress[list[BlockConfig]] = field(default_factory=list)
    """Resolved per-layer specs, one per layer (a homogeneous model repeats one spec)."""


@dataclass
class Trainconfig:
    """The training run: data, batch, optimisation, evaluation, checkpoints and logging."""

    dataset: str = "shakespeare_char"
    """Dataset folder name under data_dir (prepared by python -m llm.data.prepare)."""
    data_dir: str = "data"
    """Folder holding the prepared datasets."""
    data_mix: str | None = None
    """Train on a weighted mixture of prepared datasets instead of --dataset: 'fineweb:0.7,tinystories:0.3' (weights
    normalised; the datasets share one tokenizer); each row's source is drawn by weight."""
    data_order: Literal["random", "epoch", "windows"] = "random"
    """Training windows: random (uniform random offsets), epoch (each non-overlapping window once per epoch,
    reshuffled) or windows (windows within each sequence of a dataset prepared with `prepare genomic`, never two
    sequences in one window, once per epoch, reshuffled)."""
    window_stride: int = 0
    """data_order=windows: tokens that consecutive windows of one sequence share (Hugging Face's stride; the
    OpenGenome2 recipe uses 200)."""
    window_specials: Literal["every", "ends"] = "every"
    """data_order=windows: begin/end tokens on every window (OpenGenome2) or only at a sequence's true ends."""
    loss_mask: Literal["none", "acgt"] = "none"
    """Labels left out of the loss besides padding and special tokens: acgt leaves out every label that is not A, C,
    G or T in either case (degenerate bases such as N, tags), as the OpenGenome2 recipe does."""
    uppercase_labels: bool = False
    """Label lower-case (soft-masked) nucleotides with their upper-case tokens."""
    mask_prob: float = 0.15
    """objective=mlm: probability that a token (not special, not padding) is masked."""
    mask_strategy: Literal["helm", "bert"] = "helm"
    """objective=mlm: helm (every chosen token becomes <mask>) or bert (80% <mask>, 10% a random token, 10% kept)."""
    antithetic_time: bool = True
    """mdlm, sedd, d3pm: stratify each micro-batch's diffusion times over [0, 1] (row b draws from [b/B, (b+1)/B],
    MDLM's low-discrepancy sampler); --no_antithetic_time draws each row's time independently."""
    out_dir: str = "out"
    """Folder for run directories (out_dir/<run name>/)."""
    total_batch_size_str: str | None = None
    """Tokens per optimizer step, as integer arithmetic ('2**19', '8*1024'); gradient accumulation makes up the rest.
    Unset: one micro-batch per rank (batch_size * block_size * ranks), which the run records in its config.json."""
    batch_size: int = 16
    """Sequences per micro-step on each device."""
    max_iters: int = 500
    """Optimizer steps to run."""
    learning_rate: float = 1e-3
    """Peak learning rate."""
    min_lr: float | None = None
    """Learning rate at the end of the cosine decay; unset means 0.1 * learning_rate."""
    lr_schedule: Literal["cosine", "trapezoid"] = "cosine"
    """After warmup: cosine (decay to min_lr) or trapezoid (the peak held, then a linear decay to min_lr over the last
    cooldown_frac of the steps, as the modded-nanogpt configs)."""
    cooldown_frac: float = 0.4
    """lr_schedule=trapezoid: the fraction of max_iters spent in the final linear decay."""
    warmup_steps: int | None = None
    """Steps of linear warmup before cosine decay; unset means a tenth of max_iters."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices and embeddings only."""
    decay_embeddings: bool = True
    """Apply weight decay to the embedding tables too (--no_decay_embeddings: matrices only, as OpenGenome2)."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw: AdamW for every parameter at learning_rate. muon: Muon for the blocks' matrices (muon_lr) and AdamW
    (beta1, beta2, adam_eps, weight_decay) for embedding tables (embed_lr), the output head (head_lr) and the other
    parameters (scalar_lr), each rate scaled by the schedule's lr / learning_rate."""
    muon_lr: float = 0.05
    """optimizer=muon: peak learning rate of the Muon matrices."""
    muon_momentum: float = 0.95
    """optimizer=muon: Muon's (Nesterov) momentum after its warm-up."""
    muon_momentum_start: float = 0.85
    """optimizer=muon: Muon's momentum at step 0, raised linearly to muon_momentum over muon_momentum_warmup steps."""
    muon_momentum_warmup: int = 300
    """optimizer=muon: steps of the momentum warm-up (0: muon_momentum from the start)."""
    muon_weight_decay: float = 0.0
    """optimizer=muon: decoupled weight decay of the Muon matrices (each step w -= lr * muon_weight_decay * w)."""
    embed_lr: float = 0.6
    """optimizer=muon: peak AdamW learning rate of the untied token embedding and the learned position table."""
    head_lr: float = 0.008
    """optimizer=muon: peak AdamW learning rate of the output head (and of the token embedding and learned position
    table when the embedding is tied to the head)."""
    scalar_lr: float = 0.04
    """optimizer=muon: peak AdamW learning rate of norm weights, biases and PEER's expert tables."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this value (0 disables)."""
    device: str = "auto"
    """Device: auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute precision: auto (bf16 autocast on CUDA, fp16 with a grad scaler on GPUs without bf16, fp32 on CPU)."""
    dist: Literal["ddp", "fsdp"] = "ddp"
    """Data parallelism under torchrun: ddp (DistributedDataParallel, a full copy per GPU) or fsdp (FSDP2: parameters,
    gradients and optimizer state sharded across ranks)."""
    act_recomp: bool = False
    """Recompute each block's activations in the backward pass to save memory."""
    memory_check: bool = True
    """Refuse to start when the preflight estimate of memory per device (printed in the run's first lines) exceeds
    the device's memory; --no_memory_check starts anyway."""
    compile: bool = False
    """Compile the model with torch.compile."""
    fp8: bool = False
    """Float8 training through torchao (pip install 'llm[fp8]'; GPUs of compute capability 8.9+): the linear layers of
    the blocks, except the first and last block, compute in float8 with current (per-tensor, dynamic) scaling."""
    fp8_head: bool = False
    """The output head's matmuls in the training loss in float8 (GPUs of compute capability 8.9+), as the speedrun's
    FP8 head: hidden states and head in e4m3, gradients in e5m2, each scaled per tensor by its absolute maximum."""
    log_interval: int = 10
    """Steps between metric lines."""
    peer_log_interval: int = 1000
    """PEER layers report their expert usage (fraction used, hot experts) once this many steps have passed since their
    last report, on the next logged step."""
    usage_threshold: float = 5.0
    """PEER: an expert is hot when it was picked more than usage_threshold times the mean count since the last
    report."""
    eval: bool = True
    """Evaluate train and val loss every eval_interval steps and after the last step (eval_iters batches each);
    --no_eval turns it off."""
    eval_interval: int = 100
    """Steps between evaluations."""
    eval_iters: int = 20
    """Batches per evaluation."""
    eval_tasks: str | None = None
    """Benchmarks scored at each evaluation, comma-separated: hellaswag:PATH (HellaSwag-style JSONL multiple choice,
    logged as STEM_acc and STEM_acc_norm) or lm_eval:TASK (an lm-evaluation-harness task or task YAML that runs
    offline, logged as TASK/METRIC; pip install 'llm[eval]')."""
    save_model: bool = True
    """Save checkpoints (--no_save_model: none, except when a signal stops the run)."""
    ckpt_interval: int = 500
    """Steps between checkpoints (one is also written at the end, and for the best validation loss)."""
    keep_last: int = 3
    """Step checkpoints kept (the best one is kept besides them)."""
    init_from: str | None = None
    """Start from pretrained weights: hf:DIR, a transformers model directory of a family llm.hf reads, or a run or
    checkpoint folder of ours (out/RUN: its best checkpoint, else its newest); the architecture comes with the
    weights and replaces the model flags, while the optimizer, schedule and data start fresh (fine-tuning)."""
    import_check: bool = True
    """With init_from: run the imported model and transformers' on a short random batch and refuse the import if
    their logits differ by more than 1e-4 (fp32); --no_import_check skips it (models too big to hold twice)."""
    resume: str | None = None
    """Continue a run: auto (this run's newest checkpoint if it has one, else start fresh: for requeued jobs), latest
    (this run's newest checkpoint, which must exist), or the path of a checkpoint or run directory."""
    allow_data_change: bool = False
    """With --resume: continue although a dataset differs from the one the checkpoint recorded (prepared again, other
    files); the loaders keep their saved positions on the new data."""
    overwrite: bool = False
    """Start a new run in a run directory that holds another: the old run is moved aside to NAME.replaced-N."""
    file_name: str = "llm"
    """Base name of the saved weights file."""
    wandb_log: bool = False
    """Log metrics to Weights & Biases."""
    wandb_project: str = "llm"
    """Weights & Biases project."""
    wandb_run_name: str = "run"
    """Run name (wandb gets it as given; the run directory gets a path-safe version)."""
    seed: int = 1337
    """Random seed."""
    window_schedule: Literal["none", "linear", "scaled"] = "none"
    """Sliding windows in training: none (each layer's --window throughout), linear (the limit grows from
    window_block at the first step to window_max at the last, rounded up to multiples of window_block; a layer's own
    window caps it), as the modded-nanogpt speedrun, or scaled (the same limit, and each layer attends over its
    window's share of it, window * limit / window_max, in whole --window_unit blocks: the record GPT's short windows
    stay half its long ones)."""
    window_max: int = 1728
    """window_schedule linear/scaled: the limit at the last step; at least every layer's window."""
    window_block: int = 128
    """window_schedule linear/scaled: the limit's first value and the step between its values."""
    recurrence_sweep: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32, 64])
    """arch=recurrent: at each evaluation also the validation loss at each of these recurrences, on the same batches
    as val_loss, logged as val_loss_rR (pass the flag alone for none)."""

"""Numerical parity with independent implementations: transformers models built from configs (no downloads)."""
import pytest
import torch
import transformers

from llm.model import LLM, build_model
from llm.model.ffn.moe import MoE
from tests.conftest import make_config

ATOL = 1e-5


def copy_into(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Copies `theirs` into the leading rows of `ours` (our vocabulary rows are padded)."""
    with torch.no_grad():
        ours[: theirs.shape[0]].copy_(theirs)


def compare_logits(ours: LLM, theirs: torch.nn.Module, vocab: int, T: int) -> float:
    idx = torch.randint(0, vocab, (2, T))
    ours.eval(), theirs.eval()
    with torch.no_grad():
        expected = theirs(input_ids=idx).logits
        got = ours(idx).logits
    diff = (got - expected).abs().max().item()
    assert diff <= ATOL, f"max abs logit difference {diff:.2e}"
    return diff


def copy_llama_mlp_and_norms(ours_block, hf_layer) -> None:
    with torch.no_grad():
        ours_block.ln_1.weight.copy_(hf_layer.input_layernorm.weight)
        ours_block.ln_2.weight.copy_(hf_layer.post_attention_layernorm.weight)
        mlp = hf_layer.mlp
        ours_block.ffn.c_fc.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        ours_block.ffn.c_proj.weight.copy_(mlp.down_proj.weight)


def copy_llama_ends(ours: LLM, hf) -> None:
    copy_into(ours.tok_emb.weight, hf.model.embed_tokens.weight)
    if not ours.config.tie_embeddings:
        copy_into(ours.lm_head.weight, hf.lm_head.weight)
    with torch.no_grad():
        ours.ln_f.weight.copy_(hf.model.norm.weight)


@pytest.mark.parametrize("attn,n_kv", [("mha", 4), ("gqa", 2), ("mqa", 1)])
@pytest.mark.parametrize("tie", [False, True])
def test_llama_parity(attn, n_kv, tie):
    V, C, H, F, L, T = 100, 64, 4, 96, 2, 24
    hf_config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=C, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=n_kv, max_position_embeddings=T, rms_norm_eps=1e-5, rope_theta=5000.0,
        tie_word_embeddings=tie, attention_bias=False, mlp_bias=False, hidden_act="silu",
    )
    hf = transformers.LlamaForCausalLM(hf_config).float()
    spec = dict(attn=attn, n_head=H, n_kv_heads=n_kv, up_dim=F, non_linearity="swiglu")
    ours = build_model(make_config(spec, vocab_size=V, n_embd=C, n_layer=L, block_size=T, pos_emb="rope", rope_theta=5000.0,
                           norm="rms", bias=False, tie_embeddings=tie))
    copy_llama_ends(ours, hf)
    for block, layer in zip(ours.blocks, hf.model.layers):
        copy_llama_mlp_and_norms(block, layer)
        a = layer.self_attn
        with torch.no_grad():
            block.attn.c_attn.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            block.attn.c_proj.weight.copy_(a.o_proj.weight)
    print(f"llama {attn} tie={tie}: max abs diff {compare_logits(ours, hf, V, T):.2e}")


@pytest.mark.parametrize("act,hf_act", [("gelu_tanh", "gelu_new"), ("gelu", "gelu")])
def test_gpt2_parity(act, hf_act):
    V, C, H, L, T = 100, 64, 4, 2, 24
    hf_config = transformers.GPT2Config(
        vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H, n_inner=4 * C, activation_function=hf_act,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
    )
    hf = transformers.GPT2LMHeadModel(hf_config).float()
    ours = build_model(make_config(dict(attn="mha", n_head=H, up_dim=4 * C, non_linearity=act), vocab_size=V, n_embd=C,
                           n_layer=L, block_size=T, pos_emb="learn", norm="layer", bias=True, tie_embeddings=True))
    t = hf.transformer
    copy_into(ours.tok_emb.weight, t.wte.weight)
    with torch.no_grad():
        ours.pos_emb.table.weight.copy_(t.wpe.weight)
        ours.ln_f.weight.copy_(t.ln_f.weight), ours.ln_f.bias.copy_(t.ln_f.bias)
        for block, h in zip(ours.blocks, t.h):
            pairs = [(block.ln_1, h.ln_1, False), (block.ln_2, h.ln_2, False), (block.attn.c_attn, h.attn.c_attn, True),
                     (block.attn.c_proj, h.attn.c_proj, True), (block.ffn.c_fc, h.mlp.c_fc, True),
                     (block.ffn.c_proj, h.mlp.c_proj, True)]
            for mine, theirs, conv1d in pairs:  # GPT-2's Conv1D stores weights transposed
                mine.weight.copy_(theirs.weight.T if conv1d else theirs.weight)
                mine.bias.copy_(theirs.bias)
    print(f"gpt2 {act}: max abs diff {compare_logits(ours, hf, V, T):.2e}")


def deepseek_v3(V: int, C: int, H: int, F: int, L: int, T: int, dc: int, dr: int, q_latent: int | None, **moe):
    hf_config = transformers.DeepseekV3Config(
        vocab_size=V, hidden_size=C, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=H, q_lora_rank=q_latent, kv_lora_rank=dc, qk_rope_head_dim=dr, qk_nope_head_dim=C // H,
        v_head_dim=C // H, rope_interleave=False, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=T,
        tie_word_embeddings=False, attention_bias=False, hidden_act="silu", **moe,
    )
    return transformers.DeepseekV3ForCausalLM(hf_config).float()


def copy_mla(mine, a, q_latent: int | None) -> None:
    with torch.no_grad():
        if q_latent:
            mine.q_proj[0].weight.copy_(a.q_a_proj.weight)
            mine.q_proj[1].weight.copy_(a.q_a_layernorm.weight)
            mine.q_proj[2].weight.copy_(a.q_b_proj.weight)
        else:
            mine.q_proj.weight.copy_(a.q_proj.weight)
        mine.kv_down.weight.copy_(a.kv_a_proj_with_mqa.weight)
        mine.kv_norm.weight.copy_(a.kv_a_layernorm.weight)
        mine.kv_up.weight.copy_(a.kv_b_proj.weight)
        mine.c_proj.weight.copy_(a.o_proj.weight)


def copy_moe_into_hf(moe, hf_moe) -> None:
    """Our MoE layer's weights and selection bias into transformers' DeepseekV3MoE (same [gate | up] layout)."""
    with torch.no_grad():
        hf_moe.gate.weight.copy_(moe.router.gate.weight)
        hf_moe.gate.e_score_correction_bias.copy_(moe.router.expert_bias)
        hf_moe.experts.gate_up_proj.copy_(moe.experts.c_fc.weight)
        hf_moe.experts.down_proj.copy_(moe.experts.c_proj.weight)
        gate, up = moe.shared.c_fc.weight.chunk(2)
        hf_moe.shared_experts.gate_proj.weight.copy_(gate)
        hf_moe.shared_experts.up_proj.weight.copy_(up)
        hf_moe.shared_experts.down_proj.weight.copy_(moe.shared.c_proj.weight)


@pytest.mark.parametrize("q_latent", [None, 24])
def test_mla_parity_with_deepseek_v3(q_latent):
    V, C, H, F, L, T, dc, dr = 100, 64, 4, 96, 2, 24, 32, 8
    hf = deepseek_v3(V, C, H, F, L, T, dc, dr, q_latent, first_k_dense_replace=L)
    spec = dict(attn="mla", n_head=H, q_latent_dim=q_latent, kv_latent_dim=dc, rope_head_dim=dr, up_dim=F,
                non_linearity="swiglu")
    ours = build_model(make_config(spec, vocab_size=V, n_embd=C, n_layer=L, block_size=T, pos_emb="rope", norm="rms",
                           norm_eps=1e-6, bias=False, tie_embeddings=False))
    copy_llama_ends(ours, hf)
    for block, layer in zip(ours.blocks, hf.model.layers):
        copy_llama_mlp_and_norms(block, layer)
        copy_mla(block.attn, layer.self_attn, q_latent)
    print(f"deepseek-v3 mla q_latent={q_latent}: max abs diff {compare_logits(ours, hf, V, T):.2e}")


def test_moe_parity_with_deepseek_v3():
    """A dense first layer, then MLA + MoE layers: sigmoid router with a selection bias, shared experts."""
    V, C, H, F, Fm, L, T, dc, dr, q_latent = 100, 64, 4, 96, 32, 3, 24, 32, 8, 24
    routed, shared, k = 6, 2, 3
    hf = deepseek_v3(V, C, H, F, L, T, dc, dr, q_latent, first_k_dense_replace=1, n_routed_experts=routed,
                     n_shared_experts=shared, num_experts_per_tok=k, moe_intermediate_size=Fm, n_group=1,
                     topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0)
    attn = dict(attn="mla", n_head=H, q_latent_dim=q_latent, kv_latent_dim=dc, rope_head_dim=dr, non_linearity="swiglu")
    moe = dict(ffn="moe", up_dim=Fm, n_exp=routed + shared, n_shared=shared, n_act=shared + k, router_score="sigmoid",
               aux_free=True, norm_topk=True)
    ours = build_model(make_config([dict(attn, up_dim=F)] + [dict(attn, **moe)] * (L - 1), vocab_size=V, n_embd=C,
                           block_size=T, pos_emb="rope", norm="rms", norm_eps=1e-6, tie_embeddings=False))
    copy_llama_ends(ours, hf)
    copy_llama_mlp_and_norms(ours.blocks[0], hf.model.layers[0])
    for block, layer in zip(ours.blocks, hf.model.layers):
        copy_mla(block.attn, layer.self_attn, q_latent)
        with torch.no_grad():
            block.ln_1.weight.copy_(layer.input_layernorm.weight)
            block.ln_2.weight.copy_(layer.post_attention_layernorm.weight)
        if isinstance(block.ffn, MoE):
            with torch.no_grad():
                block.ffn.router.gate.weight.normal_(std=0.3)  # spread-out scores so that the bias matters
                block.ffn.router.expert_bias.copy_(torch.randn(routed) * 0.1)
            copy_moe_into_hf(block.ffn, layer.mlp)

    x = torch.randn(2, T, C)
    with torch.no_grad():
        layer_diff = (ours.blocks[1].ffn(x).out - hf.model.layers[1].mlp(x)).abs().max().item()
    assert layer_diff <= ATOL, f"MoE layer max abs difference {layer_diff:.2e}"
    print(f"deepseek-v3 moe layer: max abs diff {layer_diff:.2e}; "
          f"model: max abs diff {compare_logits(ours, hf, V, T):.2e}")

"""Generation: the cache matches recomputation for every attention kind, batching, sampling and sample.py."""
import math

import pytest
import torch

import sample
from llm.cli import parse
from llm.generate import generate, next_tokens
from llm.model import LLM, build_model
from llm.train import train
from tests.conftest import REPO, make_config
from tests.test_model import ATTENTION_SPECS, POSITIONS


def decode_both_ways(model: LLM, prompts: list[list[int]], steps: int):
    """Greedy tokens and per-step logits with the cache and by recomputing each context."""
    results = []
    for use_cache in (True, False):
        logits = []
        tokens = generate(model, prompts, steps, temperature=0, use_cache=use_cache,
                          on_step=lambda step_logits, new: logits.append(step_logits.clone()))
        results.append((tokens, logits))
    return results


def assert_cache_matches_recompute(model: LLM, prompts: list[list[int]], steps: int) -> None:
    (cached, cached_logits), (full, full_logits) = decode_both_ways(model.eval(), prompts, steps)
    assert cached == full
    for step, (a, b) in enumerate(zip(cached_logits, full_logits)):
        assert (a - b).abs().max().item() <= 1e-5, f"step {step}: logits differ by {(a - b).abs().max().item():.2e}"


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("spec", ATTENTION_SPECS.values(), ids=ATTENTION_SPECS.keys())
def test_cache_equals_recomputation_past_block_size(spec, pos):
    model = build_model(make_config(spec, pos_emb=pos, block_size=16))
    assert_cache_matches_recompute(model, [[3, 1, 4, 1, 5]], steps=20)  # 25 tokens: the window slides after 16


def test_heterogeneous_example_stack_uses_each_layers_cache():
    model_config, _ = parse(["--layer_configs_jsonl", str(REPO / "layer_configs.jsonl"), "--pos_emb", "rope",
                             "--vocab_size", "97", "--block_size", "32", "--n_embd", "64"])
    model = build_model(model_config)
    kinds = [type(layer).__name__ for layer in model.new_cache(1).layers]
    assert kinds == ["LatentCache", "LatentCache", "KVCache", "KVCache"]
    assert_cache_matches_recompute(model, [[5, 9, 2]], steps=35)  # slides past block_size 32


@pytest.mark.parametrize("spec", [ATTENTION_SPECS["gqa"], ATTENTION_SPECS["mla"]], ids=["gqa", "mla"])
@pytest.mark.parametrize("pos", ["learn", "rope"])
def test_batched_prompts_of_different_lengths_equal_each_alone(spec, pos):
    model = build_model(make_config(spec, pos_emb=pos, block_size=16)).eval()
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [42]]
    logits = []
    batched = generate(model, prompts, 14, temperature=0, on_step=lambda step_logits, new: logits.append(step_logits))
    for row, prompt in enumerate(prompts):
        alone_logits = []
        alone = generate(model, [prompt], 14, temperature=0, on_step=lambda l, new: alone_logits.append(l))
        assert alone[0] == batched[row]
        for a, b in zip(alone_logits, logits):
            assert (a[0] - b[row]).abs().max().item() <= 1e-5
    assert_cache_matches_recompute(model, prompts, steps=14)


def test_absorbed_mla_weights_follow_training():
    model = build_model(make_config(ATTENTION_SPECS["mla"], pos_emb="rope"))
    generate(model.eval(), [[1, 2]], 3, temperature=0)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    idx = torch.randint(0, 97, (2, 16))
    model(idx, idx).loss.backward()
    optimizer.step()
    assert_cache_matches_recompute(model, [[1, 2]], steps=6)


def test_cache_bytes_per_token():
    C, H, L = 256, 8, 2
    mha = build_model(make_config(dict(attn="mha", n_head=H), n_embd=C, n_layer=L))
    gqa = build_model(make_config(dict(attn="gqa", n_head=H, n_kv_heads=2), n_embd=C, n_layer=L))
    mla = build_model(make_config(dict(attn="mla", n_head=H, kv_latent_dim=64, rope_head_dim=16), n_embd=C, n_layer=L,
                          pos_emb="rope"))
    assert mha.cache_bytes_per_token() == L * 2 * H * (C // H) * 4
    assert gqa.cache_bytes_per_token() == L * 2 * 2 * (C // H) * 4
    assert mla.cache_bytes_per_token() == L * (64 + 16) * 4
    ratio = mla.cache_bytes_per_token() / mha.cache_bytes_per_token()
    print(f"MLA cache / MHA cache at n_embd {C}, {H} heads, latent 64 + rope 16: {ratio:.1%}")
    deepseek_v2 = (512 + 64) / (2 * 128 * 128)  # kv_lora_rank 512, rope 64 vs MHA with 128 heads of 128
    print(f"at DeepSeek-V2's shapes: {deepseek_v2:.2%} of MHA's cache ({1 - deepseek_v2:.1%} smaller)")
    assert math.isclose(ratio, 80 / 512)


def test_a_row_stops_at_end_of_text():
    model = build_model(make_config(ATTENTION_SPECS["gqa"])).eval()
    free = generate(model, [[1, 2], [3]], 6, temperature=0)
    eot = free[0][2]
    stopped = generate(model, [[1, 2], [3]], 6, temperature=0, eot=eot)
    assert stopped[0] == free[0][:free[0].index(eot)]
    assert len(stopped[1]) <= 6


def test_prompt_longer_than_block_size_is_refused():
    model = build_model(make_config(block_size=8))
    with pytest.raises(ValueError, match="needs 1 to block_size=8"):
        generate(model, [list(range(9))], 2)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]] * 4000)
    generator = torch.Generator().manual_seed(0)
    assert next_tokens(logits[:1], 0, None, None, None).item() == 1
    assert set(next_tokens(logits, 1.0, 2, None, generator).tolist()) == {1, 2}
    probs = logits[0].softmax(-1)  # 0.636, 0.234, 0.086 for tokens 1, 2, 3
    assert set(next_tokens(logits, 1.0, None, 0.8, generator).tolist()) == {1, 2}  # 0.636 < 0.8 <= 0.870
    assert set(next_tokens(logits, 1.0, None, 0.9, generator).tolist()) == {1, 2, 3}  # 0.870 < 0.9 <= 0.956
    assert set(next_tokens(logits, 1.0, None, 0.01, generator).tolist()) == {1}
    draws = next_tokens(logits, 1.0, None, None, torch.Generator().manual_seed(1))
    assert torch.equal(draws, next_tokens(logits, 1.0, None, None, torch.Generator().manual_seed(1)))
    assert abs((draws == 1).float().mean().item() - probs[1].item()) < 0.03


def test_sample_py_streams_from_a_trained_checkpoint(char_data, tmp_path, capsys):
    argv = ["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--max_iters", "3", "--save_model",
            "--n_layer", "1", "--attn", "mla", "--kv_latent_dim", "16", "--rope_head_dim", "8", "--pos_emb", "rope"]
    train(*parse(argv))
    capsys.readouterr()
    sample.main(["--ckpt", str(tmp_path / "run"), "--prompt", "ROMEO:", "--temperature", "0",
                 "--max_new_tokens", "30"])
    streamed = capsys.readouterr().out
    assert streamed.startswith("ROMEO:") and len(streamed) == len("ROMEO:") + 30 + 1
    sample.main(["--ckpt", str(tmp_path / "run"), "--prompt", "ROMEO:", "--temperature", "0",
                 "--max_new_tokens", "30", "--no_cache"])
    assert capsys.readouterr().out == streamed
    sample.main(["--ckpt", str(tmp_path / "run"), "--prompt", "A", "KING", "--num_samples", "2",
                 "--max_new_tokens", "5"])
    out = capsys.readouterr().out
    assert out.count("--- sample") == 4 and "\nKING" in out


@pytest.mark.parametrize("argv,message", [
    (["--ckpt", "nowhere"], "--ckpt=nowhere: "),  # the message after it is llm/checkpoint.py's
    (["--ckpt", "TRAINED", "--prompt", "Ωmega"], "character 'Ω' is not in this char vocabulary"),
    (["--ckpt", "x", "--temperature", "-1"], "--temperature=-1.0 must be >= 0"),
    (["--ckpt", "TRAINED", "--prompt_file", "LATIN1"], "is not UTF-8 text (byte 5 is 0xe9)"),
])
def test_sample_py_bad_input_is_one_line(argv, message, capsys, char_data, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("ROMEO\u00e9".encode("latin-1"))
    argv = [str(tmp_path / "latin1.txt") if a == "LATIN1" else a for a in argv]
    if "TRAINED" in argv:
        train(*parse(["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--max_iters", "1",
                      "--save_model", "--n_layer", "1"]))
        argv = [str(tmp_path / "run") if a == "TRAINED" else a for a in argv]
        capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err


def test_sample_py_keeps_the_end_of_a_long_prompt_or_refuses_it_with_strict_prompt(char_data, tmp_path, capsys):
    train(*parse(["--data_dir", str(char_data.parent), "--out_dir", str(tmp_path), "--max_iters", "1",
                  "--save_model", "--n_layer", "1", "--block_size", "16"]))
    capsys.readouterr()
    greedy = ["--ckpt", str(tmp_path / "run"), "--temperature", "0", "--max_new_tokens", "10"]
    long_prompt = "ROMEO: " * 5 + "JULIET:"  # 42 characters, one token each
    sample.main(greedy + ["--prompt", long_prompt])
    captured = capsys.readouterr()
    assert "note: prompt 1 has 42 tokens, more than block_size=16; keeping its last 16\n" in captured.err
    assert captured.out.startswith(long_prompt)
    continuation = captured.out[len(long_prompt):]
    sample.main(greedy + ["--prompt", long_prompt[-16:]])  # the kept tokens alone continue the same way
    assert capsys.readouterr().out == long_prompt[-16:] + continuation

    with pytest.raises(SystemExit) as exit_info:
        sample.main(greedy + ["--prompt", "A", long_prompt, "--strict_prompt"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""  # refused before anything is echoed
    assert captured.err == ("error: --strict_prompt: prompt 2 has 42 tokens, more than block_size=16; shorten it, "
                            "or drop --strict_prompt to keep its last 16 tokens\n")

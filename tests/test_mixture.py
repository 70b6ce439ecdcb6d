"""--data_mix: weights parsed and checked, rows drawn by weight, deterministic, resumable, split across ranks, one
tokenizer for all sources; a training run logs tokens per source and the weighted validation loss."""
import json

import numpy as np
import pytest
import torch

from llm.cli import parse
from llm.config import ConfigError, parse_mix
from llm.data.loader import TokenLoader
from llm.data.mixture import MixtureLoader, check_same_tokenizer
from llm.train import train

CPU = torch.device("cpu")


def token_file(path, offset: int, n: int = 5000):
    """A token file whose ids tell the source apart: offset + position % 1000."""
    (offset + np.arange(n) % 1000).astype(np.uint16).tofile(path)
    return path


def mixture(tmp_path, batch_size=8, rank=0, world_size=1, seed=0, weights=None) -> MixtureLoader:
    weights = weights or {"a": 0.8, "b": 0.2}
    sources = {name: TokenLoader(token_file(tmp_path / f"{name}.bin", 1000 * (i + 1)), "uint16", batch_size, 16, CPU,
                                 seed + i, "random", rank, world_size)
               for i, name in enumerate(weights)}
    return MixtureLoader(sources, weights, seed, batch_size, CPU, rank, world_size)


def source_of(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0] // 1000  # (B,) 1 for a, 2 for b


@pytest.mark.parametrize("text,message", [("a:1,b", "'b' is not NAME:WEIGHT"), ("a:-1", "positive weight"),
                                          ("a:1,a:2", "names 'a' twice"), ("a:inf", "positive weight"), ("", "''")])
def test_bad_mixes_are_one_line(text, message):
    with pytest.raises(ConfigError, match=message):
        parse(["--data_mix", text])


def test_weights_are_normalised():
    assert parse_mix("x:3, y:1") == {"x": 0.75, "y": 0.25}


def test_rows_follow_the_weights_and_are_whole_windows_of_one_source(tmp_path):
    loader = mixture(tmp_path, batch_size=64)
    sources = torch.cat([source_of(loader.next_batch()[0]) for _ in range(40)])  # 2560 rows
    share = (sources == 1).float().mean().item()
    assert 0.76 < share < 0.84  # 0.8 within about 4 standard deviations
    x, y = loader.next_batch()
    assert torch.equal(x // 1000, source_of(x)[:, None].expand_as(x))  # no row mixes two sources
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert loader.tokens_seen["a"] + loader.tokens_seen["b"] == 41 * 64 * 16


def test_same_seed_same_batches_and_resume_is_exact(tmp_path):
    first, second = mixture(tmp_path), mixture(tmp_path)
    for _ in range(3):
        assert torch.equal(first.next_batch()[0], second.next_batch()[0])
    state = first.state_dict()
    expected = [first.next_batch()[0] for _ in range(3)]
    resumed = mixture(tmp_path)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch()[0], e) for e in expected)
    assert resumed.tokens_seen == first.tokens_seen


def test_state_survives_a_weights_only_checkpoint(tmp_path):
    loader = mixture(tmp_path)
    loader.next_batch()
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    expected = loader.next_batch()[0]
    resumed = mixture(tmp_path)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch()[0], expected)


def test_ranks_split_the_global_batch(tmp_path):
    whole = mixture(tmp_path, batch_size=8).next_batch()[0]
    halves = [mixture(tmp_path, batch_size=4, rank=r, world_size=2).next_batch()[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)


def test_another_mixture_or_a_single_dataset_is_refused_on_resume(tmp_path):
    state = mixture(tmp_path).state_dict()
    with pytest.raises(ConfigError, match="not on the mixture"):
        mixture(tmp_path, weights={"a": 0.5, "c": 0.5}).load_state_dict(state)
    single = TokenLoader(token_file(tmp_path / "s.bin", 0), "uint16", 2, 16, CPU, 0)
    with pytest.raises(ConfigError, match="--data_mix"):
        single.load_state_dict(state)


def test_sources_must_share_a_tokenizer():
    gpt2 = {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256}
    check_same_tokenizer({"a": gpt2, "b": dict(gpt2)})
    with pytest.raises(ConfigError, match="datasets 'a' and 'c' use different tokenizers"):
        check_same_tokenizer({"a": gpt2, "b": dict(gpt2), "c": {"tokenizer": "byte", "vocab_size": 256, "eot": 0}})


def test_a_mixture_run_logs_tokens_per_source_and_the_weighted_val_loss(char_data, tmp_path):
    data = char_data.parent
    (data / "copy").mkdir(exist_ok=True)
    for name in ("train.bin", "val.bin", "meta.json"):
        (data / "copy" / name).write_bytes((char_data / name).read_bytes())
    train(*parse(["--data_dir", str(data), "--data_mix", f"{char_data.name}:3,copy:1", "--out_dir", str(tmp_path),
                  "--max_iters", "4", "--n_layer", "1", "--block_size", "16", "--batch_size", "8",
                  "--total_batch_size_str", "8*16", "--eval", "--eval_interval", "4", "--eval_iters", "2",
                  "--log_interval", "1", "--no_save_model"]))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    last = rows[-1]
    assert last[f"tokens/{char_data.name}"] + last["tokens/copy"] == 4 * 8 * 16
    assert last[f"tokens/{char_data.name}"] > last["tokens/copy"]
    weighted = 0.75 * last[f"val/{char_data.name}_loss"] + 0.25 * last["val/copy_loss"]
    assert last["val_loss"] == pytest.approx(weighted)


def test_dataset_and_data_mix_together_are_refused():
    """A mixture reads only the datasets it names: a --dataset beside it would be silently dropped."""
    with pytest.raises(ConfigError, match="^--dataset genomic and --data_mix 'a:0.5,b:0.5' were both given"):
        parse(["--dataset", "genomic", "--data_mix", "a:0.5,b:0.5"])
    assert parse(["--data_mix", "a:0.5,b:0.5"])[1].data_mix == "a:0.5,b:0.5"

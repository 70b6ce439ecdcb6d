"""The OpenGenome2 recipe end to end at a tiny width: prepare FASTA, train with the preset, export as
LlamaForCausalLM with the nucleotide tokenizer's ids, and score sequences with python -m llm.eval fasta."""
import json
import math
import random
from pathlib import Path

import pytest
import torch

from llm import eval as llm_eval
from llm.checkpoint import load_trained
from llm.cli import parse
from llm.config import ConfigError
from llm.data.prepare import PrepareArgs, prepare
from llm.data.tokenizers import NucleotideTokenizer
from llm.train import train

SHRINK = ["--n_layer", "1", "--n_embd", "64", "--n_head", "4", "--n_kv_heads", "2", "--up_dim", "128",
          "--device", "cpu", "--no_compile", "--no_act_recomp", "--dist", "ddp"]


def write_fasta(path: Path, records: list[str]) -> Path:
    path.write_text("".join(f">seq{i}\n" + "\n".join(r[j:j + 60] for j in range(0, len(r), 60)) + "\n"
                            for i, r in enumerate(records)))
    return path


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, FASTA) of the llama3-8b-genomic preset trained for 2 steps, at its own 8192-token context."""
    folder = tmp_path_factory.mktemp("og2")
    rng = random.Random(0)
    records = ["".join(rng.choice("ACGTacgtN") for _ in range(rng.randint(3000, 12000))) for _ in range(8)]
    fasta = write_fasta(folder / "genome.fa", records)
    prepare(PrepareArgs("genomic", source=str(fasta), out=str(folder / "data" / "genomic"), workers=1), verbose=False)
    train(*parse(["--preset", "llama3-8b-genomic", *SHRINK, "--data_dir", str(folder / "data"), "--out_dir",
                  str(folder / "out"), "--batch_size", "1", "--total_batch_size_str", "8192", "--max_iters", "2",
                  "--warmup_steps", "1", "--log_interval", "1"]))
    return folder / "out" / "run", fasta


def test_the_preset_carries_the_recipe():
    model, cfg = parse(["--preset", "llama3-8b-genomic"])
    assert (model.vocab_size, model.block_size, model.rope_theta, model.tie_embeddings, model.emb_init_std) == \
        (256, 8192, 500000.0, False, 1.0)
    assert (cfg.data_order, cfg.window_stride, cfg.window_specials, cfg.loss_mask) == ("windows", 200, "every", "acgt")
    assert (cfg.beta1, cfg.beta2, cfg.adam_eps, cfg.weight_decay, cfg.decay_embeddings, cfg.grad_clip) == \
        (0.9, 0.95, 1e-8, 0.1, False, 1.0)
    assert (cfg.warmup_steps, cfg.max_iters - cfg.warmup_steps) == (2500, 179814)
    assert cfg.min_lr == pytest.approx(0.02 * cfg.learning_rate)
    helm, helm_cfg = parse(["--preset", "helm-gpt2-mlm"])
    assert (helm.n_layer, helm.n_embd, helm.layers[0].up_dim, helm.pos_emb, helm.block_size, helm.objective) == \
        (10, 640, 2560, "learn", 2048, "mlm")


def test_embeddings_start_at_std_one_and_are_not_decayed():
    from llm.model import build_model
    from llm.train.optim import build_optimizer

    model_config, cfg = parse(["--preset", "llama3-8b-genomic", *SHRINK, "--block_size", "64"])
    model = build_model(model_config)
    assert model.tok_emb.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.05)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.tok_emb.weight) not in decayed and id(model.lm_head.weight) in decayed
    assert optimizer.defaults["eps"] == 1e-8
    with pytest.raises(ConfigError, match="emb_init_std=1.0 needs an untied embedding"):
        parse(["--emb_init_std", "1.0"])


def test_export_loads_as_llama_with_the_nucleotide_ids(recipe_run, tmp_path):
    from llm.export import export

    run, _ = recipe_run
    export(str(run), str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["architectures"], config["vocab_size"], config["eos_token_id"], config["bos_token_id"],
            config["max_position_embeddings"]) == (["LlamaForCausalLM"], 256, 0, 2, 8192)
    rope = config["rope_parameters"] if "rope_parameters" in config else config  # where transformers keeps theta
    assert rope["rope_theta"] == 500000.0


def test_eval_fasta_scores_acgt_labels_without_special_tokens(recipe_run, capsys):
    run, fasta = recipe_run
    result = llm_eval.main(["fasta", "--ckpt", str(run), "--fasta", str(fasta), "--max_sequences", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert len(result["sequences"]) == 3 and lines[0].startswith("record 1 |") and "3 sequences" in lines[-1]
    assert result["bits_per_base"] == result["loss"] / math.log(2)  # one nucleotide per token
    assert f"| {result['bits_per_base']:.4f} bits per base" in lines[-1]
    _, model, _ = load_trained(str(run))
    tokenizer = NucleotideTokenizer()
    record = "".join(fasta.read_text().split(">seq1\n")[1].split(">")[0].split())
    ids = torch.tensor([tokenizer.encode(record)[:8193]])  # no <BOS>, truncated to block_size + 1
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits[0]  # (T, V)
    labels = ids[0, 1:]
    scored = torch.tensor([chr(int(t)) in "ACGTacgt" for t in labels])  # N is left out
    expected = torch.nn.functional.cross_entropy(logits[scored], labels[scored]).item()
    second = result["sequences"][1]
    assert second["tokens"] == int(scored.sum()) < len(labels)
    assert second["loss"] == pytest.approx(expected, rel=1e-4)
    assert second["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
    total = sum(r["loss"] * r["tokens"] for r in result["sequences"]) / result["tokens"]
    assert result["loss"] == pytest.approx(total, rel=1e-6)


def test_eval_fasta_errors_are_one_line(recipe_run, tmp_path, capsys):
    run, _ = recipe_run
    for argv, message in ((["--fasta", str(tmp_path / "none.fa")], "--fasta="),
                          (["--fasta", str(write_fasta(tmp_path / "n.fa", ["NNNN"]))], "no record has an A, C, G or T")):
        with pytest.raises(SystemExit) as exit_info:
            llm_eval.main(["fasta", "--ckpt", str(run), *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err

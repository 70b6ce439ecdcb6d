"""Our models and optimizer against their peers on this machine: transformers' LlamaForCausalLM, MixtralForCausalLM
and MambaForCausalLM built from the same config with the same weights (llm.hf.to_hf), and torch.optim.Muon with
fused AdamW against our Muon; then one markdown table.

    python scripts/peers_cpu.py [--rounds 5] [--steps 5] [--cases llama,mixtral,mamba,muon] [--compile] [--quick]

For each model it prints the parameter counts on both sides and the largest logit difference (fp32, eval mode)
first, then times a training step (forward, backward and a fused AdamW step, the same optimizer on both sides) and
greedy generation at batch 1 (per new token, each side with its own cache). For Muon it times the optimizer step
alone (the same gradients of the Llama-shaped model: our Muon against torch.optim.Muon on the blocks' matrices plus
fused AdamW on the rest, with the same groups and settings) and the Newton-Schulz iteration on those matrices in
bf16 (torch's dtype; ours iterates in fp32 off CUDA, see llm/train/muon.py). --compile also times the compiled
training step (torch.compile, inductor) of each model.

Timing runs in rounds, ours/theirs/theirs/ours, each entry the median of --steps timed calls after one untimed one;
a round's ratio is theirs/ours of its two means (above 1: ours is faster), and the table gives the median ratio over
the rounds and its range. Both sides run in this process with the same torch threads. Without transformers it says
so and exits 0.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llm.cli import parse  # noqa: E402
from llm.generate import generate  # noqa: E402
from llm.model import build_model  # noqa: E402
from llm.train.muon import NS_COEFFICIENTS, NS_STEPS, Muon, newton_schulz  # noqa: E402
from llm.train.optim import muon_groups  # noqa: E402

COMMON = ["--pos_emb", "rope", "--norm", "rms", "--non_linearity", "swiglu", "--no_tie_embeddings",
          "--vocab_size", "8192", "--n_embd", "256", "--n_head", "8", "--n_kv_heads", "4", "--attn", "gqa",
          "--block_size", "256"]
MODELS = {  # name -> (flags, training batch, sequence length)
    "llama": (COMMON + ["--n_layer", "6", "--up_dim", "688"], 8, 256),
    "mixtral": (COMMON + ["--n_layer", "4", "--ffn", "moe", "--n_exp", "8", "--n_act", "2", "--n_shared", "0",
                          "--router_score", "mixtral", "--up_dim", "512"], 8, 256),
    "mamba": (["--attn", "mamba", "--ffn", "none", "--pos_emb", "none", "--norm", "rms", "--vocab_size", "8192",
               "--n_embd", "256", "--n_layer", "4", "--block_size", "256"], 2, 128),  # transformers' scan: a loop
}
MUON_MODEL = "llama"
MUON_SIZE = ["--n_layer", "4", "--n_embd", "128", "--n_head", "4", "--n_kv_heads", "2", "--up_dim", "344"]
"""The model whose gradients the Muon rows take: torch.optim.Muon iterates in bf16, which this kind of CPU runs
30-60x slower than fp32 (a 256 x 256 iteration: 290 ms against 5 ms), so a narrower Llama."""
QUICK = ["--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--n_kv_heads", "2", "--up_dim", "128",
         "--vocab_size", "512"]
PROMPT, NEW_TOKENS = 32, 32


def timed(fn, steps: int) -> float:
    """Seconds of one call of fn: the median of `steps` timed calls after one untimed call."""
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(ours, theirs, rounds: int, steps: int) -> dict:
    """Rounds of ours/theirs/theirs/ours: {"ours": median seconds, "theirs": ..., "ratio": median theirs/ours,
    "low"/"high": the range of the rounds' ratios}."""
    ours_s, theirs_s, ratios = [], [], []
    for _ in range(rounds):
        a1, b1, b2, a2 = timed(ours, steps), timed(theirs, steps), timed(theirs, steps), timed(ours, steps)
        ours_s += [a1, a2]
        theirs_s += [b1, b2]
        ratios.append((b1 + b2) / (a1 + a2))
    return dict(ours=statistics.median(ours_s), theirs=statistics.median(theirs_s),
                ratio=statistics.median(ratios), low=min(ratios), high=max(ratios))


def model_pair(name: str, extra: list[str]):
    """Our model of MODELS[name] with the extra flags, and the transformers model with its weights (fp32, training
    mode)."""
    from llm.hf import to_hf

    config, _ = parse(MODELS[name][0] + extra)
    torch.manual_seed(0)
    ours = build_model(config)
    if config.layers[0].ffn == "moe":
        for block in ours.blocks:  # spread-out router weights, so that every expert gets tokens
            block.ffn.router.gate.weight.data.normal_(std=0.3)
    theirs = to_hf(ours)
    if config.layers[0].ffn == "moe":  # both sides train with a load-balance loss of the same weight
        theirs.config.output_router_logits = True
        theirs.config.router_aux_loss_coef = config.layers[0].coeff
    return ours, theirs


def logit_check(ours, theirs) -> float:
    """The largest absolute logit difference on a random 2 x 64 batch (eval mode)."""
    idx = torch.randint(0, ours.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours.eval()(idx).logits - theirs.eval()(input_ids=idx).logits).abs().max().item()
    ours.train(), theirs.train()
    return diff


def train_steps(ours, theirs, compiled: bool, batch: int, seq: int):
    """(our step, their step): forward, backward, fused AdamW, on the same random tokens."""
    data = torch.randint(0, ours.config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(2))
    idx, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()  # (B, T)
    if compiled:
        torch._dynamo.reset()  # each model compiles afresh, at this shape, as in its own run
    run_ours, run_theirs = (torch.compile(ours), torch.compile(theirs)) if compiled else (ours, theirs)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, fused=True)

    def our_step():
        out = run_ours(idx, targets)
        (out.loss + out.aux_loss).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def their_step():  # labels = targets given pre-shifted, so both sides score the same B x T predictions
        run_theirs(input_ids=idx, labels=targets, shift_labels=targets).loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    return our_step, their_step


def generation(ours, theirs, new_tokens: int):
    """(ours, theirs): greedy generation of new_tokens after a PROMPT-token prompt at batch 1."""
    prompt = torch.randint(0, ours.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    ours.eval(), theirs.eval()

    def our_generation():
        generate(ours, prompt.tolist(), new_tokens, temperature=0)

    def their_generation():
        theirs.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                        pad_token_id=0)

    return our_generation, their_generation


def muon_pair(model):
    """(our Muon, torch.optim.Muon + fused AdamW as one step) over the model's parameters, same groups and rates."""
    _, cfg = parse(["--optimizer", "muon"])
    groups = muon_groups(model, cfg)
    for group in groups:
        group["lr"] = group["peak_lr"]
    ours = Muon(groups)
    matrices = [g for g in groups if g["use_muon"]]
    rest = [g for g in groups if not g["use_muon"]]
    torch_muon = torch.optim.Muon([dict(params=g["params"], lr=g["lr"]) for g in matrices],
                                  momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay)
    torch_adamw = torch.optim.AdamW([dict(params=g["params"], lr=g["lr"], weight_decay=g["weight_decay"])
                                     for g in rest], betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=True)

    def theirs():
        torch_muon.step()
        torch_adamw.step()

    return ours.step, theirs, [p for g in matrices for p in g["params"]]


def muon_rows(model, rounds: int, steps: int, batch: int, seq: int) -> list[tuple[str, dict]]:
    """The optimizer step and the bf16 Newton-Schulz iteration, ours against torch's, on the model's gradients."""
    from torch.optim._muon import _zeropower_via_newtonschulz as torch_iteration

    idx = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(4))
    out = model(idx, idx)
    (out.loss + out.aux_loss).backward()
    our_step, their_step, matrices = muon_pair(model)
    grads = [p.grad.clone() for p in matrices]

    def ours():
        for g in grads:
            newton_schulz(g, dtype=torch.bfloat16)

    def theirs():
        for g in grads:
            torch_iteration(g, NS_COEFFICIENTS, NS_STEPS, 1e-7)

    shapes = sorted({tuple(g.shape) for g in grads})
    size = sum(p.numel() for p in model.parameters()) / 1e6
    return [(f"Muon + AdamW step, llama ({size:.1f}M; ours iterates in fp32 on CPU)",
             compare(our_step, their_step, rounds, steps)),
            (f"Newton-Schulz in bf16, {len(grads)} matrices {shapes}", compare(ours, theirs, rounds, steps))]


def hardware() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    import transformers

    return (f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="llama,mixtral,mamba,muon")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed calls per entry of a round (their median)")
    parser.add_argument("--compile", action="store_true", help="also time the compiled training steps")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test of the script)")
    args = parser.parse_args()
    try:
        import transformers
    except ImportError:
        print("transformers is not installed (pip install -e '.[hf]'); no peer to compare with")
        return
    transformers.logging.set_verbosity_error()  # its notes that Mamba's CUDA kernels are absent on CPU
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(MODELS) - {"muon"})
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join([*MODELS, 'muon'])}")
    new_tokens = 4 if args.quick else NEW_TOKENS
    rows = []
    for name in [c for c in cases if c in MODELS]:
        batch, seq = (2, 32) if args.quick else MODELS[name][1:]
        ours, theirs = model_pair(name, QUICK if args.quick else [])
        n_ours = sum(p.numel() for p in ours.parameters())
        n_theirs = sum(p.numel() for p in theirs.parameters())
        print(f"{name}: {n_ours:,} parameters (ours), {n_theirs:,} (transformers' {type(theirs).__name__}); "
              f"max abs logit difference {logit_check(ours, theirs):.1e}", flush=True)
        label = f"{name} ({n_ours / 1e6:.1f}M)"
        step_pairs = [("eager", False)] + ([("compiled", True)] if args.compile else [])
        for mode, compiled in step_pairs:
            result = compare(*train_steps(ours, theirs, compiled, batch, seq), args.rounds, args.steps)
            rows.append((f"{label}: training step, {batch} x {seq} tokens, {mode}", result))
            print(rows[-1], flush=True)
        result = compare(*generation(ours, theirs, new_tokens), args.rounds, args.steps)
        rows.append((f"{label}: greedy generation, batch 1, {new_tokens} tokens", result))
        print(rows[-1], flush=True)
    if "muon" in cases:
        ours, _ = model_pair(MUON_MODEL, QUICK if args.quick else MUON_SIZE)
        batch, seq = (2, 32) if args.quick else MODELS[MUON_MODEL][1:]
        rows += muon_rows(ours, args.rounds, args.steps, batch, seq)
    print(f"\n{hardware()}, {args.rounds} rounds of ours/theirs/theirs/ours, {args.steps} timed calls each")
    print("| what | ours (ms) | theirs (ms) | ours / theirs speed: median (range) |\n|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {1000 * r['ours']:.1f} | {1000 * r['theirs']:.1f} | "
              f"{r['ratio']:.2f}x ({r['low']:.2f}-{r['high']:.2f}) |")


if __name__ == "__main__":
    main()

"""Peak memory and time of one training forward + backward with the plain cross-entropy (full logits, as
`model(idx, targets, return_logits=True)` computes it) and with the chunked one (the default), each variant in a
fresh process.

The model is GPT-2 124M's shape (vocabulary 50257, learned positions, LayerNorm, tied head) with few layers, so
that the loss dominates. Memory is read two ways: the process's peak RSS (`ru_maxrss`) and its rise during the
steps, and the bytes the forward saves for backward (each storage once, from a saved-tensors hook).

    python scripts/loss_memory.py    # GPT-2 vocabulary, batch 8 x 1024 tokens, 2 layers of width 768
"""
import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time

import torch

from llm.config import PRESETS, resolve_block
from llm.model import build_model
from llm.validate import validate_model

VARIANTS = {"plain": True, "chunked": False}  # variant -> return_logits


def peak_rss_mib() -> float:
    """The process's peak resident set size so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args: argparse.Namespace) -> dict:
    """One variant, in this process: `args.steps` timed forward + backward passes after one untimed one."""
    torch.manual_seed(0)
    model_config, block, _ = PRESETS["gpt2-124m"]
    config = dataclasses.replace(model_config, vocab_size=args.vocab_size, block_size=args.block_size,
                                 n_embd=args.n_embd, n_layer=args.n_layer,
                                 layers=[resolve_block(block, args.n_embd)] * args.n_layer)
    validate_model(config)
    model = build_model(config).train()
    model.objective.chunk = args.chunk
    idx = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size))  # (B, T)
    return_logits = VARIANTS[args.variant]
    saved = {}  # storage pointer -> bytes, of the tensors saved for backward

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    rss_before = peak_rss_mib()
    times, cpu_times, losses = [], [], []
    for step in range(args.steps + 1):
        model.zero_grad(set_to_none=True)
        saved.clear()
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(idx, idx, return_logits=return_logits).loss
        loss.backward()
        if step > 0:  # the first pass is a warm-up
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        losses.append(loss.item())
    return {"variant": args.variant, "loss": losses[-1], "s_per_step": sorted(times)[len(times) // 2],
            "cpu_s_per_step": sorted(cpu_times)[len(cpu_times) // 2],
            "peak_rss_mib": peak_rss_mib(), "rss_rise_mib": peak_rss_mib() - rss_before,
            "saved_mib": sum(saved.values()) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--vocab_size", type=int, default=50257)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--chunk", type=int, default=None, help="tokens per chunk (default: the objective's)")
    parser.add_argument("--variant", choices=VARIANTS, help="measure only this variant, in this process")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch_size} x "
          f"{args.block_size} tokens, vocabulary {args.vocab_size}, {args.n_layer} layers of width {args.n_embd}")
    print("| loss | value | s per forward + backward (CPU s) | peak RSS (MiB) | RSS rise in the steps (MiB) | "
          "saved for backward (MiB) |")
    print("|---|---|---|---|---|---|")
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant], check=True,
                               capture_output=True, text=True)
        r = json.loads(child.stdout)
        print(f"| {variant} | {r['loss']:.6f} | {r['s_per_step']:.1f} ({r['cpu_s_per_step']:.1f}) | "
              f"{r['peak_rss_mib']:,.0f} | {r['rss_rise_mib']:,.0f} | {r['saved_mib']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""The training loop: gradient accumulation, autocast, clipping, warmup + cosine schedule, eval and logging."""
import dataclasses
import json
import math
import re
import time
from pathlib import Path

import torch

from ..config import ConfigError, LLMconfig, Trainconfig, config_dict, total_batch_tokens
from ..data.loader import TokenLoader, read_meta
from ..files import write_atomically
from ..model import LLM
from .checkpoint import save_weights
from .optim import build_optimizer, learning_rate


def run_dir_name(run_name: str) -> str:
    """A path-safe version of a run name ('trial_run_w/o_mix' -> 'trial_run_w_o_mix')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run_name).strip("._") or "run"


def resolve_vocab(model_config: LLMconfig, meta: dict, dataset: str) -> LLMconfig:
    """Takes the dataset's vocabulary when vocab_size is unset; refuses one that cannot hold the data's token ids."""
    if model_config.vocab_size is None:
        return dataclasses.replace(model_config, vocab_size=meta["vocab_size"])
    largest = meta.get("max_token_id", meta["vocab_size"] - 1)
    if model_config.vocab_size <= largest:
        raise ConfigError(f"vocab_size={model_config.vocab_size} is smaller than dataset {dataset!r}'s largest token id "
                          f"{largest} (its {meta['tokenizer']} vocabulary has {meta['vocab_size']}); raise --vocab_size "
                          "or leave it unset")
    return model_config


def format_metrics(m: dict) -> str:
    """One console line per logged step."""
    line = (f"step {m['step']:>5} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | norm {m['grad_norm']:.2f} | "
            f"{m['ms_per_step']:.0f} ms | {m['tokens_per_s']:,.0f} tok/s")
    if "balance_loss" in m:
        line += f" | balance {m['balance_loss']:.4f} | max/mean load {m['max_load_ratio']:.2f}"
    if "val_loss" in m:
        line += f" | train {m['train_loss']:.4f} | val {m['val_loss']:.4f}"
    return line


def moe_metrics(balance_loss: float, loads: list[torch.Tensor], layers: list[int]) -> dict:
    """Balance figures of one step: the balance loss, and per MoE layer its load fractions and max/mean load
    ratio (1 is perfect balance); max_load_ratio is the worst layer's."""
    metrics = {"balance_loss": balance_loss}
    for layer, load in zip(layers, loads):
        load = load.float().cpu()
        metrics[f"load_fractions/layer{layer}"] = [round(v, 4) for v in (load / load.sum()).tolist()]
        metrics[f"max_load_ratio/layer{layer}"] = (load.max() / load.mean()).item()
    metrics["max_load_ratio"] = max(v for k, v in metrics.items() if k.startswith("max_load_ratio/"))
    return metrics


@torch.no_grad()
def estimate_loss(model: LLM, loaders: dict, iters: int, autocast) -> dict[str, float]:
    """Mean loss over `iters` batches of each split."""
    model.eval()
    losses = {}
    for split, loader in loaders.items():
        total = 0.0
        for _ in range(iters):
            x, y = loader.next_batch()
            with autocast():
                total += model(x, y).loss.item()
        losses[f"{split}_loss"] = total / iters
    model.train()
    return losses


def train(model_config: LLMconfig, cfg: Trainconfig) -> dict:
    """Trains the model described by the configs and returns the last metrics."""
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = Path(cfg.data_dir) / cfg.dataset
    meta = read_meta(data, cfg.dataset)
    model_config = resolve_vocab(model_config, meta, cfg.dataset)
    loaders = {split: TokenLoader(data / f"{split}.bin", meta["dtype"], cfg.batch_size, model_config.block_size,
                                  device, cfg.seed + i, order) for i, (split, order) in
               enumerate((("train", cfg.data_order), ("val", "random")))}
    tokens_per_step = total_batch_tokens(cfg)
    accum_steps = tokens_per_step // (cfg.batch_size * model_config.block_size)

    model = LLM(model_config).to(device)
    model.act_recomp = cfg.act_recomp
    step_model = torch.compile(model) if cfg.compile else model
    optimizer = build_optimizer(model, cfg.learning_rate, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731

    run_dir = Path(cfg.out_dir) / run_dir_name(cfg.wandb_run_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = json.dumps(config_dict(model_config, cfg), indent=2)
    write_atomically(run_dir / "config.json", lambda tmp: tmp.write_text(resolved))
    total, active = model.get_num_params()
    print(f"model: {total:,} parameters ({active:,} active); {accum_steps} micro-steps of "
          f"{cfg.batch_size}x{model_config.block_size} tokens per step on {device.type}; run dir {run_dir}")
    wandb = None
    if cfg.wandb_log:
        import wandb

        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=config_dict(model_config, cfg))

    moe_layers = [i for i, block in enumerate(model_config.layers) if block.moe]
    metrics, t0, last_logged = {}, time.perf_counter(), -1
    with open(run_dir / "metrics.jsonl", "w") as log:
        for step in range(cfg.max_iters):
            lr = learning_rate(step, cfg.learning_rate, cfg.warmup_steps, cfg.max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, balance_sum = torch.zeros((), device=device), torch.zeros((), device=device)
            loads = []  # per MoE layer, tokens per expert over the step's micro-steps
            for _ in range(accum_steps):
                x, y = loaders["train"].next_batch()
                with autocast():
                    out = step_model(x, y)
                ((out.loss + out.balance_loss) / accum_steps).backward()
                loss_sum += out.loss.detach()
                balance_sum += out.balance_loss.detach()
                loads = [a + b for a, b in zip(loads, out.expert_loads)] if loads else list(out.expert_loads)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_expert_bias(loads)  # loads over the whole step's batch; a no-op without aux-free layers

            last = step == cfg.max_iters - 1
            if step % cfg.log_interval == 0 or last:
                loss_value = loss_sum.item() / accum_steps
                if not math.isfinite(loss_value):
                    raise SystemExit(f"error: the loss became {loss_value} at step {step}; lower --learning_rate")
                dt = (time.perf_counter() - t0) / (step - last_logged)
                metrics = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(),
                           "ms_per_step": 1000 * dt, "tokens_per_s": tokens_per_step / dt}
                if moe_layers:
                    metrics.update(moe_metrics(balance_sum.item() / accum_steps, loads, moe_layers))
                if cfg.eval and (step % cfg.eval_interval == 0 or last):
                    metrics.update(estimate_loss(model, loaders, cfg.eval_iters, autocast))
                print(format_metrics(metrics))
                log.write(json.dumps(metrics) + "\n")
                if wandb is not None:
                    wandb.log(metrics, step=step)
                t0, last_logged = time.perf_counter(), step
    if cfg.save_model:
        print(f"saved {save_weights(model, run_dir, cfg.file_name)}")
    if wandb is not None:
        wandb.finish()
    return metrics

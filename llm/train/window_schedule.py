"""--window_schedule linear/scaled: the sliding-window limit of each training step, as the modded-nanogpt speedrun
grows its windows (to 1728 tokens in blocks of 128)."""
from torch import nn

from ..config import Trainconfig
from ..model.mixers.attention import schedule_windows


def scheduled_window(step: int, cfg: Trainconfig) -> int | None:
    """The limit at `step` (0-based) of max_iters steps, None without a schedule:
    min(window_max, window_block * max(1, ceil(window_max * step / ((max_iters - 1) * window_block)))), i.e. the
    straight line from 0 to window_max rounded up to a multiple of window_block: window_block at step 0, window_max
    at the last step. It depends on the step alone, so a resumed run continues it exactly."""
    if cfg.window_schedule == "none":
        return None
    span = max(1, cfg.max_iters - 1) * cfg.window_block
    blocks = -(-cfg.window_max * step // span)  # ceil
    return min(cfg.window_max, cfg.window_block * max(1, blocks))


def apply_window_schedule(model: nn.Module, step: int, cfg: Trainconfig) -> None:
    """Limits the model's sliding windows to the step's scheduled window, or to their shares of it under the scaled
    schedule (nothing without a schedule)."""
    schedule_windows(model, scheduled_window(step, cfg), cfg.window_max if cfg.window_schedule == "scaled" else None)

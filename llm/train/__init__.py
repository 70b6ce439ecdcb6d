"""The training loop and what it needs: optimizer, schedule, checkpoints."""
from .loop import train

__all__ = ["train"]

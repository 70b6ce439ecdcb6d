"""Atomic file writes shared by data preparation and checkpointing."""
import os
from pathlib import Path
from typing import Callable


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Calls write(tmp), fsyncs tmp and renames it onto path, so a crash leaves any previous file intact."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)

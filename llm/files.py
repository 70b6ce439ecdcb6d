"""Atomic writes of files and folders, shared by data preparation and checkpointing."""
import os
import shutil
from pathlib import Path
from typing import Callable


def fsync_path(path: Path) -> None:
    """Flushes a file or a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Calls write(tmp), fsyncs tmp and renames it onto path, so a crash leaves any previous file intact."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)


def write_folder_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Calls write(tmp_folder), fsyncs its files and renames it to path (replacing a previous folder of that name);
    a crash while writing leaves only a `.tmp` folder beside the intact older ones."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    for file in tmp.iterdir():
        fsync_path(file)
    fsync_path(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    fsync_path(path.parent)

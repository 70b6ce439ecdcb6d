"""`--import MODULE`: modules that register kinds of their own (architectures, objectives, mixers, ...) imported
before a config is validated or a checkpoint is loaded, so that runs and checkpoints of those kinds work with every
command. A module is looked up on sys.path and in the working directory, as `python -m` does."""
import importlib
import sys
from pathlib import Path
from typing import Annotated

import tyro

from .config import ConfigError

# The type of an `imports` field of a command's arguments, spelled --import on the command line (repeatable).
Imports = Annotated[list[str], tyro.conf.arg(name="import"), tyro.conf.UseAppendAction]


def import_modules(names: list[str]) -> None:
    """Imports each named module; a module that cannot be found is a one-line ConfigError."""
    if names and str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.append(str(Path.cwd()))
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):
                raise  # the module exists but imports something missing: its own traceback says what
            raise ConfigError(f"--import={name!r}: no module named {e.name!r} on sys.path or in {Path.cwd()}; pass a "
                              "module name (mykinds for ./mykinds.py), not a file path") from None

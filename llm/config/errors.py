"""The error type for user mistakes in configuration, and the checks that raise it."""
import contextlib
import sys
from pathlib import Path


class ConfigError(ValueError):
    """A user mistake in a config, a flag or a layer spec.

    The message is one line that names the field, the value and the fix; entry points print it
    and exit with code 2 instead of showing a traceback.
    """


@contextlib.contextmanager
def exit_on_user_error():
    """Turns a ConfigError into one line on stderr and exit code 2."""
    try:
        yield
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def require(ok: bool, message: str) -> None:
    """Raises ConfigError(message) unless ok: the one-line form of every config check."""
    if not ok:
        raise ConfigError(message)


def read_user_text(path: Path, given_as: str) -> str:
    """The text of a file a user named (given_as: the flag and value, for the message); a file that is not UTF-8
    text is a one-line ConfigError."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{given_as}: {path} is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}); "
                          "pass a text file saved as UTF-8") from None


def require_folder(path: Path, given_as: str) -> None:
    """Refuses a path that names an existing file where a folder is to be written."""
    require(not path.exists() or path.is_dir(), f"{given_as}: {path} is a file, not a folder; pass a folder path")

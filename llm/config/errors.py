"""The error type for user mistakes in configuration."""
import contextlib
import sys


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

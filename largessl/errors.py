"""Errors that end a command with one clear line and exit code 2 (no traceback)."""


class UserError(Exception):
    """Something the user has to change: a config key, a path, a dataset. Printed as one line."""


class ConfigError(UserError):
    """A bad config key or value. The message names the key."""


class DataError(UserError):
    """A missing, empty or unreadable dataset or shard. The message names the file."""


def one_line(exc: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker re-raised it with its traceback."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        # torch's DataLoader wraps a worker's exception as "Caught X in worker...\nOriginal Traceback...\nX: msg".
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(exc).__name__

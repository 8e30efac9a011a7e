"""Errors that end a command with one clear line and exit code 2 (no traceback)."""


class UserError(Exception):
    """Something the user has to change: a config key, a path, a dataset. Printed as one line."""


class SharedError(UserError):
    """An error every rank raises alike (a config value, or a decision rank 0 made and broadcast): printed by rank 0
    only. Other UserErrors are one rank's own (its shard, its file) and every rank prints its own."""


class ConfigError(SharedError):
    """A bad config key or value. The message names the key."""


class DataError(UserError):
    """A missing, empty or unreadable dataset or shard. The message names the file."""


def is_lost_peer(exc: BaseException) -> bool:
    """A collective failed because another rank went away (it failed first, and said why)."""
    if not isinstance(exc, RuntimeError):
        return False
    return type(exc).__name__ == "DistBackendError" or any(  # torch.distributed's, without importing torch here
        marker in str(exc) for marker in ("Connection closed by peer", "Connection reset by peer", "NCCL error",
                                          "ProcessGroupNCCL", "Broken pipe"))


def one_line(exc: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker re-raised it with its traceback."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        # torch's DataLoader wraps a worker's exception as "Caught X in worker...\nOriginal Traceback...\nX: msg".
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(exc).__name__

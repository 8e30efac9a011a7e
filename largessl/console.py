"""Lines on stderr that stay whole when several processes share it.

`print` writes the text and its newline in two calls, which are two system calls when stderr is unbuffered
(PYTHONUNBUFFERED, `python -u`, which SLURM users often set): a DataLoader worker's warning and a rank's error
line could then run together on one line. A line handed over in one write is one system call, and one write of
less than PIPE_BUF bytes to a pipe is never interleaved with another process's.
"""

from __future__ import annotations

import sys


def err_line(text: str) -> None:
    """Write `text` and its newline to stderr in one call, and flush."""
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (RuntimeError, ValueError):  # re-entered from a signal handler mid-write, or stderr closed
        pass

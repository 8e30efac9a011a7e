"""Lines on stderr that stay whole when several processes share it.

`print` writes the text and its newline separately when stderr is unbuffered (PYTHONUNBUFFERED, `python -u`,
which SLURM users often set), so a DataLoader worker's warning and a rank's error line could run together on
one line. One `os.write` of a line shorter than PIPE_BUF is atomic on a pipe and is not split on a terminal.
"""

from __future__ import annotations

import os
import sys


def err_line(text: str) -> None:
    """Write `text` and a newline to stderr in one system call, after whatever Python still buffers there."""
    try:
        sys.stderr.flush()
    except (RuntimeError, ValueError):  # re-entered from a signal handler mid-write, or stderr closed
        pass
    data = (text + "\n").encode("utf-8", "backslashreplace")
    while data:
        data = data[os.write(2, data):]

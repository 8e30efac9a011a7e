"""What every `largessl` command shares on the command line: a parser that reports a bad argument in one line,
the help layout, and the one line (and exit code) of a failure."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from largessl import endings
from largessl.console import err_line
from largessl.errors import SharedError, UserError, is_lost_peer, one_line
from largessl.files import write_atomic
from largessl.lifecycle import rank_prefix


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit code 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        err_line(f"{self.prog}: error: {message} (see {self.prog} --help)")
        sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its meaning (when it has one); descriptions and epilogs keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or action.required:
            return text
        return f"{text} (default: %(default)s)"


def report_failure(exc: BaseException) -> int:
    """One line on stderr for any exception, and the exit code: 2 for what the user must fix, 1 otherwise (with
    the traceback above the line, when it is a bug rather than a failed disk, file or peer). Under torchrun the
    line is also the process's error file, so torchrun's failure summary names it as the root cause."""
    code, line, bug = judged(exc)
    if bug:
        traceback.print_exception(exc)
    if code == 2 and isinstance(exc, SharedError) and int(os.environ.get("RANK", "0")) != 0:
        record_for_launcher(line)  # the same on every rank: rank 0 says it
        endings.keep(line)
        return code
    endings.say(line)
    record_for_launcher(line, "".join(traceback.format_exception(exc)) if bug else line)
    return code


def judged(exc: BaseException) -> tuple[int, str, bool]:
    """(exit code, the line, whether it is a bug: a traceback helps) of a failure."""
    if isinstance(exc, SharedError):
        return 2, f"largessl: error: {one_line(exc)}", False
    if isinstance(exc, UserError):
        return 2, f"largessl: error: {rank_prefix()}{one_line(exc)}", False
    if isinstance(exc, OSError):
        return 2, f"largessl: error: {rank_prefix()}{exc}", False
    if is_lost_peer(exc):
        return 1, (f"largessl: error: {rank_prefix()}lost contact with another rank, which probably failed (its "
                   f"error is above): {one_line(exc)[:300]}"), False
    bug = f"{type(exc).__name__}: {one_line(exc)} (a bug: the traceback is above)"
    return 1, f"largessl: error: {rank_prefix()}{bug}", True


def record_for_launcher(line: str, callstack: str = "") -> None:
    """Write the failure where torchrun's summary reads it ($TORCHELASTIC_ERROR_FILE, in the format of torch's
    ErrorHandler.record_exception); nothing outside torchrun. A file that cannot be written is passed over."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": line, "extraInfo": {"py_callstack": callstack or line,
                                                          "timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError):
        write_atomic(Path(path), json.dumps(record))

"""What every `largessl` command shares on the command line: a parser that reports a bad argument in one line,
the help layout, and the one line (and exit code) of a failure."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from largessl.console import err_line
from largessl.errors import UserError, is_lost_peer, one_line
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
    the traceback above the line, when it is a bug rather than a failed disk, file or peer)."""
    from largessl.errors import SharedError

    if isinstance(exc, SharedError):  # the same on every rank: rank 0 says it
        if int(os.environ.get("RANK", "0")) == 0:
            err_line(f"largessl: error: {one_line(exc)}")
        return 2
    if isinstance(exc, UserError):
        err_line(f"largessl: error: {rank_prefix()}{one_line(exc)}")
        return 2
    if isinstance(exc, OSError):
        err_line(f"largessl: error: {rank_prefix()}{exc}")
        return 2
    if is_lost_peer(exc):
        err_line(f"largessl: error: {rank_prefix()}lost contact with another rank, which probably failed (its error "
                 f"is above): {one_line(exc)[:300]}")
        return 1
    traceback.print_exception(exc)
    err_line(f"largessl: error: {rank_prefix()}{type(exc).__name__}: {one_line(exc)} (a bug: the traceback is above)")
    return 1

"""One progress line for long work: count, images/s, ETA; redrawn in place on a terminal, a line every 30 s in logs."""

from __future__ import annotations

import sys
import time


def duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


class Progress:
    def __init__(self, label: str, total: int, *, stream=None, log_every: float = 30.0) -> None:
        # sys.stderr looked up now, not at import: a caller (or pytest's capsys) may have replaced it since
        self.label, self.total, self.stream = label, total, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last_print = time.monotonic()
        self.log_every = log_every
        self.done = 0

    def update(self, done: int, extra: str = "", force: bool = False) -> None:
        self.done = done
        now = time.monotonic()
        if not force and now - self.last_print < (0.5 if self.tty else self.log_every):
            return
        self.last_print = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = duration((self.total - done) / rate) if rate > 0 else "?"
        pct = 100 * done / self.total if self.total else 100.0
        line = f"{self.label}: {done:,}/{self.total:,} ({pct:.1f}%) {rate:,.0f} img/s ETA {eta}{extra}"
        self.stream.write(f"\r{line}\033[K" if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> float:
        self.update(self.done, force=True)
        if self.tty:
            self.stream.write("\n")
        return time.monotonic() - self.start

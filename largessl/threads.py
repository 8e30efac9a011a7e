"""A call that must not hold its caller: run on a daemon thread, waited for a bounded time."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def bounded(action: Callable[[], Any], timeout: float, name: str) -> tuple[bool, Any, BaseException | None]:
    """(whether `action()` ended within `timeout` s, what it returned, what it raised). The thread is a daemon: one
    that never returns (a server that accepts but never answers; a client's own timeout does not cover a reply that
    never comes) is left behind and dies with the process."""
    outcome: list[tuple[Any, BaseException | None]] = []

    def attempt() -> None:
        try:
            outcome.append((action(), None))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append((None, exc))

    thread = threading.Thread(target=attempt, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    return (True, *outcome[0]) if outcome else (False, None, None)

"""A SQLite MLflow store appears whole or not at all.

MLflow makes a new SQLite store in place: its first connection creates the tables and runs the schema migrations
(some 1,700 statements, seconds), most committed on their own. A process killed meanwhile (a time limit, a
preemption) leaves a file with some of the tables and an alembic version behind them; every later connection runs
the migrations again from that version and fails ("table webhooks already exists"), for good. So every connection
largessl makes to a SQLite store (the delivery thread, evaluation's attach, `largessl compare`) goes through
open_client, which first makes the file at the store's path a whole store:

- absent: made whole in a temporary file beside it (.NAME.largessl-new-PID-HEX), then hard-linked into place, which
  fails rather than replace a store another process put there meanwhile (that one is used). A kill leaves no store
  or a whole one, and at most a temporary file, which the next creation removes.
- half-made (MLflow would set it up again: tables missing, or its migrations not recorded as finished) and holding
  nothing (no run, experiment or registered model: a creation cut short): renamed to NAME.half-made-STAMP, said in
  one line, and replaced by a whole one. One written to in the last QUIET_S seconds is left until then: another
  process (plain MLflow) may be making it right now.
- not whole but holding data (an MLflow upgrade cut short, or a store an older MLflow made): left to MLflow, which
  upgrades the latter; if the upgrade trips over what a cut-short one made, MLflow rolls it back and StoreUnusable
  says so in one line, with what to do. The store is never changed by largessl.
- anything else (whole, made by a newer MLflow, not a database): left to MLflow.

Opened for reading only (create=False: `largessl compare`, evaluation's attach), a path that is not an MLflow store
(missing, a directory, unreadable, empty, not an SQLite database or one without MLflow's tables) is StoreUnusable,
saying which, and is left as it is.

Creations and replacements of one store take turns under a lock on .NAME.largessl-lock beside it (released by the
kernel when its holder dies), so two jobs creating one store both end up using one whole store.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from largessl.tracking.journal import warn
from largessl.tracking.store import describe, sqlite_file

QUIET_S = 60.0  # a half-made store or a temporary file not written for this long has no live maker
LOCK_WAIT_S = 60.0  # longest wait for another process's creation of the same store
LOCK_POLL_S = 0.1
NEW_TAG = ".largessl-new-"  # .NAME.largessl-new-PID-HEX: a store being made
COMPANIONS = ("-journal", "-wal", "-shm")  # SQLite's files beside a database, which go where it goes
CONTENTS = {"runs": "run(s)", "experiments": "experiment(s)", "registered_models": "registered model(s)"}
CONFLICTS = ("already exists", "duplicate column")  # MLflow re-running a migration a cut-short one half did
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database

_THREADS = threading.Lock()  # the file lock excludes other processes; this, other threads of this one


class StoreBusy(Exception):
    """Another process is making the store: try again later."""


class StoreUnusable(Exception):
    """The store cannot be used and trying again cannot help; the message says why and what to do."""


@dataclass(frozen=True)
class Shape:
    """What a SQLite file holds: its tables, the alembic version recorded ('' if none), whether that is the whole of
    this MLflow's schema and, when it is not, its data, e.g. {'run(s)': 3} (nonzero counts only; the Default
    experiment is not counted)."""

    tables: frozenset[str]
    version: str
    whole: bool
    contents: dict[str, int]


def open_client(uri: str, create: bool = True) -> Any:
    """An MlflowClient for store `uri`, a SQLite one once its file is a whole store (absent: created when `create`;
    else a file that is not an MLflow store is StoreUnusable). Raises StoreUnusable (one line, to be shown as it
    is) or StoreBusy (try again later)."""
    from mlflow.tracking import MlflowClient

    path = sqlite_file(uri)
    problem = unreadable(path) if path and not create else ""
    if problem:
        raise StoreUnusable(problem)
    holding = ensure_whole(path, create) if path else ""
    return _upgraded(uri, path, holding) if path and holding else MlflowClient(tracking_uri=uri)


def unreadable(path: Path) -> str:
    """Why `path` cannot be read as an MLflow store ('' when it may be one): it is missing, not a regular file,
    unreadable, empty, not an SQLite database, or one without any of MLflow's tables (another program's)."""
    if not path.exists():
        return f"no MLflow store at {path}"
    if not path.is_file():
        return f"{path} is {'a directory' if path.is_dir() else 'not a regular file'}, not an MLflow store"
    try:
        with open(path, "rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as exc:
        return f"MLflow store {path} cannot be read ({exc.strerror or exc})"
    if header != SQLITE_HEADER:
        return f"{path} is {'an empty file' if not header else 'not an SQLite database'}, not an MLflow store"
    try:
        shape = _read(path)
    except sqlite3.Error as exc:
        return f"MLflow store {path} cannot be read ({exc})"
    if shape is None:
        return f"{path} is a damaged SQLite database, not a usable MLflow store"
    if not shape.tables & _schema()[0]:
        return f"{path} is an SQLite database without MLflow's tables (another program's?), not an MLflow store"
    return ""


def ensure_whole(path: Path, create: bool = True) -> str:
    """Make `path` a whole MLflow store if it is absent (when `create`) or half-made and holds nothing. Returns ''
    when MLflow can now take it as it is, else what it holds ('3 run(s)'): not whole, left to MLflow's upgrade."""
    verdict, shape = _judge(path)
    if verdict == "other" and shape:
        tables = ", ".join(sorted(shape.tables)[:4])
        raise StoreUnusable(f"{path} is an SQLite database of another program (tables {tables}), not an MLflow "
                            "store; it is left as it is: choose another store (tracking.uri)")
    if verdict not in ("absent", "half-made"):
        return _left(verdict, shape, path)
    if verdict == "absent" and not create:
        raise StoreUnusable(f"no MLflow store at {path}")
    with _locked(path) as exclusive:
        verdict, shape = _judge(path)  # again: another process may have made it meanwhile
        if verdict == "absent" and not create:
            raise StoreUnusable(f"no MLflow store at {path}")
        if verdict == "half-made":
            _set_aside(path)
        if verdict in ("absent", "half-made"):
            _create(path, exclusive)
            return ""
        return _left(verdict, shape, path)


def _left(verdict: str, shape: Shape | None, path: Path) -> str:
    """What ensure_whole returns for a store it leaves as it is (a whole one loses its leftover temporary files)."""
    if verdict == "whole":
        _remove_leftovers(path, exclusive=False)
    return ", ".join(f"{n} {what}" for what, n in shape.contents.items()) if verdict == "holding" and shape else ""


def _upgraded(uri: str, path: Path, holding: str) -> Any:
    """A client of a store that is not whole but holds data, once MLflow has opened it: it upgrades one that an
    older MLflow made whole. Re-running a migration that a cut-short upgrade half did fails (MLflow rolls it back):
    StoreUnusable."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
        return client
    except Exception as exc:
        if not any(conflict in str(exc) for conflict in CONFLICTS):
            raise
        raise StoreUnusable(
            f"MLflow store {path} holds {holding} but is half-made, as an MLflow upgrade cut short leaves it "
            f"({describe(exc)}); it is left as it is: restore it from a backup, or use another store") from None


# ----------------------------------------------------------------------------- what is there


def _judge(path: Path) -> tuple[str, Shape | None]:
    """'absent'; 'whole'; 'foreign' (not a database, or from a newer MLflow: MLflow says what it makes of it);
    'other' (another program's database: refused, never replaced); 'holding' (not whole, holds data) or
    'half-made' (not whole, holds nothing)."""
    if not path.exists():
        return "absent", None
    shape = _read(path)
    if shape is None:
        return "foreign", None
    if shape.whole:
        return "whole", shape
    if shape.version and shape.version not in _schema()[2]:
        return "foreign", shape
    if another_programs(shape.tables):
        return "other", shape
    return ("holding" if shape.contents else "half-made"), shape


def another_programs(tables: frozenset[str]) -> bool:
    """Whether a database's tables are another program's: some, none of them MLflow's (SQLite's own and alembic's
    version table, which a store cut short while being made may hold alone, do not count)."""
    own = {name for name in tables if not name.startswith("sqlite_") and name != "alembic_version"}
    return bool(own) and not own & _schema()[0]


def _read(path: Path) -> Shape | None:
    """The shape of database `path`; None when it is not an SQLite database. Opening it rolls back what a killed
    writer left in a hot journal, as any SQLite connection to it does."""
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True, timeout=20)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version, (expected, head, _) = _version(db, tables), _schema()
            whole = expected <= tables and version == head
            return Shape(frozenset(tables), version, whole, {} if whole else _contents(db, tables))
    except sqlite3.OperationalError:  # locked, or vanished: try again later
        raise
    except sqlite3.DatabaseError:
        return None


def _version(db: sqlite3.Connection, tables: set[str]) -> str:
    rows = db.execute("SELECT version_num FROM alembic_version").fetchall() if "alembic_version" in tables else []
    return str(rows[0][0]) if len(rows) == 1 else ""


def _contents(db: sqlite3.Connection, tables: set[str]) -> dict[str, int]:
    """Rows of data (runs, experiments but Default, registered models), also in a table that a cut-short migration
    left as its copy _alembic_tmp_NAME."""
    counts = {}
    for table, what in CONTENTS.items():
        where = " WHERE experiment_id != 0" if table == "experiments" else ""
        found = [name for name in (table, f"_alembic_tmp_{table}") if name in tables]
        counts[what] = sum(db.execute(f'SELECT COUNT(*) FROM "{name}"{where}').fetchone()[0] for name in found)
    return {what: n for what, n in counts.items() if n}


@functools.cache
def _schema() -> tuple[frozenset[str], str, frozenset[str]]:
    """This MLflow's store: the tables it expects, its newest migration and every migration it knows."""
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import Base, _get_alembic_config  # importing it defines every table of Base

    script = ScriptDirectory.from_config(_get_alembic_config(""))
    known = frozenset(revision.revision for revision in script.walk_revisions())
    return frozenset(Base.metadata.tables), script.get_current_head() or "", known


# ----------------------------------------------------------------------------- making one


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """Hold the lock on making `path` (on .NAME.largessl-lock beside it). Yields whether it is held for real: on a
    filesystem without locks it is not, and only files quiet for QUIET_S count as left behind."""
    with _THREADS, open(path.with_name(f".{path.name}.largessl-lock"), "ab") as handle:
        yield _acquire(handle.fileno(), path)


def _acquire(fd: int, path: Path) -> bool:
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except (BlockingIOError, PermissionError):  # held by another process
            if time.monotonic() > deadline:
                raise StoreBusy(f"another process has been making MLflow store {path} for over "
                                f"{LOCK_WAIT_S:g}s") from None
            time.sleep(LOCK_POLL_S)
        except OSError:  # no locks on this filesystem
            return False


def _create(path: Path, exclusive: bool) -> None:
    """A whole store at `path`: made in a temporary file beside it, then linked into place, unless a store got
    there meanwhile (then that one is used)."""
    _remove_leftovers(path, exclusive)
    temp = path.with_name(f".{path.name}{NEW_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _initialise(temp)
        _publish(temp, path)
    finally:
        _remove(temp)


def _initialise(temp: Path) -> None:
    """MLflow's own set-up of a new store (its first tables, then every migration), on `temp`, flushed to disk.
    MLflow adds the Default experiment on its first connection to the store."""
    from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine

    engine = create_sqlalchemy_engine(f"sqlite:///{temp}")
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    with open(temp, "rb+") as made:
        os.fsync(made.fileno())


def _publish(temp: Path, path: Path) -> None:
    """Give whole store `temp` the name `path` as well, unless something has it by now."""
    orphans = _free_name(path, "orphaned")
    if _move_companions(path, orphans):  # SQLite would pair a journal left without its database with ours
        warn(f"SQLite files of {path} without the database itself were moved to {orphans}-*")
    try:
        os.link(temp, path)
    except FileExistsError:
        return
    except OSError:  # a filesystem without hard links: a rename, which replaces, so only where nothing is
        if path.exists():
            return
        os.rename(temp, path)
    _sync_directory(path.parent)


def _set_aside(path: Path) -> None:
    """Rename half-made store `path` (then its SQLite files) to NAME.half-made-STAMP, saying so; StoreBusy while
    it may still be being made (written to in the last QUIET_S seconds)."""
    age = time.time() - max(f.stat().st_mtime for f in _with_companions(path) if f.exists())
    if age < QUIET_S:
        raise StoreBusy(f"MLflow store {path} is half-made and was written {age:.0f}s ago: another process may be "
                        f"making it; it is replaced once left alone for {QUIET_S:g}s")
    aside = _free_name(path, "half-made")
    os.rename(path, aside)
    warn(f"MLflow store {path} was left half-made (its creation was cut short; it holds no runs): moved to "
         f"{aside}; a whole one is made in its place")
    _move_companions(path, aside)


def _with_companions(path: Path) -> list[Path]:
    return [path] + [path.with_name(path.name + suffix) for suffix in COMPANIONS]


def _move_companions(path: Path, target: Path) -> bool:
    """Rename the SQLite files beside `path` (NAME-journal...) to go with `target`; whether there were any."""
    moved = False
    for suffix in COMPANIONS:
        with contextlib.suppress(FileNotFoundError):
            os.rename(path.with_name(path.name + suffix), target.with_name(target.name + suffix))
            moved = True
    return moved


def _free_name(path: Path, tag: str) -> Path:
    """NAME.TAG-STAMP beside `path` (with -N added if taken), for it and its SQLite files."""
    base = f"{path.name}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = path.with_name(base), 1
    while any(f.exists() for f in _with_companions(candidate)):
        candidate, n = path.with_name(f"{base}-{n}"), n + 1
    return candidate


def _remove_leftovers(path: Path, exclusive: bool) -> None:
    """Remove the temporary files of earlier creations of `path`: those whose maker is gone (all of them, while
    the lock is held), quiet for QUIET_S, or already linked into place (a maker killed just after linking)."""
    prefix = f".{path.name}{NEW_TAG}"
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for entry in [e for e in entries if e.name.startswith(prefix)]:
            leftover = Path(entry.path)
            with contextlib.suppress(OSError):
                if exclusive or _quiet(leftover) or os.path.samefile(leftover, path):
                    leftover.unlink()


def _quiet(path: Path) -> bool:
    return time.time() - path.stat().st_mtime >= QUIET_S


def _remove(temp: Path) -> None:
    for name in _with_companions(temp):
        name.unlink(missing_ok=True)


def _sync_directory(directory: Path) -> None:
    """Flush a directory's entries to disk (the new name of a store), where the filesystem allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

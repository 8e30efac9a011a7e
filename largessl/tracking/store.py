"""Which MLflow store a run uses, whether a SQLite store can be written, how to browse a run in it, and what an
MLflow error means (the store did not answer: try again; it answered no: stop trying)."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

from largessl.config.schema import TrackingConfig
from largessl.errors import ConfigError
from largessl.tracking.journal import STATE_FILE, read_state

HTTP_TIMEOUT_S = 10  # per MLflow HTTP request, unless $MLFLOW_HTTP_REQUEST_TIMEOUT says otherwise
REFUSALS = frozenset({  # MLflow error codes of a store that answered and said no: trying again cannot help
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
    "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED", "ENDPOINT_NOT_FOUND",
    "NOT_IMPLEMENTED",
})


def configure_http() -> None:
    """No retries inside MLflow and a short timeout: the delivery thread retries, so a dead or frozen server
    costs it one timeout per attempt, never minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))


def default_uri() -> str:
    """MLflow's own default store (without importing MLflow): ./mlruns when it holds experiments (an old file
    store), else sqlite ./mlflow.db, both made absolute."""
    mlruns = os.path.abspath("mlruns")
    try:
        with os.scandir(mlruns) as entries:
            if any(e.is_dir() and e.name.isdigit() and os.path.lexists(os.path.join(e.path, "meta.yaml"))
                   for e in entries):
                return Path(mlruns).as_uri()
    except OSError:
        pass
    return "sqlite:///" + os.path.abspath("mlflow.db")


def normalized(uri: str) -> str:
    """`uri` with a relative SQLite path made absolute (against the working directory) and no trailing '/'."""
    if uri.startswith("sqlite:///") and not uri.startswith(("sqlite:////", "sqlite:///:memory:")):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else uri


def configured_uri(cfg: TrackingConfig) -> tuple[str, str]:
    """(store, where it is named) from tracking.uri or $MLFLOW_TRACKING_URI; ('', '') when neither is set."""
    if cfg.uri:
        return normalized(cfg.uri), "tracking.uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return normalized(os.environ["MLFLOW_TRACKING_URI"]), "$MLFLOW_TRACKING_URI"
    return "", ""


def resolve_uri(cfg: TrackingConfig, fallback: str = "") -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else `fallback` (a resumed run's store), else MLflow's default."""
    return configured_uri(cfg)[0] or (normalized(fallback) if fallback else default_uri())


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI; None for other stores and in-memory databases."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    return Path(os.path.abspath(path)) if path and not path.startswith(":memory:") else None


def unwritable(path: Path) -> str:
    """Why SQLite could not write database `path` ('' if it can). It needs the file and, for its journal, the
    directory; both are probed for real (opened for writing, a file created and removed), so read-only mounts,
    immutable files and root's rules count as they will for SQLite."""
    directory = path.parent
    if not directory.is_dir():
        return f"{directory} is not a directory" if directory.exists() else f"directory {directory} does not exist"
    if path.is_dir():
        return f"{path} is a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".largessl-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot create files in {directory} ({exc.strerror})"
    if path.exists():
        try:
            os.close(os.open(path, os.O_RDWR))
        except OSError as exc:
            return f"{path} cannot be written ({exc.strerror})"
    return ""


def check_store(cfg: TrackingConfig, run_dir: Path | None = None) -> None:
    """Raise ConfigError in one line, fast (no network), if tracking is enabled and the store is a SQLite file
    that cannot be written (missing directory, read-only directory or file). The store is chosen as by
    Tracker.start: tracking.uri, $MLFLOW_TRACKING_URI, the store in `run_dir`'s mlflow_run.json (when given),
    MLflow's default. Also validates `cfg`."""
    cfg.validate()
    if not cfg.enabled:
        return
    uri, source = configured_uri(cfg)
    stored = read_state(run_dir).get("uri", "") if run_dir and not uri else ""
    if stored:
        uri, source = normalized(stored), f"the run's MLflow store ({Path(run_dir) / STATE_FILE})"
    elif not uri:
        uri, source = default_uri(), "MLflow's default store (tracking.uri and $MLFLOW_TRACKING_URI unset)"
    path = sqlite_file(uri)
    problem = unwritable(path) if path else ""
    if problem:
        raise ConfigError(f"{source}: {uri} cannot be written: {problem}; set tracking.uri to a writable "
                          "sqlite:////PATH/mlflow.db or a server's http://HOST:PORT, or tracking.enabled=false")


def browse_hint(uri: str, run_id: str) -> str:
    """One line saying where to look at MLflow run `run_id` of store `uri`, in a form that works as printed, also
    in a shell where this virtual environment is not active: a server's page of the run, else an `mlflow ui`
    command (MLflow's UI redirects #/runs/RUN_ID to the run's page in its experiment)."""
    if uri.startswith(("http://", "https://")):
        return f"MLflow run {run_id}: open {uri.rstrip('/')}/#/runs/{run_id}"
    if uri.split(":", 1)[0] in ("databricks", "databricks-uc"):
        return f"MLflow run {run_id} in {uri}"
    return (f"MLflow run {run_id} in {uri}; browse it with: {mlflow_command()} ui --backend-store-uri "
            f"{shlex.quote(uri)}  (then open http://127.0.0.1:5000/#/runs/{run_id})")


def mlflow_command() -> str:
    """The `mlflow` executable beside this Python (a virtual environment's bin/) when there is one, else
    `PYTHON -m mlflow`; shell-quoted."""
    beside = Path(sys.executable).parent / "mlflow"
    if beside.is_file() and os.access(beside, os.X_OK):
        return shlex.quote(str(beside))
    return f"{shlex.quote(sys.executable)} -m mlflow"



# ----------------------------------------------------------------------------- errors


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_network(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__module__.startswith(
        ("requests", "urllib3", "http.client", "socket"))


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the store did not answer (refused, reset, timed out), not that it answered no."""
    return any(_is_network(e) for e in _chain(exc))


def error_code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", ""))


def is_refusal(exc: BaseException) -> bool:
    return error_code(exc) in REFUSALS and not unreachable(exc)


def describe(exc: BaseException) -> str:
    """One short line: the deepest network error when there is one (e.g. 'ConnectionRefusedError: [Errno 111]
    Connection refused'), else the error's first line."""
    inner = [e for e in _chain(exc) if _is_network(e)]
    shown = inner[-1] if inner else exc
    text = (str(shown).strip().splitlines() or [""])[0]
    return f"{type(shown).__name__}: {text[:200]}" if text else type(shown).__name__


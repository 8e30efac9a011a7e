"""Datasets that are not local directories: an HTTP(S) base URL, or a `pipe:` command for object storage.

A dataset is named by one string, and every file of it (dataset.json and each shard) is found from that string the
same way, so the index is read exactly as the shards are:

- `http://HOST/PATH` (or https): FILE is fetched from `http://HOST/PATH/FILE`.
- `pipe:COMMAND`: FILE is the standard output of COMMAND run by `sh -c` with every `{}` replaced by FILE, e.g.
  `pipe:aws s3 cp s3://bucket/in1k/{} -`. webdataset's `pipe:` URLs name one shard; ours names the whole dataset,
  so the placeholder is required.
- anything else: a local directory, read exactly as before.

Why not webdataset.gopen: it opens http(s) through `curl --retry 30` (a refused connection takes minutes to be
said), has no read timeout of its own, and `import webdataset` pulls in torch, which the start-up checks
(preflight.py) must not. urllib and subprocess give a bounded wait, a one-line reason and a failure that is told
apart from a damaged shard: a stream that breaks off (a dropped connection, a stalled server, a command that exits
non-zero) raises `StreamBroken`, and `read_with_retries` opens the shard again and skips what was already read.
A shard served whole but not a valid tar still fails as damaged (stream.py), never retried.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import re
import select
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, BinaryIO, TypeVar

from data_tools.shards import plain_file_name
from largessl.console import err_line
from largessl.errors import DataError

PIPE = "pipe:"
PLACEHOLDER = "{}"
TIMEOUT_S = 60.0
"""Longest wait for an HTTP connection or for any data on it (or on a pipe: command's output) before it counts as
broken: a server that stops sending never hangs a DataLoader worker."""
TRIES = 4
"""Reads of one shard (the first and three more) before a stream that keeps breaking off stops the run."""
BACKOFF_S = 1.0
"""Wait before the k-th retry: BACKOFF_S x 2^(k-1), so 1, 2 and 4 s."""
CHECK_THREADS = 16
"""HEAD requests in flight at once when start-up checks that every shard of a URL dataset is there."""
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
MISSING_STATUSES = frozenset({404, 410})
PIPE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
"""File names that may go into a shell command unquoted (what data_tools writes: `train-000000.tar`)."""
URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
HEADERS = {"User-Agent": "largessl"}

T = TypeVar("T")


class RemoteError(Exception):
    """A file of a remote dataset could not be read; `reason` says why in a few words."""

    def __init__(self, location: str, reason: str, status: int | None = None) -> None:
        super().__init__(f"{location} ({reason})")
        self.location, self.reason, self.status = location, reason, status


class StreamBroken(RemoteError):
    """The failure may pass (network, server, command): the shard is read again."""


class Unreadable(RemoteError):
    """The server refused the file (HTTP 403, 404...): reading it again would not help."""


def kind(location: str) -> str:
    """'http', 'pipe', 'other-url' (a scheme we do not read, e.g. s3://) or 'local'."""
    if location.startswith(PIPE):
        return "pipe"
    if location.lower().startswith(("http://", "https://")):
        return "http"
    return "other-url" if URL_SCHEME.match(location) else "local"


def dataset_root(root: str, what: str) -> str:
    """`root` as the base every file name is put into; a DataError naming `what` when it cannot be one."""
    found = kind(root)
    if found == "pipe" and PLACEHOLDER not in root:
        raise DataError(f"{what}: pipe: dataset '{root}' has no {{}} where the file name goes "
                        "(e.g. pipe:aws s3 cp s3://bucket/in1k/{} -; docs/data.md)")
    if found == "other-url":
        raise DataError(f"{what}: '{root}': largessl reads local directories, http(s):// URLs and pipe: commands; "
                        "for object storage write pipe:COMMAND with {} for the file name (docs/data.md)")
    if found == "http":
        parts = urllib.parse.urlsplit(root)
        if not parts.hostname or parts.query or parts.fragment:
            raise DataError(f"{what}: '{root}' is not a dataset's base URL: write http(s)://HOST/PATH, no ?query or "
                            "#fragment (dataset.json is read from BASE/dataset.json)")
        return root.rstrip("/")
    return root


def file_location(root: str, file: object) -> str:
    """Where file `file` of the remote dataset `root` is read from; ValueError unless `file` is a plain file name
    (shard_path's rule: no `..`, no `/`, not absolute), so an index cannot reach outside its dataset: URL-quoted
    whole (no scheme or query can be injected), or for pipe: one of PIPE_NAME (no shell syntax)."""
    name = plain_file_name(file)
    if kind(root) == "http":
        return f"{root}/{urllib.parse.quote(name, safe='')}"
    if not PIPE_NAME.fullmatch(name):
        raise ValueError(f"shard entry {name!r} cannot go into a pipe: command (letters, digits and . _ + - only)")
    return root.replace(PLACEHOLDER, name)


def verify_hint(dataset: str) -> str:
    """What to run to check `dataset` (verify reads local directories only)."""
    if kind(dataset) == "local":
        return f"check the dataset with: python -m data_tools verify {dataset}"
    return f"check the dataset with: python -m data_tools verify DIR, on the directory behind {dataset} (or a copy)"


# ----------------------------------------------------------------------------- opening a file


def open_stream(location: str) -> BinaryIO:
    """A binary stream of the file at `location` (a path, URL or pipe: command). A remote one raises StreamBroken
    or Unreadable, never OSError, so a network failure is not taken for a damaged file."""
    found = kind(location)
    if found == "http":
        return _open_http(location)
    if found == "pipe":
        return io.BufferedReader(_PipeStream(location), 1 << 16)
    return open(location, "rb")


def read_all(location: str) -> bytes:
    with open_stream(location) as stream:
        return stream.read()


def _why(exc: BaseException) -> str:
    """A few words for an urllib, http.client or socket failure."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return _why(exc.reason) if isinstance(exc.reason, BaseException) else str(exc.reason)
    if isinstance(exc, TimeoutError):
        return f"no answer for {TIMEOUT_S:g} s"
    if isinstance(exc, http.client.IncompleteRead):
        return f"connection closed in the middle of a chunk ({len(exc.partial)} bytes of it read)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def _http_error(url: str, exc: urllib.error.HTTPError) -> RemoteError:
    exc.close()
    failure = StreamBroken if exc.code in RETRY_STATUSES else Unreadable
    return failure(url, f"HTTP {exc.code}", exc.code)


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to http(s) (urllib's own also goes to ftp://)."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: http.client.HTTPMessage, newurl: str) -> urllib.request.Request | None:
        if kind(newurl) != "http":
            raise urllib.error.HTTPError(newurl, code, f"redirect to {newurl} refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HTTPOnlyRedirects)


def _request(url: str, method: str = "GET") -> http.client.HTTPResponse:
    """The server's answer to `method` on `url`, within TIMEOUT_S; RemoteError otherwise."""
    try:
        return _OPENER.open(urllib.request.Request(url, headers=HEADERS, method=method), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        raise _http_error(url, exc) from None
    except (OSError, http.client.HTTPException) as exc:
        raise StreamBroken(url, _why(exc)) from None


def _open_http(url: str) -> BinaryIO:
    return io.BufferedReader(_HTTPStream(url, _request(url)), 1 << 16)


class _HTTPStream(io.RawIOBase):
    """An HTTP response body that raises StreamBroken when it ends short of its Content-Length (http.client
    returns b"" then, like a normal end) or when the connection fails or stays silent for TIMEOUT_S."""

    def __init__(self, url: str, response: http.client.HTTPResponse) -> None:
        self.url, self.response = url, response
        self.expected, self.received = response.length, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        try:
            count = self.response.readinto(buffer)
        except (OSError, http.client.HTTPException) as exc:
            raise StreamBroken(self.url, _why(exc)) from None
        self.received += count
        if not count and len(buffer) and self.expected is not None and self.received < self.expected:
            raise StreamBroken(self.url, f"connection closed after {self.received} of {self.expected} bytes")
        return count

    def close(self) -> None:
        self.response.close()
        super().close()


class _PipeStream(io.RawIOBase):
    """The standard output of a pipe: command (`sh -c`, its own process group). Silence for TIMEOUT_S or a non-zero
    exit status at the end raises StreamBroken with the last line the command wrote to stderr; closing the stream
    early kills the command."""

    def __init__(self, location: str) -> None:
        self.location, self.errors = location, tempfile.TemporaryFile()
        try:
            self.process = subprocess.Popen(location[len(PIPE):], shell=True, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=self.errors, start_new_session=True)
        except OSError as exc:
            self.errors.close()
            super().close()
            raise Unreadable(location, f"the command cannot be started: {_why(exc)}") from None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        fd = self.process.stdout.fileno()  # type: ignore[union-attr]
        if not select.select([fd], [], [], TIMEOUT_S)[0]:
            raise StreamBroken(self.location, f"the command wrote nothing for {TIMEOUT_S:g} s")
        data = os.read(fd, len(buffer))
        if not data:
            self._check_exit()
        buffer[:len(data)] = data
        return len(data)

    def _check_exit(self) -> None:
        try:
            status = self.process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise StreamBroken(self.location, f"the command closed its output but did not exit for {TIMEOUT_S:g} s") \
                from None
        if status:
            ended = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
            raise StreamBroken(self.location, f"the command {ended}{self._last_error_line()}")

    def _last_error_line(self) -> str:
        self.errors.seek(0, os.SEEK_END)
        self.errors.seek(max(0, self.errors.tell() - 4096))
        lines = [line.strip() for line in self.errors.read().decode(errors="replace").splitlines() if line.strip()]
        return f": {lines[-1][:200]}" if lines else ""

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # whatever it started too; a no-op once it is all gone
            self.process.wait()
            self.process.stdout.close()  # type: ignore[union-attr]
            self.errors.close()
        super().close()


# ----------------------------------------------------------------------------- start-up check and reading a shard


def missing(locations: list[str]) -> list[str]:
    """The files among `locations` (all of one dataset) that are not there. Local: not a file. HTTP: a HEAD request
    each (nothing downloaded), answered 404 or 410; RemoteError when a server cannot tell."""
    found = kind(locations[0]) if locations else "local"
    if found == "local":
        return [path for path in locations if not Path(path).is_file()]
    if found == "pipe":
        return []  # a command cannot be asked whether a file exists without running it (a download): not checked
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        there = list(pool.map(_is_there, locations))
    return [url for url, ok in zip(locations, there, strict=True) if not ok]


def _is_there(url: str) -> bool:
    try:
        _request(url, "HEAD").close()
    except Unreadable as exc:
        if exc.status in MISSING_STATUSES:
            return False
        if exc.status not in (405, 501):  # a server without HEAD: reading the shard will tell
            raise
    return True


def read_with_retries(location: str, expand: Callable[[BinaryIO, str], Iterator[T]]) -> Iterator[tuple[int, T]]:
    """(n, item) for the items `expand(stream, location)` makes of the file, n counting from 1, each exactly once.
    When the stream breaks off, the file is opened again (after BACKOFF_S, 2 BACKOFF_S...; one warning line each)
    and the items already given are skipped; after TRIES reads a DataError names the file and the last reason."""
    given = 0
    for attempt in range(1, TRIES + 1):
        try:
            with open_stream(location) as stream:
                for n, item in enumerate(expand(stream, location), 1):
                    if n > given:
                        given = n
                        yield n, item
            return
        except StreamBroken as exc:
            _wait_or_give_up(location, exc.reason, attempt, given)
        except Unreadable as exc:
            said = "missing shard" if exc.status in MISSING_STATUSES else "cannot read shard"
            raise DataError(f"{said} {location} ({exc.reason})") from None


def _wait_or_give_up(location: str, reason: str, attempt: int, given: int) -> None:
    if attempt >= TRIES:
        raise DataError(f"shard {location} broke off on each of {TRIES} reads (last: {reason}); "
                        "is the server or storage reachable?")
    delay = BACKOFF_S * 2 ** (attempt - 1)
    err_line(f"warning: reading shard {location} broke off after {given} samples ({reason}); "
             f"reading it again in {delay:g} s (read {attempt + 1} of {TRIES})")
    time.sleep(delay)

"""Files replaced whole: a reader (or a resume after a crash) sees the old content or the new, never a part."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once, at import: os.umask can only be read by setting it, which races other threads


def write_atomic(path: Path, data: str | bytes | Iterable[bytes]) -> None:
    """Write `path` through a temporary file in its directory, flushed to disk, then os.replace. The file gets the
    mode a plain open() would give it (mkstemp's temporary files are private to their owner)."""
    chunks = [data.encode() if isinstance(data, str) else data] if isinstance(data, (str, bytes)) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

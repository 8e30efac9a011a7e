"""Checksums beside checkpoints: a digest of every file of a tag, recorded in complete.json, checked before reading.

Written: after every rank has written its files, each rank hashes its share of the tag (`share`: the rank in a
file's name, `zero_pp_rank_3_...` or `teacher_fp32_rank00003.pt`, modulo the world size; files without one go to
rank 0), rank 0 gathers the digests and `record`s them in complete.json under "checksums" ({"algorithm": "sha256",
"segment_bytes": 67108864, "files": {name: hex digest}}), beside the sizes older readers use. `record` refuses a
file nobody hashed.

A file's digest is the SHA-256 of the SHA-256 digests (32 bytes each, in order) of its consecutive 64 MiB segments,
the last one shorter (one segment for a smaller file, an empty one for an empty file). The segments of every file a
rank hashes go to a thread pool (hashlib releases the GIL while it hashes), so one large file, such as a rank's
optimizer partition, hashes on every core the rank may use, not on one. To check one file by hand:
`hashlib.sha256(b"".join(hashlib.sha256(data[i:i + 2**26]).digest() for i in range(0, max(len(data), 1), 2**26)))`.

Checked: `problem` compares a tag's files with that record. A tag from before checksums has none; then every torch
file's own zip CRC-32s are compared instead (torch writes them but never reads them), and `unloadable` finds a file
whose zip directory or pickle torch cannot read.

SHA-256: on the development VM (AMD EPYC with SHA extensions, as recent EPYC and Xeon CPUs have) hashlib hashed
1.75 GB/s per core, against 0.8 for BLAKE2b, 0.6-0.9 for SHA-512 and 0.75 for MD5; SHA-1 was barely faster (1.9)
and is no longer collision-resistant (docs/benchmarks.md). The record names the algorithm and the segment
size, so a later change of either still verifies older tags.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import struct
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ALGORITHM = "sha256"
SEGMENT = 64 << 20  # bytes hashed as one piece: the pieces of a file hash in parallel
KEY = "checksums"  # complete.json: {"algorithm": ALGORITHM, "segment_bytes": SEGMENT, "files": {name: hex digest}}
CHUNK = 8 << 20  # bytes read per hash update
MAX_THREADS = 8
RANK = re.compile(r"rank_?(\d+)")  # the first rank number in a file name: zero_pp_rank_3_..., teacher_fp32_rank00003
# What reading damaged bytes raises (zip structure, pickle), as opposed to a checkpoint that does not fit a model.
DAMAGE_ERRORS = (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, UnicodeDecodeError, struct.error)
TORCH_READER = re.compile(r"PytorchStreamReader|inline_container|zip archive|hasRecord|record size|central directory")


def owner(name: str, world_size: int) -> int:
    """The rank that hashes `name`: the rank number in its name modulo `world_size`; 0 when it names none."""
    found = RANK.search(Path(name).name)
    return int(found[1]) % world_size if found else 0


def share(names: list[str], rank: int, world_size: int) -> list[str]:
    """The names of `names` that `rank` hashes."""
    return [name for name in names if owner(name, world_size) == rank]


def threads(jobs: int) -> int:
    """Threads for `jobs` pieces of work: at most one per core this process may use, and MAX_THREADS."""
    return max(1, min(jobs, len(os.sched_getaffinity(0)), MAX_THREADS))


def each_file(function: Callable[[Path], str], tag_dir: Path, names: list[str]) -> dict[str, str]:
    """{name: function(tag_dir / name)} over a thread pool."""
    with ThreadPoolExecutor(threads(len(names))) as pool:
        return dict(zip(names, pool.map(lambda name: function(tag_dir / name), names), strict=True))


# ----------------------------------------------------------------------------- writing


def segments(tag_dir: Path, names: list[str], segment: int) -> list[tuple[str, int, int]]:
    """(name, offset, length) of every segment of every file (one, of length 0, for an empty file)."""
    pieces = []
    for name in names:
        size = (tag_dir / name).stat().st_size
        pieces += [(name, start, min(segment, size - start)) for start in range(0, max(size, 1), segment)]
    return pieces


def segment_digest(path: Path, start: int, length: int, algorithm: str) -> bytes:
    """The digest of `length` bytes of `path` from `start` (of fewer, should the file have shrunk)."""
    digest, buffer = hashlib.new(algorithm), bytearray(min(CHUNK, max(length, 1)))
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(start)
        while length > 0 and (size := handle.readinto(view[:min(CHUNK, length)])):
            digest.update(view[:size])
            length -= size
    return digest.digest()


def digests(tag_dir: Path, names: list[str], algorithm: str = ALGORITHM, segment: int = SEGMENT) -> dict[str, str]:
    """{name: hex digest} of `names` in `tag_dir`: every segment of every file on a thread pool, then per file the
    digest of its segments' digests."""
    pieces = segments(tag_dir, names, segment)
    with ThreadPoolExecutor(threads(len(pieces))) as pool:
        leaves = pool.map(lambda piece: segment_digest(tag_dir / piece[0], piece[1], piece[2], algorithm), pieces)
        joined: dict[str, list[bytes]] = {name: [] for name in names}
        for (name, _, _), leaf in zip(pieces, leaves, strict=True):
            joined[name].append(leaf)
    return {name: hashlib.new(algorithm, b"".join(parts)).hexdigest() for name, parts in joined.items()}


def record(gathered: list[dict[str, str]], names: list[str]) -> dict[str, Any]:
    """complete.json's "checksums" entry from every rank's digests; raises RuntimeError naming a file of `names`
    (what rank 0 lists) that no rank hashed, since the tag could then not be vouched for."""
    merged = {name: value for part in gathered for name, value in part.items()}
    missing = [name for name in names if name not in merged]
    if missing:
        raise RuntimeError(f"no rank hashed {missing[0]} (it appeared after the ranks listed the tag, or its owner "
                           "could not see it)")
    return {"algorithm": ALGORITHM, "segment_bytes": SEGMENT, "files": {name: merged[name] for name in names}}


# ----------------------------------------------------------------------------- checking


def recorded(marker: dict[str, Any]) -> dict[str, Any]:
    """The "checksums" entry of a tag's complete.json ({} for a tag from before checksums)."""
    entry = marker.get(KEY)
    return entry if isinstance(entry, dict) and isinstance(entry.get("files"), dict) else {}


def problem(tag_dir: Path, names: list[str], marker: dict[str, Any]) -> str:
    """Why the files `names` of `tag_dir` are not as written ('' when they are, as far as the record tells): the
    first whose digest differs from complete.json's, or without checksums, whose zip CRC-32 fails."""
    entry = recorded(marker)
    if not entry:
        return first(each_file(zip_problem, tag_dir, [n for n in names if n.endswith(".pt")]))
    algorithm, segment, expected = entry.get("algorithm"), entry.get("segment_bytes"), entry["files"]
    if algorithm not in hashlib.algorithms_available or not isinstance(segment, int) or segment <= 0:
        return f"its checksums are of a kind this version does not know ({algorithm!r}, segments {segment!r})"
    unlisted = [name for name in names if name not in expected]
    if unlisted:
        return f"{unlisted[0]} has no checksum in complete.json"
    try:
        found = digests(tag_dir, names, algorithm, segment)
    except OSError as exc:
        return f"{Path(exc.filename or '?').name} cannot be read ({exc.strerror or exc})"
    return first({name: mismatch(name, algorithm) for name in names if found[name] != expected[name]})


def mismatch(name: str, algorithm: str) -> str:
    """The line for a file whose digest is not the recorded one."""
    return f"{name} does not match the {algorithm} digest recorded when it was written (changed since)"


def first(problems: dict[str, str]) -> str:
    """The first non-empty problem, in name order ('' when there is none)."""
    return next((problems[name] for name in sorted(problems) if problems[name]), "")


def zip_problem(path: Path) -> str:
    """'' when every member of a torch file matches the CRC-32 its zip directory records (members written without
    one, CRC 0, are passed over); else what is wrong, naming the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC and info.file_size:
                    with archive.open(info) as member:
                        while member.read(CHUNK):
                            pass
    except Exception as exc:  # BadZipFile (a CRC), OSError, and what a flipped header byte makes zipfile raise
        return f"{path.name} fails its zip check ({str(exc).strip() or type(exc).__name__})"
    return ""


def unloadable(tag_dir: Path, names: list[str]) -> str:
    """'' when torch opens each torch file of `names` (memory-mapped: its zip directory and pickle are read, the
    tensor bytes are not); else the first that fails and why."""
    return first(each_file(load_problem, tag_dir, [n for n in names if n.endswith(".pt")]))


def load_problem(path: Path) -> str:
    """'' when torch.load opens `path` memory-mapped; else what the failure says, naming the file."""
    import torch

    try:
        torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:  # whatever a damaged pickle raises (UnpicklingError, KeyError, AttributeError...)
        text = str(exc).strip().splitlines()
        return f"{path.name} cannot be read ({type(exc).__name__}: {text[0][:200] if text else ''})"
    return ""


def damage_error(exc: BaseException) -> bool:
    """Whether an error of torch.load says the file's bytes are damaged: a broken pickle or zip structure, or
    torch's zip reader (a RuntimeError naming PytorchStreamReader) failing; not a checkpoint of another shape."""
    if isinstance(exc, DAMAGE_ERRORS):
        return True
    return isinstance(exc, RuntimeError) and bool(TORCH_READER.search(str(exc)))


def stamp(tag_dir: Path, names: list[str]) -> tuple[tuple[str, int, int, int], ...]:
    """(name, size, mtime, inode) of each file: what changes when a file is rewritten or replaced."""
    stats = [(name, (tag_dir / name).stat()) for name in names]
    return tuple((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in stats)


_CHECKED: dict[tuple[Any, ...], str] = {}  # (tag directory, stamp of its files and complete.json) -> problem
SETTLED_NS = 2 * 10**9  # a file changed within this of a check may change again under the same mtime: not cached


def checked(tag_dir: Path, names: list[str], marker: dict[str, Any]) -> str:
    """`problem`, computed once per process for files (and a complete.json) that did not change since: export and
    evaluation find their checkpoint more than once. Files changed in the last seconds are checked every time
    (a filesystem's mtime can be coarser than the time between two writes)."""
    try:
        key = (tag_dir.resolve(), stamp(tag_dir, [*names, "complete.json"] if marker else names))
    except OSError as exc:
        return f"{Path(exc.filename or '?').name} cannot be read ({exc.strerror or exc})"
    if key in _CHECKED:
        return _CHECKED[key]
    why = problem(tag_dir, names, marker)
    if all(time.time_ns() - mtime > SETTLED_NS for _, _, mtime, _ in key[1]):
        _CHECKED[key] = why
    return why

"""Checksums beside checkpoints: a digest of every file of a tag, recorded in complete.json, checked before reading.

Written: every file of a checkpoint is hashed while it is written (`hash_while_writing`: torch.save fills a file from
its start, in order, and a thread hashes each segment once it is on disk), so when the write ends only its last
segment is left. After every rank has written its files, each rank takes the digests of its share of the tag
(`share`: the rank in a file's name, `zero_pp_rank_3_...` or `teacher_fp32_rank00003.pt`, modulo the world size;
files without one go to rank 0) from what it hashed while writing, hashing from disk only a file it did not write,
and rank 0 gathers them and `record`s them in complete.json under "checksums" ({"algorithm": "crc32",
"segment_bytes": 67108864, "files": {name: hex digest}}), beside the sizes older readers use. `record` refuses a
file nobody hashed.

A file's digest is the checksum of the checksums (4 bytes each for CRC-32, in order) of its consecutive 64 MiB
segments, the last one shorter (one segment for a smaller file, an empty one for an empty file). To check one file
by hand: `zlib.crc32(b"".join(zlib.crc32(data[i:i + 2**26]).to_bytes(4, "big") for i in range(0, max(len(data), 1),
2**26)))`, as 8 hex digits.

Checked: `problem` compares a tag's files with that record, reading every file again (the segments of all files on a
thread pool: zlib and hashlib release the GIL while they hash). A tag from before checksums has none; then every
torch file's own zip CRC-32s are compared instead (torch writes them but never reads them), and `unloadable` finds a
file whose zip directory or pickle torch cannot read.

Why CRC-32 (zlib's): what it guards against is damage (a flipped bit, a torn or truncated write, a file from another
run), not an adversary, who could rewrite complete.json as easily as a weight; it detects every burst of up to 32
bits in a segment and other damage with probability 1 - 2**-32 per damaged segment, as HDFS and the cloud object
stores rely on CRC-32C. On the development VM it ran 3.4 GB/s per core against 1.6-1.75 for SHA-256, so while
writing it keeps up with a write into the page cache (docs/benchmarks.md). Tags written before it carry SHA-256
digests ("algorithm": "sha256") and still verify: the record names the algorithm and the segment size.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ALGORITHM = "crc32"  # written now; `problem` also checks tags written with any hashlib algorithm (sha256 before)
SEGMENT = 64 << 20  # bytes hashed as one piece: the pieces of a file hash in parallel
KEY = "checksums"  # complete.json: {"algorithm": ALGORITHM, "segment_bytes": SEGMENT, "files": {name: hex digest}}
CHUNK = 8 << 20  # bytes read per hash update
MAX_THREADS = 8
POLL_S = 0.005  # how often hashing while writing looks for a newly written segment
FOLLOW_WRITES = True  # False: checkpoint files are hashed after their write (benchmarks/checksum_cost.py compares)
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


def spans(start: int, size: int, segment: int) -> list[tuple[int, int]]:
    """(offset, length) of a file's segments from `start` (a segment boundary) to `size`; one of length 0 for an
    empty file."""
    return [(offset, min(segment, size - offset)) for offset in range(start, max(size, 1), segment)]


def segments(tag_dir: Path, names: list[str], segment: int) -> list[tuple[str, int, int]]:
    """(name, offset, length) of every segment of every file."""
    return [(name, *span) for name in names for span in spans(0, (tag_dir / name).stat().st_size, segment)]


class Crc32:
    """zlib's CRC-32 behind hashlib's interface (update, digest: 4 bytes big-endian, hexdigest)."""

    def __init__(self, data: bytes = b"") -> None:
        self.value = zlib.crc32(data)

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")

    def hexdigest(self) -> str:
        return self.digest().hex()


def new(algorithm: str, data: bytes = b"") -> Any:
    """A running digest of `algorithm`: "crc32", or one of hashlib's."""
    return Crc32(data) if algorithm == "crc32" else hashlib.new(algorithm, data)


def known(algorithm: Any) -> bool:
    """Whether this version can compute digests of `algorithm`."""
    return algorithm == "crc32" or algorithm in hashlib.algorithms_available


def segment_digest(path: Path, start: int, length: int, algorithm: str) -> bytes:
    """The digest of `length` bytes of `path` from `start` (of fewer, should the file have shrunk)."""
    digest, buffer = new(algorithm), bytearray(min(CHUNK, max(length, 1)))
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(start)
        while length > 0 and (size := handle.readinto(view[:min(CHUNK, length)])):
            digest.update(view[:size])
            length -= size
    return digest.digest()


def segment_digests(path: Path, start: int, size: int, algorithm: str, segment: int) -> list[bytes]:
    """The digests of `path`'s segments from `start` (a segment boundary) to `size`, on a thread pool."""
    pieces = spans(start, size, segment)
    with ThreadPoolExecutor(threads(len(pieces))) as pool:
        return list(pool.map(lambda piece: segment_digest(path, piece[0], piece[1], algorithm), pieces))


def combined(leaves: list[bytes], algorithm: str) -> str:
    """A file's hex digest from its segments' digests."""
    return new(algorithm, b"".join(leaves)).hexdigest()


def digests(tag_dir: Path, names: list[str], algorithm: str = ALGORITHM, segment: int = SEGMENT) -> dict[str, str]:
    """{name: hex digest} of `names` in `tag_dir`, read from disk: every segment of every file on a thread pool,
    then per file the digest of its segments' digests."""
    pieces = segments(tag_dir, names, segment)
    with ThreadPoolExecutor(threads(len(pieces))) as pool:
        leaves = pool.map(lambda piece: segment_digest(tag_dir / piece[0], piece[1], piece[2], algorithm), pieces)
        joined: dict[str, list[bytes]] = {name: [] for name in names}
        for (name, _, _), leaf in zip(pieces, leaves, strict=True):
            joined[name].append(leaf)
    return {name: combined(parts, algorithm) for name, parts in joined.items()}


# ----------------------------------------------------------------------------- hashing while writing

_WRITTEN: dict[Path, tuple[int, int, str]] = {}  # file -> (inode, size, digest) as hashed while it was written


class Follower:
    """The digests of a file's segments, taken on a thread while one writer fills the file from its start, in
    order, as torch.save does (its zip writer refuses to write anywhere but at the end), so that little is left to
    hash when the write ends. The file is created (emptied) here, before the writer opens it, so the thread reads
    the inode the writer writes; a file replaced meanwhile is not vouched for (`finish` finds another inode)."""

    def __init__(self, path: Path) -> None:
        path.open("wb").close()
        self.path, self.fd = path, os.open(path, os.O_RDONLY)
        self.leaves: list[bytes] = []
        self.hashed = 0  # bytes hashed: whole segments
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="checksums-follower", daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        while not self.done.is_set():
            if os.fstat(self.fd).st_size - self.hashed < SEGMENT:
                self.done.wait(POLL_S)
                continue
            self.leaves.append(segment_digest(self.path, self.hashed, SEGMENT, ALGORITHM))
            self.hashed += SEGMENT

    def stop(self) -> None:
        """Stop following (the write ended or failed)."""
        self.done.set()
        self.thread.join()
        os.close(self.fd)

    def finish(self) -> None:
        """After a complete write: hash what is left and keep the file's digest for `written_digests`; a file
        that changed inode meanwhile, or that cannot be read, is left to be hashed from disk."""
        ino = os.fstat(self.fd).st_ino
        self.stop()
        try:
            stat = self.path.stat()
            if stat.st_ino == ino and stat.st_size >= self.hashed:
                tail = segment_digests(self.path, self.hashed, stat.st_size, ALGORITHM, SEGMENT)
                _WRITTEN[self.path.resolve()] = (ino, stat.st_size, combined(self.leaves + tail, ALGORITHM))
        except OSError:
            _WRITTEN.pop(self.path.resolve(), None)


def hash_while_writing(path: Path, write: Callable[[], None]) -> None:
    """write() (which writes `path` from its start, in order: torch.save), hashing its bytes as they land."""
    if not FOLLOW_WRITES:
        write()
        return
    follower = Follower(path)
    try:
        write()
    except BaseException:
        follower.stop()
        raise
    follower.finish()


def written_digests(tag_dir: Path, names: list[str]) -> dict[str, str]:
    """{name: hex digest} of `names`: what this process hashed while writing them (a file since rewritten or
    resized is not taken), and the rest read from disk. Forgets what it hashed under `tag_dir`."""
    found = {}
    for name in names:
        path = (tag_dir / name).resolve()
        entry = _WRITTEN.pop(path, None)
        with contextlib.suppress(OSError):
            stat = path.stat()
            if entry and entry[:2] == (stat.st_ino, stat.st_size):
                found[name] = entry[2]
    for path in [p for p in _WRITTEN if p.parent == tag_dir.resolve()]:
        del _WRITTEN[path]
    return {**found, **digests(tag_dir, [name for name in names if name not in found], ALGORITHM, SEGMENT)}


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
    if not known(algorithm) or not isinstance(segment, int) or segment <= 0:
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
    return f"{name} does not match the {algorithm} checksum recorded when it was written (changed since)"


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

"""Find every input image without unpacking anything: class folders, per-synset tars, or a tar of per-synset tars.

A scan is a list of groups (one class's images in one folder or tar) whose members are located by name, or by byte
offset and size inside an uncompressed tar, so a worker can read any image with one positioned read. A gzip
compressed inner tar cannot be read at an offset; it is decompressed once into the conversion's work directory
(the only bytes ever unpacked) and removed when the conversion completes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from data_tools.errors import ToolError

GZIP_MAGIC = b"\x1f\x8b"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass
class Group:
    """One class's images in one container; `members` are (name, offset, size), offset absolute in `path`."""

    wnid: str
    source: str  # how rejects and sample metadata name the container, relative to SRC
    path: str  # the class directory, or the file holding the tar's bytes
    kind: str  # "dir" or "tar"
    members: list[tuple[str, int, int]] = field(default_factory=list)


@dataclass
class Scan:
    groups: list[Group]
    rejects: list[dict]  # {"source", "reason", "detail"}: inputs dropped before any image was read
    empty_classes: list[str] = field(default_factory=list)  # class folders without a file: still classes

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with gzip.open(tmp, "wt", compresslevel=1) as f:
            f.write(json.dumps({"rejects": self.rejects, "empty_classes": self.empty_classes}) + "\n")
            for group in self.groups:
                f.write(json.dumps(group.__dict__) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Scan:
        with gzip.open(path, "rt") as f:
            header = json.loads(f.readline())
            groups = []
            for line in f:
                record = json.loads(line)
                record["members"] = [tuple(m) for m in record["members"]]
                groups.append(Group(**record))
        return cls(groups, header["rejects"], header["empty_classes"])


def reject(source: str, reason: str, detail: str = "") -> dict:
    return {"source": source, "reason": reason, "detail": detail}


def is_unsafe(name: str) -> bool:
    """A member name that would escape a directory if used as a path (we never do; such members are rejected)."""
    if not name or name.startswith(("/", "\\")):
        return True
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return not parts or ".." in parts or ":" in parts[0]


# --- class folders -------------------------------------------------------------------------------------------

def scan_class_folders(src: Path) -> Scan:
    """Every regular file below each class folder; files directly in SRC belong to no class and are recorded."""
    if not src.is_dir():
        raise ToolError(f"SRC '{src}' is not a directory")
    groups, rejects, empty = [], [], []
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if entry.is_dir():
            group = Group(entry.name, entry.name, entry.path, "dir", list(_files_below(Path(entry.path))))
            (groups.append(group) if group.members else empty.append(entry.name))
        else:
            rejects.append(reject(entry.name, "not in a class folder"))
    if not groups:
        raise ToolError(f"no images under class folders of {src} (expected SRC/CLASS/IMAGE files)")
    return Scan(groups, rejects, empty)


def _files_below(root: Path) -> list[tuple[str, int, int]]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                found.append((os.path.relpath(path, root).replace(os.sep, "/"), 0, os.path.getsize(path)))
    return sorted(found)


# --- tars ----------------------------------------------------------------------------------------------------

class Window(io.RawIOBase):
    """A read-only view of bytes [base, base + size) of a file, for tarfile and gzip to read an inner tar in place."""

    def __init__(self, path: str, base: int, size: int) -> None:
        self._file = open(path, "rb")
        self.base, self.size, self.pos = base, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.size - self.pos))
        self._file.seek(self.base + self.pos)
        data = self._file.read(n)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


@dataclass(frozen=True)
class Container:
    """A per-synset tar somewhere on disk: the whole file, or a member of the release tar."""

    wnid: str
    source: str
    path: str
    base: int
    size: int


def synset_of(name: str) -> str | None:
    base = PurePosixPath(name).name
    for suffix in TAR_SUFFIXES:
        if base.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return None


def list_release_tar(src: Path) -> tuple[list[Container], list[dict]]:
    """The per-synset tars inside the official release tar, found by reading headers only."""
    containers, rejects = [], []
    try:
        with tarfile.open(src, mode="r:") as outer:
            for member in outer:
                if member.isdir():
                    continue
                wnid = synset_of(member.name)
                if is_unsafe(member.name):
                    rejects.append(reject(member.name, "unsafe member name"))
                elif not member.isreg():
                    rejects.append(reject(member.name, "not a regular file"))
                elif wnid is None:
                    rejects.append(reject(member.name, "not a synset tar"))
                else:
                    containers.append(Container(wnid, member.name, str(src), member.offset_data, member.size))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ToolError(f"cannot read {src} as an uncompressed tar ({exc})") from None
    return containers, rejects


def list_synset_tars(src: Path) -> list[Container]:
    return [Container(synset_of(p.name), p.name, str(p), 0, p.stat().st_size)
            for p in sorted(src.iterdir()) if p.is_file() and synset_of(p.name)]


def index_container(container: Container, spill: Path) -> tuple[Group | None, list[dict]]:
    """Members of one per-synset tar, or (None, [why]) when it cannot be read: an unreadable tar is rejected whole."""
    try:
        path, base, size = container.path, container.base, container.size
        with Window(path, base, size) as window:
            compressed = window.read(2) == GZIP_MAGIC
        if compressed:
            path, base, size = _gunzip(container, spill), 0, None
            size = os.path.getsize(path)
        group = Group(container.wnid, container.source, path, "tar")
        rejects = []
        with Window(path, base, size) as window, tarfile.open(fileobj=window, mode="r:") as tar:
            for member in tar:
                name = f"{container.source}/{member.name}"
                if member.isdir():
                    continue
                if is_unsafe(member.name):
                    rejects.append(reject(name, "unsafe member name"))
                elif not member.isreg():
                    rejects.append(reject(name, "not a regular file"))
                elif member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"truncated inside {member.name}")
                else:
                    group.members.append((member.name, base + member.offset_data, member.size))
        return group, rejects
    except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile, ValueError) as exc:
        return None, [reject(container.source, "unreadable tar", str(exc))]


def _gunzip(container: Container, spill: Path) -> str:
    spill.mkdir(parents=True, exist_ok=True)
    # named by content position, never by the member name, so nothing lands outside the work directory
    target = spill / (hashlib.sha1(f"{container.path}:{container.base}".encode()).hexdigest() + ".tar")
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    with Window(container.path, container.base, container.size) as window, gzip.GzipFile(fileobj=window) as gz:
        with open(tmp, "wb") as out:
            while block := gz.read(1 << 20):
                out.write(block)
    os.replace(tmp, target)
    return str(target)


def read_member(kind: str, path: str, name: str, offset: int, size: int, handles: dict[str, int]) -> bytes:
    """The bytes of one member: a positioned read for tars (file handles cached per process)."""
    if kind == "dir":
        with open(os.path.join(path, name), "rb") as f:
            return f.read()
    fd = handles.get(path)
    if fd is None:
        fd = handles[path] = os.open(path, os.O_RDONLY)
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(f"short read: {len(data)} of {size} bytes")
    return data


def scan_imagenet22k(src: Path, spill: Path, pool, report) -> Scan:
    """SRC: the release tar, a directory of per-synset tars, or a directory of synset folders."""
    if src.is_dir():
        containers, rejects = list_synset_tars(src), []
        if not containers:
            return scan_class_folders(src)
        if any(p.is_dir() for p in src.iterdir()):
            raise ToolError(f"{src} holds both synset tars and folders; point SRC at one layout")
    elif src.is_file():
        containers, rejects = list_release_tar(src)
    else:
        raise ToolError(f"SRC '{src}' does not exist")
    if not containers:
        raise ToolError(f"no per-synset tars (NAME.tar) found in {src}")
    groups, unreadable = [], []
    jobs = [(c, spill) for c in containers]
    for i, (group, bad) in enumerate(pool.imap(_index_job, jobs, chunksize=4), 1):
        rejects.extend(bad)
        if group is not None:
            groups.append(group)
        else:  # the class keeps its index: one bad tar must not shift every later label
            unreadable.append(containers[i - 1].wnid)
        report(i, len(jobs))
    return Scan(groups, rejects, unreadable)


def _index_job(job: tuple[Container, Path]) -> tuple[Group | None, list[dict]]:
    return index_container(*job)

"""Find every input image without unpacking anything: the scan (groups of one class's images, in one folder or one
tar) and its class-folder walk; the tar layouts of ImageNet-22K are in data_tools/tars.py.

A scan is a list of groups whose members are located by name, or by byte offset and size inside an uncompressed
tar, so a worker can read any image with one positioned read.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from data_tools.errors import ToolError


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

def scan_class_folders(src: Path, follow_symlinks: bool = False) -> Scan:
    """Every regular file below each class folder; files directly in SRC belong to no class and are recorded.

    Symlinks are not followed (each is recorded, `symlink not followed`) unless `follow_symlinks`; then only
    those that resolve inside SRC are, after every real folder was scanned, and a folder is scanned once at most
    (a link to a folder already scanned is a loop or a duplicate, recorded). A class folder that is a symlink
    stays a class either way, empty when not followed, so it cannot shift the label of every later class."""
    if not src.is_dir():
        raise ToolError(f"SRC '{src}' is not a directory")
    walk = FolderWalk(src, follow_symlinks)
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False):
            walk.add_class(entry.name, entry.path)
        elif entry.is_symlink() and os.path.isdir(entry.path):
            walk.add_class(entry.name, None)
        elif entry.is_symlink() and not follow_symlinks:
            walk.rejects.append(reject(entry.name, "symlink not followed", link_target(entry.path)))
        else:
            walk.rejects.append(reject(entry.name, "not in a class folder"))
    walk.follow_links()
    groups = [Group(wnid, wnid, walk.roots[wnid], "dir", sorted(members))
              for wnid, members in sorted(walk.members.items()) if members]
    if not groups:
        skipped = sum(r["reason"] == "symlink not followed" for r in walk.rejects)
        hint = f"; {skipped} symlink(s) not followed (--follow-symlinks follows those inside SRC)" if skipped else ""
        raise ToolError(f"no images under class folders of {src} (expected SRC/CLASS/IMAGE files){hint}")
    return Scan(groups, walk.rejects, sorted(w for w, members in walk.members.items() if not members))


class FolderWalk:
    """The files of class folders, found without leaving SRC; symlinks met are kept for `follow_links`."""

    def __init__(self, src: Path, follow: bool) -> None:
        self.src, self.follow = src, follow
        self.real_src = os.path.realpath(src)
        self.seen = {_identity(src)}  # (st_dev, st_ino) of every folder scanned
        self.roots: dict[str, str] = {}  # class -> the folder its member names are relative to
        self.members: dict[str, list[tuple[str, int, int]]] = {}
        self.links: deque[tuple[str, str]] = deque()  # (class, name inside it; "" for the class folder itself)
        self.rejects: list[dict] = []

    def add_class(self, wnid: str, path: str | None) -> None:
        """A real class folder is scanned now; a symlinked one (path None) waits for follow_links."""
        self.members[wnid] = []
        if path is None:
            self.roots[wnid] = os.path.join(self.src, wnid)
            self.links.append((wnid, ""))
        else:
            self.roots[wnid] = path
            self.walk(wnid, "")

    def walk(self, wnid: str, start: str) -> None:
        stack = [start]
        while stack:
            rel = stack.pop()
            folder = os.path.join(self.roots[wnid], rel)
            try:
                self.seen.add(_identity(folder))
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as exc:  # os.walk would skip it in silence
                self.rejects.append(reject(f"{wnid}/{rel}".rstrip("/"), "unreadable folder", str(exc)))
                continue
            for entry in entries:
                name = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_symlink():
                    self.links.append((wnid, name))
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(name)
                elif entry.is_file(follow_symlinks=False):
                    self.members[wnid].append((name, 0, entry.stat(follow_symlinks=False).st_size))
                else:  # FIFO, socket, device: never opened (a FIFO would block the worker)
                    self.rejects.append(reject(f"{wnid}/{name}", "not a regular file"))

    def follow_links(self) -> None:
        """Each symlink met: recorded, or (when following) its folder scanned or its file taken, in order."""
        while self.links:
            wnid, name = self.links.popleft()
            path = os.path.join(self.roots[wnid], name) if name else self.roots[wnid]
            source = f"{wnid}/{name}" if name else wnid
            why = link_refusal(path, self.real_src, self.follow)
            if why is None and os.path.isdir(path) and _identity(path) in self.seen:
                why = "symlink loop or folder already scanned"
            if why is not None:
                self.rejects.append(reject(source, why, link_target(path)))
            elif os.path.isdir(path):
                if not name:
                    self.roots[wnid] = os.path.realpath(path)
                self.walk(wnid, name)
            elif os.path.isfile(path):
                self.members[wnid].append((name, 0, os.path.getsize(path)))
            else:
                self.rejects.append(reject(source, "not a regular file", link_target(path)))


def link_refusal(path: str, real_src: str, follow: bool) -> str | None:
    """Why the symlink `path` is not followed, or None: followed only when asked to and resolving inside SRC."""
    if not follow:
        return "symlink not followed"
    if not os.path.exists(path):
        return "broken symlink"
    real = os.path.realpath(path)
    if real != real_src and not real.startswith(real_src.rstrip(os.sep) + os.sep):
        return "symlink leads out of SRC"
    return None


def _identity(path: str | Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def link_target(path: str) -> str:
    try:
        return f"-> {os.readlink(path)}"
    except OSError:
        return ""


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

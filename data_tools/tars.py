"""ImageNet-22K's tar layouts, read in place: the release tar of per-synset tars, or a directory of per-synset tars.

Members are located by header only (no image is read here). A gzip compressed inner tar cannot be read at an
offset; it is decompressed once, within size and ratio caps, into the conversion's work directory (the only bytes
ever unpacked) and removed when the conversion completes. A tar that ends before its end-of-archive blocks is
truncated, never a shorter tar.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from data_tools.errors import ToolError
from data_tools.limits import DEFAULT_MAX_GUNZIP_BYTES, GUNZIP_MAX_RATIO
from data_tools.progress import human_bytes
from data_tools.sources import Group, Scan, is_unsafe, link_refusal, link_target, reject, scan_class_folders

GZIP_MAGIC = b"\x1f\x8b"
BLOCK = tarfile.BLOCKSIZE  # 512: tar headers, data padding and the two end-of-archive blocks
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


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


class Truncated(Exception):
    """A tar that stops before its end-of-archive blocks. tarfile takes a cut at a member boundary (or inside a
    header) for the end of the archive, so an interrupted download would otherwise read as a shorter tar."""


class GunzipTooLarge(Exception):
    """A gzip-compressed inner tar that decompresses to more than the caps allow (a gzip bomb, or a cap too low)."""


def tar_members(tar: tarfile.TarFile, fileobj, size: int) -> Iterator[tarfile.TarInfo]:
    """The members of `tar` (read from `fileobj`, `size` bytes), then Truncated unless the last member's data is
    whole and the two zero blocks that end every tar follow it; a non-zero block there is a ReadError."""
    last = None
    try:
        for member in tar:
            last = member
            if member.offset_data + member.size > size:
                raise Truncated(f"it ends inside {member.name!r}, at byte {size:,}")
            yield member
    except tarfile.ReadError:  # tarfile's "unexpected end of data": the cut is in the last member's padding
        if last is not None and last.offset_data + -(-last.size // BLOCK) * BLOCK > size:
            raise Truncated(f"it ends inside {last.name!r}, at byte {size:,}") from None
        raise
    end = tar.offset  # where tarfile stopped: the end-of-archive blocks must be here
    if end + 2 * BLOCK > size:
        raise Truncated(f"it ends at byte {size:,}, before the end-of-archive blocks")
    fileobj.seek(end)
    if fileobj.read(2 * BLOCK) != bytes(2 * BLOCK):
        raise tarfile.ReadError(f"damaged at byte {end:,}: neither a tar header nor the end of the archive")


def list_release_tar(src: Path) -> tuple[list[Container], list[dict]]:
    """The per-synset tars inside the official release tar, found by reading headers only; a release tar that is
    cut short (an interrupted download) stops the conversion rather than silently losing its later classes."""
    containers, rejects = [], []
    try:
        with open(src, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as outer:
            for member in tar_members(outer, raw, os.fstat(raw.fileno()).st_size):
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
    except Truncated as exc:
        raise ToolError(f"{src} is truncated: {exc} (an interrupted download?); {len(containers):,} synset tars "
                        f"before the cut, nothing converted") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ToolError(f"cannot read {src} as an uncompressed tar ({exc})") from None
    return containers, rejects


def list_synset_tars(src: Path, follow_symlinks: bool) -> tuple[list[Container], list[dict], list[str]]:
    """The NAME.tar files of a directory, the other files it holds (recorded), and the classes of the synset
    tars that are symlinks not followed (kept as classes, like an unreadable tar)."""
    containers, rejects, kept = [], [], []
    real_src = os.path.realpath(src)
    for path in sorted(src.iterdir()):
        wnid = synset_of(path.name)
        if path.is_dir():
            continue  # a folder beside synset tars stops the scan (one layout at a time)
        if wnid is None:
            rejects.append(reject(path.name, "not a synset tar"))
        elif path.is_symlink() and (why := link_refusal(str(path), real_src, follow_symlinks)):
            rejects.append(reject(path.name, why, link_target(str(path))))
            kept.append(wnid)
        elif not path.is_file():
            rejects.append(reject(path.name, "not a regular file"))
            kept.append(wnid)
        else:
            real = os.path.realpath(path)
            containers.append(Container(wnid, path.name, real, 0, os.path.getsize(real)))
    return containers, rejects, kept


def index_container(container: Container, spill: Path, max_gunzip_bytes: int = DEFAULT_MAX_GUNZIP_BYTES
                    ) -> tuple[Group | None, list[dict]]:
    """Members of one per-synset tar, or (None, [why]) when it cannot be read: an unreadable, truncated or too
    large tar is rejected whole."""
    try:
        path, base, size = container.path, container.base, container.size
        with Window(path, base, size) as window:
            compressed = window.read(2) == GZIP_MAGIC
        if compressed:
            path, base = _gunzip(container, spill, max_gunzip_bytes), 0
            size = os.path.getsize(path)
        group = Group(container.wnid, container.source, path, "tar")
        rejects = []
        with Window(path, base, size) as window, tarfile.open(fileobj=window, mode="r:") as tar:
            for member in tar_members(tar, window, size):
                name = f"{container.source}/{member.name}"
                if member.isdir():
                    continue
                if is_unsafe(member.name):
                    rejects.append(reject(name, "unsafe member name"))
                elif not member.isreg():
                    rejects.append(reject(name, "not a regular file"))
                else:
                    group.members.append((member.name, base + member.offset_data, member.size))
        return group, rejects
    except Truncated as exc:
        return None, [reject(container.source, "truncated tar", str(exc))]
    except GunzipTooLarge as exc:
        return None, [reject(container.source, "gzip member too large", str(exc))]
    except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile, ValueError) as exc:
        return None, [reject(container.source, "unreadable tar", str(exc))]


def _gunzip(container: Container, spill: Path, max_bytes: int) -> str:
    """Decompress a gzip inner tar into the work directory, in blocks, stopping (and removing the partial file)
    once it exceeds `max_bytes` or GUNZIP_MAX_RATIO times its compressed size."""
    spill.mkdir(parents=True, exist_ok=True)
    # named by content position, never by the member name, so nothing lands outside the work directory
    target = spill / (hashlib.sha1(f"{container.path}:{container.base}".encode()).hexdigest() + ".tar")
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    limit = min(max_bytes, GUNZIP_MAX_RATIO * container.size)
    try:
        with Window(container.path, container.base, container.size) as window, gzip.GzipFile(fileobj=window) as gz:
            with open(tmp, "wb") as out:
                written = 0
                while block := gz.read(1 << 20):
                    written += len(block)
                    if written > limit:
                        raise GunzipTooLarge(f"{human_bytes(container.size)} compressed, more than "
                                             f"{human_bytes(limit)} decompressed (the caps: --max-gunzip-bytes "
                                             f"{max_bytes:,} and {GUNZIP_MAX_RATIO}x the compressed size)")
                    out.write(block)
        os.replace(tmp, target)
    except EOFError:  # the gzip stream stops before its end marker: cut short like a truncated tar
        raise Truncated(f"its gzip stream ends early, at byte {container.size:,}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return str(target)



def scan_imagenet22k(src: Path, spill: Path, pool, report, *, follow_symlinks: bool = False,
                     max_gunzip_bytes: int = DEFAULT_MAX_GUNZIP_BYTES) -> Scan:
    """SRC: the release tar, a directory of per-synset tars, or a directory of synset folders."""
    kept: list[str] = []
    if src.is_dir():
        containers, rejects, kept = list_synset_tars(src, follow_symlinks)
        if not containers and not kept:
            return scan_class_folders(src, follow_symlinks)
        if any(p.is_dir() for p in src.iterdir()):
            raise ToolError(f"{src} holds both synset tars and folders; point SRC at one layout")
    elif src.is_file():
        containers, rejects = list_release_tar(src)
    else:
        raise ToolError(f"SRC '{src}' is neither a tar file nor a directory")
    if not containers:
        linked = f"; {len(kept)} symlinked or irregular one(s) skipped, see --follow-symlinks" if kept else ""
        raise ToolError(f"no per-synset tars (NAME.tar) found in {src}{linked}")
    groups, unreadable = [], list(kept)
    jobs = [(c, spill, max_gunzip_bytes) for c in containers]
    for i, (group, bad) in enumerate(pool.imap(_index_job, jobs, chunksize=4), 1):
        rejects.extend(bad)
        if group is not None:
            groups.append(group)
        else:  # the class keeps its index: one bad tar must not shift every later label
            unreadable.append(containers[i - 1].wnid)
        report(i, len(jobs))
    return Scan(groups, rejects, unreadable)


def _index_job(job: tuple[Container, Path, int]) -> tuple[Group | None, list[dict]]:
    return index_container(*job)

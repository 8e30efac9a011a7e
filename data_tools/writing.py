"""The worker processes that write shards: a pool whose workers die with the parent and count their progress in
shared memory, and the per-shard job each runs (read, check or convert, store; rejects recorded)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

from data_tools.images import Rejected, prepare
from data_tools.parallel import process_context
from data_tools.shards import ShardFile
from data_tools.sources import read_member


class worker_pool:
    """A process pool whose workers die with the parent (so a killed conversion leaves no writer behind) and
    share a counter of images processed, for the progress line.

    `images`: the workers write shards (webdataset) and resize (torchvision); torch is imported here, once,
    before they fork and inherit it, each then limited to one thread. Not at module top, so that no argument
    error and no refused SRC or OUT ever waits for torch; a pool that only reads tar headers never loads it."""

    def __init__(self, workers: int, *, images: bool = True) -> None:
        self.workers, self.images = workers, images

    def __enter__(self):
        if self.images:
            import torch  # noqa: F401
            import torchvision.transforms.v2.functional  # noqa: F401

        context = process_context()
        self.counter = context.Value("q", 0)
        self.pool = context.Pool(self.workers, initializer=_init_worker, initargs=(self.counter, self.images))
        return self.pool, self.counter

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.pool.close()
        else:
            self.pool.terminate()
        self.pool.join()


_counter = None


def _init_worker(counter, images: bool) -> None:
    global _counter
    _counter = counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if images:
        import torch  # imported by worker_pool already: inherited with fork

        torch.set_num_threads(1)  # one core per worker: the pool is the parallelism
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent


def write_shard(task: tuple) -> dict:
    """Worker: read, check or convert and store each planned sample of one shard; rejects are recorded."""
    path, split, items, max_size, quality, max_pixels = task
    shard, rejects, handles, copied, unreported = ShardFile(Path(path)), [], {}, 0, 0
    for key, label, kind, group_path, wnid, group_source, name, offset, size in items:
        source = f"{group_source}/{name}"
        try:
            prepared = prepare(read_member(kind, group_path, name, offset, size, handles), max_size=max_size,
                               quality=quality, max_pixels=max_pixels)
        except Rejected as exc:
            rejects.append({"split": split, "source": source, "reason": exc.reason, "detail": exc.detail})
        except OSError as exc:
            rejects.append({"split": split, "source": source, "reason": "unreadable file", "detail": str(exc)})
        else:
            copied += prepared.copied
            shard.write(key, prepared.jpeg, label,
                        {"source": source, "wnid": wnid, "width": prepared.width, "height": prepared.height})
        unreported += 1
        if unreported == 32:
            unreported = _report(unreported)
    _report(unreported)
    close_handles(handles)
    entry = shard.close()
    return {"split": split, "entry": entry, "rejects": rejects, "copied": copied,
            "converted": entry["num_samples"] - copied}


def _report(n: int) -> int:
    with _counter.get_lock():
        _counter.value += n
    return 0


def close_handles(handles: dict[str, int]) -> None:
    for fd in handles.values():
        os.close(fd)
    handles.clear()

"""Decode, transform and batch shard samples in DataLoader workers; track where every reader is.

Training batches carry bookkeeping keys starting with "_" (which reader made them, its epoch and raw
position, corrupt images so far) that the trainer strips and saves in checkpoints, so a resumed run
continues each reader exactly where it stopped.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import signal
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils import signal_handling

from largessl.console import err_line
from largessl.data.index import SplitIndex
from largessl.data.jpeg_check import checked_jpeg, host_decode
from largessl.data.stream import RawSample, StreamPlan, derive_seed, read_range
from largessl.errors import DataError
from largessl.lifecycle import STOP_SIGNALS, die_with_parent
from largessl.rng import seed_everything

Transform = Callable[[Image.Image], dict[str, torch.Tensor]]


@dataclass
class ReaderState:
    """Where one reader is: its epoch, raw samples taken from its stream, batches made, corrupt images seen."""

    epoch: int = 0
    raw_pos: int = 0
    batches: int = 0
    corrupt: int = 0


def read_image(sample: RawSample) -> Image.Image | str:
    """The CPU path: the sample's JPEG, checked as on the GPU path (data/jpeg_check.py), then decoded by Pillow as
    RGB; or the reason it is skipped."""
    checked = checked_jpeg(sample)
    return checked if isinstance(checked, str) else host_decode(checked[0])


def decode_image(sample: RawSample) -> Image.Image | None:
    """The sample's image as RGB, or None when it is refused or does not decode."""
    image = read_image(sample)
    return None if isinstance(image, str) else image


def label_of(sample: RawSample) -> int:
    try:
        return int(sample["cls"])
    except (KeyError, ValueError):
        return -1


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


class CorruptLog:
    """Reports each undecodable sample once, on stderr and (when given) as a JSON line in `path`."""

    def __init__(self, path: str | None, rank: int) -> None:
        self.path, self.rank = path, rank

    def record(self, sample: RawSample, epoch: int, reason: str = "") -> None:
        entry = {"key": sample.get("__key__"), "shard": sample.get("__url__"), "rank": self.rank, "epoch": epoch}
        why = f": {reason}" if reason else ""
        err_line(f"warning: skipped undecodable image {entry['key']} in {entry['shard']}{why}")
        if self.path:
            with open(self.path, "a") as f:  # one short append per line: safe across worker processes
                f.write(json.dumps(entry) + "\n")


def _init_worker(_: int) -> None:
    """A DataLoader worker ignores the stop signals (the training process handles SIGTERM/SIGUSR1/SIGINT: a
    checkpoint, then exit, and workers must not die first, since SLURM and Ctrl-C signal every process), and dies
    with its parent. Ignoring SIGTERM also defeats multiprocessing's exit-time terminate(), so the training process
    kills its workers itself (`kill_workers`)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)


_live_iterators: weakref.WeakSet = weakref.WeakSet()


def kill_workers() -> None:
    """SIGKILL the DataLoader workers of every iterator this process started, reap them and close the iterators.
    Safe at any time. Called on every way out of training, and at exit (where torch's own shutdown is a no-op)."""
    for iterator in list(_live_iterators):
        if getattr(iterator, "_worker_pids_set", False):  # else torch's SIGCHLD handler reports the kill as a crash
            with contextlib.suppress(Exception):
                signal_handling._remove_worker_pids(id(iterator))
            iterator._worker_pids_set = False
        workers = list(getattr(iterator, "_workers", ()))
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        for worker in workers:
            worker.join(timeout=5)
        with contextlib.suppress(Exception):
            iterator._shutdown_workers()  # queues and the pin-memory thread; the workers are gone already
    _live_iterators.clear()


atexit.register(kill_workers)  # runs before multiprocessing's own exit handler, which would wait on them forever


class Loader(DataLoader):
    """A DataLoader whose worker processes `kill_workers` can reach (torch keeps them on its private iterator)."""

    def _get_iterator(self) -> Any:
        iterator = super()._get_iterator()
        if getattr(iterator, "_workers", None):
            _live_iterators.add(iterator)
        return iterator


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class TrainStream(IterableDataset):
    """Endless batches for one rank. Physical worker i plays logical reader (i + rotation) mod W, so that
    after a resume the DataLoader's round robin continues with the reader whose batch comes next."""

    def __init__(self, plan: StreamPlan, transform: Transform, *, rank: int, world_size: int, num_workers: int,
                 states: dict[int, ReaderState] | None = None, rotation: int = 0, corrupt_log: CorruptLog,
                 encoded: bool = False) -> None:
        """`encoded`: the transform takes the checked JPEG bytes (data/gpu_decode.py), not a decoded image. Both
        paths skip the samples data/jpeg_check.py refuses; the CPU path also what Pillow then fails to decode."""
        self.plan, self.transform, self.rank, self.world_size = plan, transform, rank, world_size
        self.decode: Callable[[RawSample], Any]
        if encoded:
            from largessl.data.gpu_decode import EncodedImage, collate_encoded

            self.decode, self.collate = EncodedImage.read, collate_encoded
        else:
            self.decode, self.collate = read_image, collate
        self.num_readers = max(1, num_workers)
        self.states = states or {}
        self.rotation = rotation
        self.corrupt_log = corrupt_log

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, _ = _worker_slot()
        reader = (worker + self.rotation) % self.num_readers
        slot = reader * self.world_size + self.rank
        state = ReaderState(**asdict(self.states.get(reader, ReaderState())))
        while True:
            yield from self._epoch_batches(reader, slot, state)
            state = ReaderState(epoch=state.epoch + 1, corrupt=state.corrupt)

    def _epoch_batches(self, reader: int, slot: int, state: ReaderState) -> Iterator[dict[str, torch.Tensor]]:
        stream = itertools.islice(self.plan.stream(state.epoch, slot), state.raw_pos, None)
        bad_in_a_row = 0
        items: list[dict[str, torch.Tensor]] = []
        while state.batches < self.plan.batches_in_epoch(state.epoch, slot):
            sample = next(stream)
            state.raw_pos += 1
            image = self.decode(sample)
            if isinstance(image, str):  # the reason it is skipped
                state.corrupt += 1
                bad_in_a_row += 1
                self.corrupt_log.record(sample, state.epoch, image)
                if bad_in_a_row > self.plan.num_samples:
                    raise DataError(f"no decodable image in the whole training split "
                                    f"({len(self.plan.shards)} shards in {self.plan.shards[0].home})")
                continue
            bad_in_a_row = 0
            # torch, NumPy and Python's RNGs: timm's RandAugment and random erasing (fine-tuning) draw from the last two
            seed_everything(derive_seed(self.plan.seed, state.epoch, sample["__key__"]))
            item = self.transform(image)
            item["label"] = torch.tensor(label_of(sample))
            items.append(item)
            if len(items) == self.plan.batch_size:
                state.batches += 1
                batch = self.collate(items)
                items = []
                batch.update({f"_{k}": torch.tensor(v) for k, v in asdict(state).items()})
                batch["_reader"] = torch.tensor(reader)
                yield batch


class EvalStream(IterableDataset):
    """Every sample of a split exactly once, in index order, for feature extraction.

    Each rank gets the same number of batches (ZeRO-3 needs every rank in every forward): ranks take
    equal contiguous ranges, padded past the end with repeats marked valid=0. Undecodable images are
    replaced by a blank image marked valid=0.
    """

    def __init__(self, index: SplitIndex, transform: Transform, *, batch_size: int, rank: int, world_size: int,
                 image_size: int) -> None:
        self.index, self.transform, self.batch_size = index, transform, batch_size
        self.rank, self.world_size, self.image_size = rank, world_size, image_size
        self.per_rank = -(-index.num_samples // world_size)

    @property
    def batches_per_rank(self) -> int:
        return -(-self.per_rank // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, num_workers = _worker_slot()
        per_worker = -(-self.batches_per_rank // num_workers)
        first = min(worker * per_worker, self.batches_per_rank)
        last = min(first + per_worker, self.batches_per_rank)
        for b in range(first, last):
            start = self.rank * self.per_rank + b * self.batch_size
            stop = min(start + self.batch_size, (self.rank + 1) * self.per_rank)
            yield collate([self._item(pos, sample) for pos, sample in self._positions(start, stop)])

    def _positions(self, start: int, stop: int) -> Iterator[tuple[int, RawSample]]:
        total = self.index.num_samples
        shards = list(self.index.shards)
        real = read_range(shards, min(start, total), min(stop, total))
        repeats = itertools.chain.from_iterable(read_range(shards, 0, total) for _ in itertools.count())
        padding = itertools.islice(repeats, max(0, stop - max(start, total)))
        return zip(range(start, stop), itertools.chain(real, padding), strict=True)

    def _item(self, position: int, sample: RawSample) -> dict[str, torch.Tensor]:
        image = decode_image(sample)
        valid = image is not None and position < self.index.num_samples
        item = self.transform(image if image is not None else Image.new("RGB", (self.image_size,) * 2))
        item["label"] = torch.tensor(label_of(sample))
        item["valid"] = torch.tensor(valid)
        return item


def make_loader(dataset: IterableDataset, *, num_workers: int, pin_memory: bool, prefetch_factor: int) -> DataLoader:
    """Batches come ready-made from the dataset (batch_size=None); pinned only when there is a GPU to copy to."""
    return Loader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory and torch.cuda.is_available(),
        prefetch_factor=prefetch_factor if num_workers else None,
        worker_init_fn=_init_worker if num_workers else None,
        multiprocessing_context="fork" if num_workers and os.name == "posix" else None,
    )


class DataPosition:
    """Where this rank's readers are, from the batches the trainer has consumed (not merely prefetched)."""

    def __init__(self, readers: dict[int, ReaderState] | None = None, micro_batches: int = 0) -> None:
        self.readers = dict(readers or {})
        self.micro_batches = micro_batches

    def observe(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Record a consumed batch's bookkeeping and return the batch without it."""
        meta = {key[1:]: int(batch.pop(key)) for key in [k for k in batch if k.startswith("_")]}
        reader = meta.pop("reader")
        self.readers[reader] = ReaderState(**meta)
        self.micro_batches += 1
        return batch

    @property
    def corrupt(self) -> int:
        return sum(state.corrupt for state in self.readers.values())

    def state_dict(self) -> dict:
        return {"readers": {r: asdict(s) for r, s in self.readers.items()}, "micro_batches": self.micro_batches}

    @classmethod
    def continued(cls, plan: StreamPlan, *, samples: int, epoch: float, rank: int, world_size: int,
                  num_workers: int, micro_batches: int) -> tuple[DataPosition, bool]:
        """This rank's readers after `samples` samples (`epoch` epochs) of a run whose world size, workers or
        micro-batch size were different; and whether the continuation is exact.

        'global' order: sample for sample (global chunk k belongs to slot k mod slots in any layout, so every
        chunk before samples / batch size is consumed and none after; with corrupt images, whose slots read
        ahead for replacements, up to that many samples shift). 'sharded' order: each new reader starts at the
        same fraction of its part of the epoch as the old readers had reached in theirs: the epoch keeps its
        length, but up to min(f, 1 - f) of it (f: the fraction done) can be seen twice and as much not at all."""
        readers = {}
        for reader in range(max(1, num_workers)):
            slot = reader * world_size + rank
            if plan.order == "global" and not plan.resampled:
                chunk = samples // plan.batch_size
                whole, within = divmod(chunk, plan.epoch_chunks)
                batches = plan.chunks_before(whole, slot, within)
            else:
                whole, batches = int(epoch), int(epoch % 1.0 * plan.batches_per_slot)
            readers[reader] = ReaderState(epoch=whole, raw_pos=batches * plan.batch_size, batches=batches)
        return cls(readers, micro_batches), plan.order == "global" and not plan.resampled

    @classmethod
    def from_state_dict(cls, state: dict) -> DataPosition:
        readers = {int(r): ReaderState(**s) for r, s in state["readers"].items()}
        return cls(readers, int(state["micro_batches"]))

"""Which undecoded samples each reader streams, epoch by epoch, as a pure function of the seed.

A reader ("slot") is one DataLoader worker of one rank. For epoch e, every slot streams exactly
`samples_per_slot` good samples, so every rank yields the same number of batches (no hang on uneven
shards). The stream of a slot is deterministic given (seed, epoch, slot), which is what makes resuming
exact: a resumed reader replays its stream up to the saved position without decoding anything.

Modes:
- exact epochs, order 'sharded' (default): the epoch's shard order is shuffled; the concatenated samples
  are cut into one contiguous range per slot (each slot opens only the shards its range touches). The
  last T mod (slots x batch) samples of that order are left out of the epoch (different ones each epoch).
- exact epochs, order 'global': every slot reads the whole epoch and keeps the batches ("chunks") whose index
  k, counted on across epochs, has k mod slots == slot. An epoch is floor(T / global batch) global batches, so
  optimizer step t trains on samples [t G, (t + 1) G) of the concatenated epochs whatever the number of ranks,
  workers and micro-batch size: a run resumed on another world size continues sample for sample.
- resampled: each slot draws shards with replacement (webdataset's resampled mode).
A corrupt image makes its slot read on past its range (wrapping around the epoch) to fill its batches.
A shard read from a URL or a pipe: command whose stream breaks off is read again from its start, skipping the samples
already given (data/remote.py), so a network failure neither loses samples nor shifts the stream.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from webdataset.filters import shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from largessl.console import err_line
from largessl.data.index import Shard
from largessl.data.remote import read_with_retries
from largessl.data.remote import verify_hint as dataset_hint
from largessl.errors import DataError

RawSample = dict[str, Any]  # {"__key__": str, "jpg": bytes, "cls": bytes, "json": bytes, ...}


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of values, stable across processes and Python versions."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _reason(exc: BaseException) -> str:
    """webdataset appends (stream, url) to an exception's args; keep the reason itself."""
    first = exc.args[0] if exc.args else exc
    return str(first).split(" @ <")[0] if isinstance(first, str) else str(exc)


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """One warning per shard and process (a worker reads a shard again every epoch)."""
    if key not in _warned:
        _warned.add(key)
        err_line(f"warning: {message}")


def verify_hint(shards: tuple[Shard, ...] | list[Shard]) -> str:
    """What to run on the dataset the shards come from."""
    return dataset_hint(shards[0].home)


def count_mismatch(shard: Shard, found: int) -> str:
    return f"shard {shard.path} holds {found} samples but dataset.json says {shard.num_samples}; {verify_hint([shard])}"


def read_shard(shard: Shard, skip: int = 0, *, exact: bool = True) -> Iterator[RawSample]:
    """The samples of one shard in file order (undecoded), after skipping the first `skip`.

    A shard holding fewer samples than dataset.json says is an error when `exact` (the epoch plan, and so exact
    resume, is built on those counts), a warning otherwise. A shard read from a URL or a pipe: command whose stream
    breaks off is read again, a bounded number of times, without giving a sample twice (data/remote.py)."""
    found = 0
    try:
        for found, sample in read_with_retries(shard.path, _tar_samples):
            if found > skip:
                yield sample
    except FileNotFoundError:
        raise DataError(f"missing shard {shard.path}") from None
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise DataError(f"shard {shard.path} is damaged ({_reason(exc)}); {verify_hint([shard])}") from None
    if found < shard.num_samples:
        if exact:
            raise DataError(count_mismatch(shard, found))
        warn_once(shard.path, count_mismatch(shard, found))


def _tar_samples(stream: BinaryIO, url: str) -> Iterator[RawSample]:
    return group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


def read_range(shards: list[Shard], start: int, stop: int, *, exact: bool = True) -> Iterator[RawSample]:
    """Samples [start, stop) of the concatenation of `shards`, opening only the shards it touches. Where the range
    reaches a shard's end, a sample beyond the count dataset.json gives is reported (it is never used)."""
    offset = 0
    for shard in shards:
        end = offset + shard.num_samples
        if end > start and offset < stop:
            skip = max(0, start - offset)
            samples = read_shard(shard, skip, exact=exact)
            yield from itertools.islice(samples, min(stop, end) - max(start, offset))
            if stop >= end and next(samples, None) is not None:
                warn_once(shard.path, f"shard {shard.path} holds more samples than the {shard.num_samples} "
                                      "dataset.json says; the extra ones are never read")
            samples.close()
        offset = end
        if offset >= stop:
            return


def no_samples(shards: tuple[Shard, ...] | list[Shard]) -> DataError:
    return DataError(f"the shards of {shards[0].home} yield no samples at all although dataset.json "
                     f"lists {sum(s.num_samples for s in shards)}; {verify_hint(shards)}")


@dataclass(frozen=True)
class StreamPlan:
    """Everything a reader needs to know to produce its stream; picklable for DataLoader workers."""

    shards: tuple[Shard, ...]
    seed: int
    num_slots: int
    batch_size: int
    shuffle_buffer: int = 0
    resampled: bool = False
    order: str = "sharded"
    global_batch: int = 0  # 'global' order: samples per optimizer step (0: one batch per slot)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def samples_per_slot(self) -> int:
        return self.num_samples // (self.num_slots * self.batch_size) * self.batch_size

    @property
    def batches_per_slot(self) -> int:
        return self.samples_per_slot // self.batch_size

    @property
    def epoch_samples(self) -> int:
        """Samples an epoch trains on: equal parts per slot ('sharded'), whole global batches ('global')."""
        if self.order != "global" or self.resampled:
            return self.num_slots * self.samples_per_slot
        step = self.global_batch or self.num_slots * self.batch_size
        return self.num_samples // step * step

    @property
    def epoch_chunks(self) -> int:
        return self.epoch_samples // self.batch_size

    def batches_in_epoch(self, epoch: int, slot: int) -> int:
        """Batches slot `slot` makes in `epoch` (in 'global' order they differ by at most one between slots)."""
        if self.order != "global" or self.resampled:
            return self.batches_per_slot
        return self.chunks_before(epoch, slot, self.epoch_chunks)

    def chunks_before(self, epoch: int, slot: int, chunk: int) -> int:
        """'global' order: how many of chunks [0, chunk) of `epoch` are slot `slot`'s."""
        first = (slot - epoch * self.epoch_chunks) % self.num_slots  # the slot's first chunk in the epoch
        return max(0, -(-(chunk - first) // self.num_slots))

    def shard_order(self, epoch: int) -> list[Shard]:
        order = list(self.shards)
        random.Random(derive_seed(self.seed, "shards", epoch)).shuffle(order)
        return order

    def _shuffled(self, samples: Iterator[RawSample], *seed_parts: object) -> Iterator[RawSample]:
        if self.shuffle_buffer <= 1:
            return samples
        rng = random.Random(derive_seed(self.seed, "buffer", *seed_parts))
        return shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)

    def stream(self, epoch: int, slot: int) -> Iterator[RawSample]:
        """Slot `slot`'s raw samples for `epoch`: its share first, then (never-ending) spares."""
        if self.resampled:
            return self._resampled(epoch, slot)
        order = self.shard_order(epoch)
        if self.order == "global":
            return self._global(order, epoch, slot)
        start, stop = slot * self.samples_per_slot, (slot + 1) * self.samples_per_slot
        share = self._shuffled(read_range(order, start, stop), epoch, slot)
        return itertools.chain(share, self._wrap_around(order, stop))

    def _wrap_around(self, order: list[Shard], start: int) -> Iterator[RawSample]:
        """Spare samples for slots that met corrupt images: the epoch's order from `start`, cyclically."""
        total = self.num_samples
        while True:
            produced = 0
            for sample in itertools.chain(read_range(order, start % total, total), read_range(order, 0, start % total)):
                produced += 1
                yield sample
            if not produced:  # a whole cycle without a sample would spin forever
                raise no_samples(order)

    def _global(self, order: list[Shard], epoch: int, slot: int) -> Iterator[RawSample]:
        everything = itertools.chain(self._shuffled(read_range(order, 0, self.num_samples), epoch),
                                     self._wrap_around(order, 0))
        offset = epoch * self.epoch_chunks
        for i, sample in enumerate(everything):
            if (offset + i // self.batch_size) % self.num_slots == slot:
                yield sample

    def _resampled(self, epoch: int, slot: int) -> Iterator[RawSample]:
        rng = random.Random(derive_seed(self.seed, "resample", epoch, slot))

        def draws() -> Iterator[RawSample]:
            empty_in_a_row = 0
            while True:
                produced = 0
                for sample in read_shard(rng.choice(self.shards), exact=False):
                    produced += 1
                    yield sample
                empty_in_a_row = 0 if produced else empty_in_a_row + 1
                if empty_in_a_row > 10 * len(self.shards):  # every shard drawn, on average ten times, all empty
                    raise no_samples(self.shards)

        return self._shuffled(draws(), epoch, slot)

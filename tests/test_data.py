"""Shard streaming on real JPEG shards: equal batches per reader, determinism, exact resume, bad data."""

from __future__ import annotations

import itertools
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, uneven_dataset

from data_tools.shards import write_index
from largessl.data.build import build_eval_loader, build_train_loader, plan_training
from largessl.data.config import DataConfig
from largessl.data.index import open_split
from largessl.data.loader import CorruptLog, DataPosition, EvalStream, TrainStream
from largessl.data.stream import StreamPlan
from largessl.data.transforms import EvalTransform, MAETransform
from largessl.errors import DataError

TRANSFORM = MAETransform(32, (0.2, 1.0), 4)
def plan_for(root: Path, *, slots: int, batch: int, **kwargs) -> StreamPlan:
    return StreamPlan(shards=open_split(str(root), "train").shards, seed=0, num_slots=slots, batch_size=batch,
                      **kwargs)


def keys(samples) -> list[str]:
    return [s["__key__"] for s in samples]


def test_every_reader_streams_an_equal_disjoint_share(tmp_path: Path) -> None:
    plan = plan_for(uneven_dataset(tmp_path / "d", [100, 37, 250, 13]), slots=3, batch=16, shuffle_buffer=50)
    assert plan.num_samples == 400 and plan.samples_per_slot == 128
    shares = [keys(itertools.islice(plan.stream(0, slot), plan.samples_per_slot)) for slot in range(3)]
    everything = [k for share in shares for k in share]
    assert len(everything) == len(set(everything)) == 384  # each sample at most once per epoch
    assert keys(itertools.islice(plan.stream(0, 1), 128)) == shares[1]  # deterministic
    assert keys(itertools.islice(plan.stream(1, 1), 128)) != shares[1]  # reshuffled next epoch


def test_train_stream_epochs_have_the_same_number_of_batches_on_every_rank(tmp_path: Path) -> None:
    root = uneven_dataset(tmp_path / "d", [100, 37, 250, 13])
    for rank in range(3):
        plan = plan_for(root, slots=3, batch=16)
        stream = TrainStream(plan, TRANSFORM, rank=rank, world_size=3, num_workers=0,
                             corrupt_log=CorruptLog(None, rank))
        epochs = [int(b["_epoch"]) for b in itertools.islice(iter(stream), 2 * plan.batches_per_slot + 1)]
        assert epochs == [0] * 8 + [1] * 8 + [2]


def batches_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_exactly(tmp_path: Path) -> None:
    plan = plan_for(uneven_dataset(tmp_path / "d", [60, 70]), slots=1, batch=8, shuffle_buffer=20)
    reference = list(itertools.islice(iter(TrainStream(plan, TRANSFORM, rank=0, world_size=1, num_workers=0,
                                                       corrupt_log=CorruptLog(None, 0))), 24))
    position = DataPosition()
    for batch in reference[:11]:  # stop in the middle of epoch 1 (16 batches per epoch)
        position.observe(dict(batch))
    resumed = TrainStream(plan, TRANSFORM, rank=0, world_size=1, num_workers=0, states=position.readers,
                          corrupt_log=CorruptLog(None, 0))
    for expected, got in zip(reference[11:], iter(resumed), strict=False):
        assert batches_equal(expected, got)


def test_resume_with_workers_continues_the_round_robin(tmp_path: Path) -> None:
    root = uneven_dataset(tmp_path / "d", [64, 64, 64])
    cfg = DataConfig(train=str(root), micro_batch_size=8, num_workers=2, shuffle_buffer=16, pin_memory=False)
    plan = plan_training(cfg, open_split(str(root), "train"), seed=3, world_size=1)
    reference = list(itertools.islice(iter(build_train_loader(cfg, plan, TRANSFORM, rank=0, world_size=1)), 10))
    position = DataPosition()
    for batch in reference[:5]:  # an odd count: the next batch comes from the second worker
        position.observe(dict(batch))
    loader = build_train_loader(cfg, plan, TRANSFORM, rank=0, world_size=1, states=position.readers,
                                rotation=position.micro_batches % 2)
    resumed = list(itertools.islice(iter(loader), 5))
    assert all(batches_equal(a, b) for a, b in zip(reference[5:], resumed, strict=True))


def test_global_order_does_not_depend_on_the_number_of_readers(tmp_path: Path) -> None:
    root = uneven_dataset(tmp_path / "d", [50, 77])
    one = keys(itertools.islice(plan_for(root, slots=1, batch=8, order="global", shuffle_buffer=30).stream(0, 0), 32))
    two = plan_for(root, slots=2, batch=8, order="global", shuffle_buffer=30)
    first, second = (keys(itertools.islice(two.stream(0, s), 16)) for s in range(2))
    interleaved = first[:8] + second[:8] + first[8:] + second[8:]  # chunk c goes to reader c mod 2
    assert interleaved == one


def global_steps(plan: StreamPlan, *, world: int, workers: int, accumulation: int, steps: int,
                 start: dict[int, DataPosition] | None = None) -> list[set[str]]:
    """The sample keys of each optimizer step, as the trainer consumes them: rank r's micro-batch j comes from its
    reader j mod workers (the DataLoader's round robin), each reader making its slot's batches epoch by epoch."""
    def reader_batches(rank: int, reader: int):
        slot = reader * world + rank
        state = start[rank].readers[reader] if start else None
        epoch, skip = (state.epoch, state.raw_pos) if state else (0, 0)
        while True:
            count = plan.batches_in_epoch(epoch, slot) * plan.batch_size - skip
            samples = keys(itertools.islice(plan.stream(epoch, slot), skip, skip + count))
            yield from (samples[i:i + plan.batch_size] for i in range(0, len(samples), plan.batch_size))
            epoch, skip = epoch + 1, 0

    first = start[0].micro_batches if start else 0
    readers = {(r, w): reader_batches(r, w) for r in range(world) for w in range(workers)}
    out = []
    for step in range(steps):
        batch: set[str] = set()
        for j in range(step * accumulation, (step + 1) * accumulation):
            for rank in range(world):
                batch.update(next(readers[rank, (first + j) % workers]))
        out.append(batch)
    return out


def test_global_order_steps_are_the_same_for_any_layout_across_epochs(tmp_path: Path) -> None:
    # 127 samples, global batch 24: 5 steps per epoch whatever the ranks, workers and micro-batch size; 12 steps
    # cross two epoch boundaries. A run resumed on another layout at step 7 continues with the same samples.
    root = uneven_dataset(tmp_path / "d", [50, 77])
    layouts = [(1, 1, 24, 1), (1, 4, 4, 6), (2, 1, 12, 1), (2, 2, 4, 3), (1, 7, 4, 6), (2, 3, 2, 6)]  # world, workers,
    # micro-batch, accumulation; epochs of 30 micro-batches do not divide over 4 or 7 readers
    runs = []
    for world, workers, micro, accumulation in layouts:
        plan = plan_for(root, slots=world * workers, batch=micro, order="global", shuffle_buffer=30, global_batch=24)
        assert plan.epoch_samples == 120
        runs.append(global_steps(plan, world=world, workers=workers, accumulation=accumulation, steps=12))
    assert all(len(step) == 24 for step in runs[0])
    assert all(run == runs[0] for run in runs[1:])
    assert len(set().union(*runs[0][:5])) == 120  # an epoch never repeats a sample
    for world, workers, micro, accumulation in layouts[1:]:
        plan = plan_for(root, slots=world * workers, batch=micro, order="global", shuffle_buffer=30, global_batch=24)
        start = {}
        for rank in range(world):
            start[rank], exact = DataPosition.continued(plan, samples=7 * 24, epoch=7 / 5, rank=rank,
                                                        world_size=world, num_workers=workers,
                                                        micro_batches=7 * accumulation)
            assert exact
        resumed = global_steps(plan, world=world, workers=workers, accumulation=accumulation, steps=5, start=start)
        assert resumed == runs[0][7:12]


def test_resampled_mode_is_endless_and_seeded(tmp_path: Path) -> None:
    plan = plan_for(uneven_dataset(tmp_path / "d", [30, 30]), slots=2, batch=8, resampled=True)
    taken = keys(itertools.islice(plan.stream(0, 1), 200))  # far beyond the 60 samples there are
    assert len(taken) == 200 and taken == keys(itertools.islice(plan.stream(0, 1), 200))


def test_corrupt_image_is_skipped_counted_and_recorded(tmp_path: Path) -> None:
    root = uneven_dataset(tmp_path / "d", [40, 40], corrupt_at=5)
    plan = plan_for(root, slots=1, batch=8)
    log = tmp_path / "corrupt.jsonl"
    stream = TrainStream(plan, TRANSFORM, rank=0, world_size=1, num_workers=0, corrupt_log=CorruptLog(str(log), 0))
    batches = list(itertools.islice(iter(stream), plan.batches_per_slot))
    assert all(b["image"].shape[0] == 8 for b in batches)  # batches stay full
    assert int(batches[-1]["_corrupt"]) == 1
    assert json.loads(log.read_text())["key"] == "s00005"


def test_missing_shard_is_named(tmp_path: Path) -> None:
    root = uneven_dataset(tmp_path / "d", [10, 10, 10])
    (root / "train-000001.tar").unlink()
    with pytest.raises(DataError, match=r"missing shard .*train-000001\.tar"):
        open_split(str(root), "train")


def test_shard_lost_while_running_is_named(tmp_path: Path) -> None:
    root = uneven_dataset(tmp_path / "d", [16, 16])
    plan = plan_for(root, slots=1, batch=8)
    (root / "train-000000.tar").unlink()
    (root / "train-000001.tar").unlink()
    with pytest.raises(DataError, match=r"missing shard .*train-00000[01]\.tar"):
        next(iter(TrainStream(plan, TRANSFORM, rank=0, world_size=1, num_workers=0, corrupt_log=CorruptLog(None, 0))))


def test_empty_and_malformed_datasets(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_split(str(tmp_path / "nowhere"), "train")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="has no dataset.json"):
        open_split(str(tmp_path / "plain"), "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    write_index(empty, name="e", source="e", classes=[], split="train", split_entry={"num_samples": 0, "shards": []},
                preprocess={})
    with pytest.raises(DataError, match="split 'train' of dataset .* is empty"):
        open_split(str(empty), "train")
    with pytest.raises(DataError, match=r"has no split 'val' \(it has: train\)"):
        open_split(str(empty), "val")


def test_too_few_samples_for_every_reader(tmp_path: Path) -> None:
    root = uneven_dataset(tmp_path / "d", [20])
    cfg = DataConfig(train=str(root), micro_batch_size=16, num_workers=2)
    with pytest.raises(DataError, match="cannot fill one batch of 16 for each of 4 readers"):
        plan_training(cfg, open_split(str(root), "train"), seed=0, world_size=2)


def test_eval_stream_covers_every_sample_once_with_equal_batches(mini_shards: Path) -> None:
    index = open_split(str(mini_shards), "val")
    seen, counts = [], []
    for rank in range(3):
        loader = build_eval_loader(index, EvalTransform(32), batch_size=16, rank=rank, world_size=3,
                                   num_workers=2, image_size=32)
        batches = list(loader)
        counts.append(len(batches))
        for batch in batches:
            seen += [(int(label), image.sum().item()) for label, image, valid in
                     zip(batch["label"], batch["image"], batch["valid"], strict=True) if valid]
    assert len(set(counts)) == 1  # ZeRO-3 needs every rank in every forward
    assert len(seen) == index.num_samples == 200
    assert len(set(seen)) == 200  # no sample twice
    assert sorted(label for label, _ in seen) == sorted([c for c in range(10) for _ in range(20)])


def test_eval_stream_pads_tiny_splits(tmp_path: Path) -> None:
    index = open_split(str(uneven_dataset(tmp_path / "d", [3])), "train")
    valid = [torch.cat([b["valid"] for b in EvalStream(index, EvalTransform(32), batch_size=4, rank=rank,
                                                     world_size=4, image_size=32)]).tolist() for rank in range(4)]
    assert valid == [[True], [True], [True], [False]]  # 3 samples, 4 ranks: the last runs a padded repeat


def test_data_tools_imagefolder_labels_follow_folders(mini_shards: Path, tmp_path: Path) -> None:
    index = json.loads((mini_shards / "dataset.json").read_text())
    assert index["classes"] == CLASSES
    assert index["splits"]["train"]["num_samples"] == 500 and index["splits"]["val"]["num_samples"] == 200
    copy = tmp_path / "copy"
    shutil.copytree(mini_shards, copy)
    stream = EvalStream(open_split(str(copy), "train"), lambda image: {"image": torch.zeros(1)}, batch_size=50,
                        rank=0, world_size=1, image_size=32)
    labels = torch.cat([b["label"] for b in stream])
    assert torch.bincount(labels).tolist() == [50] * 10


# ----------------------------------------------------------------------------- counts that disagree with the index


def misdeclared(tmp_path: Path, sizes: list[int], declared: list[int]) -> Path:
    """Real shards of `sizes` samples whose dataset.json claims `declared` samples per shard."""
    root = uneven_dataset(tmp_path / "d", sizes)
    index = json.loads((root / "dataset.json").read_text())
    for shard, count in zip(index["splits"]["train"]["shards"], declared, strict=True):
        shard["num_samples"] = count
    index["splits"]["train"]["num_samples"] = sum(declared)
    (root / "dataset.json").write_text(json.dumps(index))
    return root


def test_a_shard_with_fewer_samples_than_declared_stops_exact_epochs(tmp_path: Path) -> None:
    root = misdeclared(tmp_path, [40, 30], [40, 50])
    plan = plan_for(root, slots=1, batch=8)
    with pytest.raises(DataError, match=r"shard \S+train-000001\.tar holds 30 samples but dataset\.json says 50; "
                                        r"check the dataset with: python -m data_tools verify "):
        list(itertools.islice(plan.stream(0, 0), plan.samples_per_slot))


def test_a_shard_with_more_samples_than_declared_warns_and_reads_the_declared(tmp_path: Path, capsys) -> None:
    root = misdeclared(tmp_path, [40, 30], [40, 20])
    plan = plan_for(root, slots=1, batch=4)
    samples = keys(itertools.islice(plan.stream(0, 0), plan.samples_per_slot))
    assert len(samples) == 60 and len(set(samples)) == 60
    assert "s00060" not in samples  # the 21st sample of the second shard is beyond its declared count
    assert capsys.readouterr().err.count("holds more samples than the 20 dataset.json says") == 1


def test_resampled_streams_warn_on_short_shards_and_stop_when_nothing_comes(tmp_path: Path, capsys) -> None:
    plan = plan_for(misdeclared(tmp_path, [40, 30], [40, 50]), slots=1, batch=8, resampled=True)
    assert len(keys(itertools.islice(plan.stream(0, 0), 200))) == 200
    assert capsys.readouterr().err.count("holds 30 samples but dataset.json says 50") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with tarfile.open(empty / "train-000000.tar", "w"):
        pass
    write_index(empty, name="e", source="test", classes=CLASSES, split="train", preprocess={},
                split_entry={"num_samples": 64, "shards": [{"file": "train-000000.tar", "num_samples": 64}]})
    for resampled in (True, False):
        stream = plan_for(empty, slots=1, batch=8, resampled=resampled).stream(0, 0)
        with pytest.raises(DataError, match="yield no samples at all|holds 0 samples"):
            next(stream)

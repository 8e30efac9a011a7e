"""From a split's index and the data config to the DataLoaders of training and evaluation."""

from __future__ import annotations

from torch.utils.data import DataLoader

from largessl.data.config import DataConfig
from largessl.data.index import SplitIndex
from largessl.data.loader import CorruptLog, EvalStream, ReaderState, TrainStream, Transform, make_loader
from largessl.data.stream import StreamPlan


def plan_training(cfg: DataConfig, index: SplitIndex, *, seed: int, world_size: int,
                  global_batch: int = 0) -> StreamPlan:
    plan = StreamPlan(shards=index.shards, seed=seed, num_slots=world_size * max(1, cfg.num_workers),
                      batch_size=cfg.micro_batch_size, shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled,
                      order=cfg.order, global_batch=global_batch)
    cfg.check_fill(index.num_samples, world_size, plan.global_batch or plan.num_slots * plan.batch_size)
    return plan


def describe_plan(plan: StreamPlan, index: SplitIndex) -> str:
    """The data plan's line. Its unit is a pass over the data, as the readers deliver it, not the schedule's epoch
    (floor(samples / global batch) steps, said by the trainer), which a pass differs from by the samples the
    readers' whole batches leave out."""
    mode = "resampled shards" if plan.resampled else f"exact epochs, {plan.order} order"
    left_out = "" if plan.resampled else (
        f"; {plan.num_samples - plan.epoch_samples} samples left out of each pass (different ones each pass)")
    return (f"data: {index.root} [{index.split}]: {plan.num_samples} samples in {len(plan.shards)} shards, {mode}; "
            f"{plan.num_slots} readers, {plan.epoch_chunks} micro-batches of {plan.batch_size} per pass over the "
            f"data{left_out}")


def build_train_loader(cfg: DataConfig, plan: StreamPlan, transform: Transform, *, rank: int, world_size: int,
                       states: dict[int, ReaderState] | None = None, rotation: int = 0,
                       corrupt_log_path: str | None = None) -> DataLoader:
    stream = TrainStream(plan, transform, rank=rank, world_size=world_size, num_workers=cfg.num_workers,
                         states=states, rotation=rotation, corrupt_log=CorruptLog(corrupt_log_path, rank),
                         encoded=cfg.decode == "gpu")
    return make_loader(stream, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory,
                       prefetch_factor=cfg.prefetch_factor)


def build_eval_loader(index: SplitIndex, transform: Transform, *, batch_size: int, rank: int, world_size: int,
                      num_workers: int, image_size: int) -> DataLoader:
    stream = EvalStream(index, transform, batch_size=batch_size, rank=rank, world_size=world_size,
                        image_size=image_size)
    return make_loader(stream, num_workers=min(num_workers, stream.batches_per_rank), pin_memory=False,
                       prefetch_factor=2)


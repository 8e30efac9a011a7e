"""Where training and evaluation images come from and how they are batched."""

from __future__ import annotations

from dataclasses import dataclass

from largessl.config.loader import require
from largessl.errors import DataError

DATA_ORDERS = ("sharded", "global")


@dataclass
class DataConfig:
    """The shard datasets, batch size per rank and the streaming/loader settings."""

    train: str = ""
    """Training dataset: a directory holding dataset.json and the shards (shard-format.md), an http(s) base URL
    serving them, or pipe:COMMAND with {} for each file's name (docs/data.md)."""
    train_split: str = "train"
    """Split of `train` to pretrain on."""
    val: str = ""
    """Dataset for evaluation (k-NN queries): directory, URL or pipe: command as `train`; empty: no evaluation
    data."""
    val_split: str = "val"
    """Split of `val` used as k-NN queries."""
    micro_batch_size: int = 64
    """Images per rank per forward pass."""
    num_workers: int = 8
    """DataLoader worker processes per rank (0: decode in the training process)."""
    shuffle_buffer: int = 2000
    """Samples held by each reader's shuffle buffer (undecoded JPEG bytes); 0 disables it."""
    resampled: bool = False
    """Draw shards with replacement (webdataset's resampled mode) instead of exact epochs."""
    order: str = "sharded"
    """'sharded': each reader streams its own contiguous part of the epoch (scales to any dataset).
    'global': every reader streams the whole epoch and keeps its share, so the data order is the same
    for any number of ranks and workers (reproducibility checks; costs ranks x workers times the I/O)."""
    pin_memory: bool = True
    """Pin host batches for faster copies to the GPU."""
    decode: str = "cpu"
    """Where JPEGs are decoded and augmented: cpu (DataLoader workers) or gpu (workers draw the augmentation, the
    device decodes with nvJPEG and crops, resizes, flips and colours; data/gpu_decode.py and gpu_views.py; every
    pretraining method; on a machine without a GPU the same code runs on the CPU)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""

    def validate(self, prefix: str = "data") -> None:
        require(self.micro_batch_size > 0, f"{prefix}.micro_batch_size", "must be > 0")
        require(self.num_workers >= 0, f"{prefix}.num_workers", "must be >= 0")
        require(self.decode in ("cpu", "gpu"), f"{prefix}.decode", f"must be cpu or gpu (got '{self.decode}')")
        require(self.shuffle_buffer >= 0, f"{prefix}.shuffle_buffer", "must be >= 0")
        require(self.prefetch_factor > 0, f"{prefix}.prefetch_factor", "must be > 0")
        require(self.order in DATA_ORDERS, f"{prefix}.order", f"must be one of {', '.join(DATA_ORDERS)}")
        require(not (self.resampled and self.order == "global"), f"{prefix}.order",
                "'global' needs exact epochs; set data.resampled=false")

    def check_fill(self, num_samples: int, world_size: int, global_batch: int) -> None:
        """Every reader (a DataLoader worker of a rank) fills at least one micro-batch of `num_samples` training
        samples per pass ('global' order: the data fills one global batch); else one DataError naming the keys.
        Checked before torch loads (preflight) and again when the stream is planned (data/build.py)."""
        if self.resampled:
            return
        if self.order == "global" and num_samples < global_batch:
            raise DataError(f"data.train: {num_samples} samples cannot fill one global batch of {global_batch}; "
                            "lower optim.global_batch_size")
        readers = world_size * max(1, self.num_workers)
        if self.order != "global" and num_samples // (readers * self.micro_batch_size) == 0:
            raise DataError(f"data.train: {num_samples} samples cannot fill one batch of {self.micro_batch_size} "
                            f"for each of {readers} readers ({world_size} ranks x {max(1, self.num_workers)} "
                            "workers); lower data.micro_batch_size or data.num_workers")

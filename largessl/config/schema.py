"""The root pretraining config: one typed section per component, each defined beside its component."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from largessl.config.loader import require
from largessl.data.config import DataConfig
from largessl.distributed.config import DistributedConfig
from largessl.epochs import check_pair
from largessl.eval.config import EvalConfig
from largessl.models.config import ModelConfig
from largessl.optim.config import OptimConfig


@dataclass
class TrainerConfig:
    """Steps, logging, checkpointing and the seed."""

    max_steps: int | None = 1000
    """Optimizer steps to train for; the lr schedule ends here. Or set `epochs` instead (then this is null)."""
    epochs: float | None = None
    """Epochs to train for, instead of max_steps (largessl/epochs.py: resolved at start-up, floor(epoch samples /
    global batch) steps per epoch, the epoch being `epoch_samples`, else the training split's sample count)."""
    epoch_samples: int | None = None
    """Samples in one epoch of a schedule stated in epochs (trainer.epochs, optim.warmup_epochs, the objective's):
    the shipped pretraining recipes set ImageNet-1k's 1,281,167, the dataset their epochs were published on, so they
    plan the same steps on any dataset (ImageNet-22K included). null: epochs of the training split."""
    log_every: int = 10
    """Print a progress line and log metrics every this many optimizer steps."""
    ckpt_every: int = 1000
    """Save a checkpoint every this many optimizer steps (and always at the end)."""
    ckpt_every_minutes: float = 30.0
    """Also save a checkpoint once this many minutes have passed since the last one (checked every 10 steps), so a
    preempted or killed job loses at most about that much work; 0 disables it."""
    keep_last: int = 3
    """Checkpoints kept on disk; older ones are deleted."""
    seed: int = 0
    """Seeds weights, data order, augmentations and masks."""

    def validate(self, prefix: str = "trainer") -> None:
        check_pair(self, prefix, "epochs", "max_steps")
        require(self.max_steps is None or self.max_steps > 0, f"{prefix}.max_steps", "must be > 0")
        require(self.epochs is None or self.epochs > 0, f"{prefix}.epochs", "must be > 0")
        require(self.epoch_samples is None or self.epoch_samples > 0, f"{prefix}.epoch_samples",
                "must be > 0 (or null: epochs of the training split)")
        require(self.log_every > 0, f"{prefix}.log_every", "must be > 0")
        require(self.ckpt_every > 0, f"{prefix}.ckpt_every", "must be > 0")
        require(self.keep_last > 0, f"{prefix}.keep_last", "must be > 0")
        require(self.ckpt_every_minutes >= 0, f"{prefix}.ckpt_every_minutes", "must be >= 0 (0 disables it)")
        require(self.seed >= 0, f"{prefix}.seed", "must be >= 0")


@dataclass
class RunConfig:
    """Where the run directory is (the same directory = resume)."""

    output_dir: str = "runs"
    """Parent directory of run directories."""
    name: str = ""
    """Run directory name under output_dir; empty: the recipe's file name. Same name = resume."""

    def validate(self, prefix: str = "run") -> None:
        require(bool(self.output_dir), f"{prefix}.output_dir", "must name a directory")
        name = self.name
        require(name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name,
                f"{prefix}.name", f"'{name}' must be one directory name inside run.output_dir (no '/', not '..')")


@dataclass
class TrackingConfig:
    """MLflow: store, experiment, on/off."""

    uri: str = ""
    """MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db here)."""
    experiment: str = "largessl"
    """MLflow experiment name."""
    enabled: bool = True
    """Log to MLflow at all (RUN_DIR/metrics.jsonl is written either way)."""
    flush_timeout_s: float = 10.0
    """At the end of a job, wait at most this long for MLflow to receive what is still queued. What it has not
    received stays in RUN_DIR/metrics.jsonl and is sent by the next job on the run (rerun the same command)."""

    def validate(self, prefix: str = "tracking") -> None:
        require(0 <= self.flush_timeout_s < float("inf"), f"{prefix}.flush_timeout_s", "must be seconds, >= 0")


@dataclass
class PretrainConfig:
    """The whole pretraining config, one section per component."""

    model: ModelConfig = field(default_factory=ModelConfig)
    objective: Any = None
    """Tagged union: the config dataclass of the objective named by objective.name."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        for name in ("model", "objective", "data", "optim", "trainer", "distributed", "eval", "run", "tracking"):
            getattr(self, name).validate(name)
        self.objective.validate_with_model(self.model)
        require(self.optim.name != "lars" or self.distributed.zero_stage == 0, "optim.name",
                "lars needs whole tensors for its per-tensor trust ratio: set distributed.zero_stage=0 (a probe's "
                "frozen encoder needs no optimizer state to partition)")
        require(self.optim.name == "adamw" or not self.distributed.offload, "optim.name",
                f"{self.optim.name} with distributed.offload: CPU offload steps DeepSpeed's CPU AdamW only")
        require(not self.optim.fused or not self.distributed.offload, "optim.fused",
                "not with distributed.offload: CPU offload steps DeepSpeed's CPU AdamW")
        require(not self.model.compile or self.distributed.zero_stage < 3, "model.compile",
                "not with ZeRO-3 (its parameter-gathering hooks run inside each block): set distributed.zero_stage "
                "to 0, 1 or 2, or model.compile=false")
        require(self.optim.global_batch_size % self.data.micro_batch_size == 0, "optim.global_batch_size",
                f"{self.optim.global_batch_size} is not a multiple of data.micro_batch_size "
                f"({self.data.micro_batch_size})")

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each of `world_size` ranks."""
        per_step = self.data.micro_batch_size * world_size
        require(self.optim.global_batch_size % per_step == 0, "optim.global_batch_size",
                f"{self.optim.global_batch_size} is not a multiple of data.micro_batch_size x world size = "
                f"{self.data.micro_batch_size} x {world_size}")
        accumulation = self.optim.global_batch_size // per_step
        require(accumulation == 1 or self.distributed.accumulates,
                "distributed.zero_stage", f"0 cannot accumulate bf16 gradients ({accumulation} micro-batches per "
                "step here; DeepSpeed's ZeRO-0 has no fp32 accumulation for a bf16 model): use zero_stage 1-3, "
                "or a global batch of data.micro_batch_size x world size")
        return accumulation

    def knn_datasets(self) -> dict[str, tuple[str, str]]:
        """The k-NN evaluation's neighbours and queries: key -> (dataset directory, split)."""
        data, ev = self.data, self.eval
        return {"eval.knn_train": (ev.knn_train or data.train, ev.knn_train_split or data.train_split),
                "eval.knn_val": (ev.knn_val or data.val, ev.knn_val_split or data.val_split)}

    def datasets(self) -> dict[str, tuple[str, str]]:
        """Every dataset the run reads, key -> (directory, split): data.train, and the k-NN sets when
        eval.knn_every is set. Paths are run-time inputs: they are checked when a run starts (`check_inputs`),
        not here, so a recipe prints and validates without them."""
        found = {"data.train": (self.data.train, self.data.train_split),
                 **(self.knn_datasets() if self.eval.knn_every else {})}
        if getattr(self.objective, "evaluates", False):  # a protocol's top-1 reads the val split
            found["data.val"] = (self.data.val, self.data.val_split)
        return found

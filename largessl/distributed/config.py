"""How training is spread: ZeRO stage, offload and precision."""

from __future__ import annotations

from dataclasses import dataclass

from largessl.config.loader import require

PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass
class DistributedConfig:
    """ZeRO stage, CPU offload, precision, DeepSpeed JSON, backend."""

    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)."""
    offload: bool = False
    """Keep optimizer states in CPU memory (ZeRO-3 only; ds_configs/zero3_offload.json)."""
    precision: str = "bf16"
    """bf16 (default on GPU), fp16 (dynamic loss scaling) or fp32."""
    ds_config: str = ""
    """A DeepSpeed JSON with ZeRO/communication settings only; default ds_configs/zero{stage}[_offload].json."""
    backend: str = ""
    """torch.distributed backend; empty picks nccl on GPUs and gloo on CPU."""
    timeout_s: float = 600.0
    """How long a rank may go without progress (a step's data, forward/backward or optimizer step, a collective, a
    checkpoint write, an evaluation batch, a start-up phase) before every rank ends with one line naming the rank
    that went silent, and a SLURM job requeues itself to resume from its newest complete checkpoint (watchdog.py).
    The backend's collective timeout is set 60 s above it. 600 s is NCCL's own default: a GPU job's step, its
    checkpoint write and each start-up phase fit in it many times over. 0: no watchdog, the backends' timeouts."""
    peak_tflops: float = 0.0
    """Dense bf16 peak of one device in TFLOP/s, for the `mfu` metric; 0: from the table of known GPUs (mfu.py;
    none on CPU)."""

    @property
    def accumulates(self) -> bool:
        """Whether gradients can be accumulated over micro-batches: not at ZeRO-0 in bf16, where DeepSpeed has no
        fp32 accumulation for a bf16 model."""
        return self.zero_stage > 0 or self.precision != "bf16"

    def validate(self, prefix: str = "distributed") -> None:
        require(self.zero_stage in (0, 1, 2, 3), f"{prefix}.zero_stage",
                f"must be 0, 1, 2 or 3 (got {self.zero_stage})")
        require(self.precision in PRECISIONS, f"{prefix}.precision",
                f"must be one of {', '.join(PRECISIONS)} (got '{self.precision}')")
        require(not self.offload or self.zero_stage == 3, f"{prefix}.offload",
                "CPU offload is shipped for ZeRO-3 only; set distributed.zero_stage=3")
        require(self.backend in ("", "nccl", "gloo"), f"{prefix}.backend", "must be nccl, gloo or empty (auto)")
        require(self.timeout_s == 0 or 1 <= self.timeout_s < float("inf"), f"{prefix}.timeout_s",
                "must be seconds, >= 1 (or 0 for no watchdog)")
        require(self.peak_tflops >= 0, f"{prefix}.peak_tflops", "must be >= 0 (0: from the known GPUs)")

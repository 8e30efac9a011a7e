"""Collectives that are no-ops (identity) when no process group is running, so single-device code stays simple."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if is_distributed() and world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(values) / world_size()


def all_reduce_max(values: torch.Tensor) -> list[float]:
    """Element-wise maximum over ranks of a small float tensor, read back to the host (one collective)."""
    values = values.to(torch.float64)
    if is_distributed() and world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.tolist()


def all_true(flag: torch.Tensor) -> bool:
    """Whether a boolean holds on every rank (one collective)."""
    return all_reduce_max((~flag.reshape(1).bool()).to(torch.float64))[0] == 0


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (what rank 0 decided, everyone acts on)."""
    if not is_distributed() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def abort() -> None:
    """On the way out after an error: abort the process group so this process exits instead of waiting in a
    collective or in the backend's destructor (NCCL); peers see the connection drop and fail too, at once (gloo
    detects a closed connection; NCCL's watchdog aborts). Never raises."""
    if not is_distributed():
        return
    try:
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()
    except Exception:  # gloo has no abort; nothing else may be left to clean up
        pass


def store_client(timeout_s: float) -> Any:
    """A connection of our own to the job's rendezvous store (MASTER_ADDR:MASTER_PORT: torchrun's agent, or rank
    0's process under srun), with its own timeout, for the watchdog's heartbeats."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0 (in rank order)."""
    if not is_distributed() or world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather_object(obj: Any) -> list[Any]:
    if not is_distributed() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed() and world_size() > 1:
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """Forward: every rank's tensor, stacked in rank order. Backward: the gradient of this rank's slice summed over
    ranks (an all-reduce; gloo has no reduce-scatter), which is what each rank's share of the loss sends back."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # ctx: autograd's
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[rank()]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """[world_size, *tensor.shape]: every rank's `tensor` in rank order, differentiable (SyncBN statistics)."""
    if not is_distributed() or world_size() == 1:
        return tensor[None]
    return _GatherWithGrad.apply(tensor)

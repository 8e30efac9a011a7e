"""EMA teachers that stay exact under bf16 and every ZeRO stage (design.md "EMA teachers").

After each optimizer step, t <- m t + (1 - m) s for every (teacher, student) parameter pair, where s is the
student's fp32 master weight (what the optimizer updates, not its bf16 compute copy) and t is an fp32 tensor
held here. In bf16, an update of 1e-4 of a weight would round away; in fp32 it accumulates. The teacher's
compute copy (the frozen parameters its forward reads, bf16 under bf16 training) is rewritten from t after
each update.

Where the fp32 masters live (`Engine.master_layout`) decides how the update is spread over ranks:
- replicated (ZeRO-0): every rank holds every master and updates its whole fp32 teacher; no communication.
- fragments (ZeRO-1/2): each rank holds disjoint slices of the flattened masters. Each rank computes the new
  teacher on its slices, zeros elsewhere, and one all-reduce (sum) of the flat fp32 teacher hands every rank
  the whole new teacher. Adding zeros is exact, so the result equals the replicated computation bit for bit.
- partitioned (ZeRO-3): rank r holds partition r of every parameter (elements [r n, (r + 1) n) of the
  flattened parameter, n = ceil(numel / world)). The fp32 teacher is partitioned the same way and each rank
  updates its own partition from its own master partition: no all-gather, and teacher memory per rank shrinks
  with the number of ranks. The teacher's bf16 partition is overwritten in place and DeepSpeed gathers it for
  the teacher's forward like any other parameter.

The update is two rounded products and one rounded sum (no lerp or fused multiply-add), so any partitioning
of the same tensors gives the same bits as a whole-tensor reference.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from largessl import checksums
from largessl.distributed import comm
from largessl.errors import UserError

FULL_FILE = "teacher_fp32.pt"


def partition_file(rank: int) -> str:
    return f"teacher_fp32_rank{rank:05d}.pt"


def ema_step(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    """t <- m t + (1 - m) s in place, as three separately rounded elementwise operations."""
    keep = [i for i, t in enumerate(teacher) if t.numel()]
    teacher, student = [teacher[i] for i in keep], [student[i] for i in keep]
    if not teacher:
        return
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, torch._foreach_mul(student, 1.0 - momentum))


class EMATeacher:
    """The fp32 EMA state of a teacher and its update from the student's fp32 masters.

    `pairs` are (teacher name, teacher parameter, student parameter); the teacher parameters are frozen
    (requires_grad False) and shaped like their students.
    """

    @classmethod
    def of(cls, engine: Any) -> EMATeacher | None:  # engine: distributed.engine.Engine
        """The EMA teacher of the engine's objective, following the student's fp32 masters; None when the objective
        has none (DINO and SIM have one)."""
        module = engine.module
        names = module.teacher_pairs()
        if not names:
            return None
        params = dict(module.named_parameters())
        return cls(engine, [(t, params[t], params[s]) for t, s in names])

    def describe(self) -> str:
        return (f"EMA teacher: {len(self.names)} tensors, {self.layout} fp32 state, "
                f"{self.memory_bytes() / 2**20:.1f} MiB per rank")

    def __init__(self, engine: Any, pairs: list[tuple[str, nn.Parameter, nn.Parameter]]) -> None:
        self.engine = engine
        self.layout = engine.master_layout
        self.names = [name for name, _, _ in pairs]
        self.teachers = [t for _, t, _ in pairs]
        self.students = [s for _, _, s in pairs]
        self.shapes = [tuple(getattr(s, "ds_shape", s.shape)) for s in self.students]
        self.numels = [math.prod(shape) for shape in self.shapes]
        if self.layout == "partitioned":
            sizes = [t.ds_tensor.ds_numel for t in self.teachers]
        else:
            sizes = self.numels
        self.flat = torch.zeros(sum(sizes), dtype=torch.float32, device=engine.device)
        self.views = list(self.flat.split(sizes))

    def memory_bytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    @torch.no_grad()
    def initialize(self) -> None:
        """Teacher = student: an update with momentum 0 (0 t + 1 s = s exactly); or, where model.init_from gave the
        run a teacher of its own (`module.initial_teacher`: name -> fp32 tensor), that teacher, each rank holding
        its layout's part of it."""
        start = getattr(self.engine.module, "initial_teacher", None)
        if not start:
            self.flat.zero_()
            self.update(0.0)
            return
        for name, view in zip(self.names, self.views, strict=True):
            whole = start[name].reshape(-1).to(view)
            if self.layout == "partitioned":  # elements [r n, (r + 1) n) of the flattened tensor, zeros past its end
                part = whole[comm.rank() * view.numel():(comm.rank() + 1) * view.numel()]
                view.zero_()
                view[:part.numel()].copy_(part)
            else:
                view.copy_(whole)
        self._write_compute_copies()

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        pieces = self.engine.master_pieces(self.students)
        if self.layout == "partitioned":
            ema_step(self.views, [piece for _, piece in pieces], momentum)
        else:
            owned, masters, elsewhere = [], [], []
            for view, piece in zip(self.views, pieces, strict=True):
                start, values = piece if piece is not None else (view.numel(), view[:0])
                owned.append(view[start:start + values.numel()])
                masters.append(values)
                elsewhere += [view[:start], view[start + values.numel():]]
            ema_step(owned, masters, momentum)
            if self.layout == "fragments" and comm.world_size() > 1:
                torch._foreach_zero_([v for v in elsewhere if v.numel()])
                dist.all_reduce(self.flat)
        self._write_compute_copies()

    def _write_compute_copies(self) -> None:
        targets = [self.engine.compute_partition(t) for t in self.teachers]
        torch._foreach_copy_(targets, self.views)
        self.engine.refresh_gathered(self.teachers)

    # ----------------------------------------------------------------- checkpoints

    def save(self, tag_dir: Path) -> None:
        """Replicated teachers: rank 0 writes the whole fp32 teacher. Partitioned: every rank writes its part."""
        if self.layout == "partitioned":
            saved = {"world_size": comm.world_size(), "shapes": dict(zip(self.names, self.shapes, strict=True)),
                     "partitions": {n: v.cpu() for n, v in zip(self.names, self.views, strict=True)}}
            path = tag_dir / partition_file(comm.rank())
        elif comm.rank() == 0:
            saved = {n: v.view(shape).cpu() for n, v, shape in zip(self.names, self.views, self.shapes, strict=True)}
            path = tag_dir / FULL_FILE
        else:
            return
        checksums.hash_while_writing(path, lambda: torch.save(saved, path))

    @torch.no_grad()
    def load(self, tag_dir: Path) -> None:
        own = tag_dir / partition_file(comm.rank())
        saved = torch.load(own, map_location="cpu") if self.layout == "partitioned" and own.is_file() else None
        if saved is not None and saved["world_size"] == comm.world_size():
            values = [saved["partitions"][n] for n in self.names]
        else:
            full = read_teacher_fp32(tag_dir)
            missing = [n for n in self.names if n not in full]
            if missing:
                raise UserError(f"{tag_dir}: the teacher's fp32 state has no {missing[0]}; it does not fit this config")
            values = [self._local_part(full[n].reshape(-1), view.numel()) for n, view in zip(self.names, self.views,
                                                                                             strict=True)]
        torch._foreach_copy_(self.views, [v.to(self.flat.device) for v in values])
        self._write_compute_copies()

    def _local_part(self, full: torch.Tensor, size: int) -> torch.Tensor:
        if self.layout != "partitioned":
            return full
        start = comm.rank() * size
        part = full[start:start + size]
        return torch.cat([part, part.new_zeros(size - part.numel())])  # the last partition is padded


def read_teacher_fp32(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 teacher of a checkpoint, {name: tensor}, whichever layout wrote it (no process group)."""
    tag_dir = Path(tag_dir)
    if (tag_dir / FULL_FILE).is_file():
        return torch.load(tag_dir / FULL_FILE, map_location="cpu")
    parts = sorted(tag_dir.glob("teacher_fp32_rank*.pt"))
    if not parts:
        raise UserError(f"{tag_dir} holds no teacher fp32 state ({FULL_FILE} or {partition_file(0)})")
    saved = [torch.load(p, map_location="cpu") for p in parts]
    world = saved[0]["world_size"]
    if len(saved) != world:
        raise UserError(f"{tag_dir}: {len(saved)} teacher partition files for a world size of {world}")
    full = {}
    for name, shape in saved[0]["shapes"].items():
        flat = torch.cat([s["partitions"][name] for s in saved])
        full[name] = flat[:math.prod(shape)].reshape(shape)
    return full

"""Run under torchrun (test_reshape.py): checkpoints resumed on another number of ranks, several ZeRO stages in one
process group.

ARGV: OUT MODES CASES (MODES: `train`, `load` or `train+load`; CASES comma-separated, each `z{stage}[o]-{precision}`,
e.g. `z2-fp32`, `z3o-fp32` with the optimizer offloaded). OUT/w{W}/{case}/ holds what W ranks wrote for a case: the
checkpoint, and record.pt with the full state after STEPS steps and the losses of the steps after.
- MODE `train`: for each case, train STEPS steps from seed 0 with a fixed global batch (each rank its slice), save
  through checkpointing.save, record the full state, train AFTER more steps and record their losses. This is the
  reference: an uninterrupted run on W ranks.
- MODE `load`: for each case whose record another world size wrote, build the engine from another seed (so
  nothing right can come from initialisation), load through checkpointing.load, compare with the writer's state
  (exactly: the same numbers, redistributed) and with this world size's own record (the reference: within fp32
  reduction order), train AFTER steps and compare the losses with the reference's. Also: a model that does not
  fit the checkpoint fails with one line.
Loading, rank 0 writes OUT/result_w{W}.json: {case: [problems]} (empty lists: all is well) and the error line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from largessl import checkpoint, checkpointing
from largessl.distributed import comm
from largessl.distributed.config import DistributedConfig
from largessl.distributed.ema import EMATeacher
from largessl.distributed.engine import Engine, deepspeed_config, init_distributed, model_init_context
from largessl.errors import UserError
from largessl.run_dir import RunDir

GLOBAL_BATCH, STEPS, AFTER, LR = 4, 3, 2, 1e-2
RTOL, ATOL = 1e-5, 1e-6


class Tiny(nn.Module):
    """An objective in miniature: decayed, exempt and separately scaled parameter groups, an EMA teacher, a frozen
    parameter, a buffer the forward updates and a replicated extra state (like DINO's center)."""

    def __init__(self, renamed: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        setattr(self, "head2" if renamed else "head", nn.Linear(16, 4))
        self.teacher = nn.Linear(6, 16)
        self.fixed = nn.Linear(16, 4)
        for p in [*self.teacher.parameters(), *self.fixed.parameters()]:
            p.requires_grad_(False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.center = torch.zeros(4)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["x"].to(self.embed.weight.dtype)
        out = self.head(self.norm(F.gelu(self.embed(x)))).float()
        target = self.fixed(self.teacher(x)).float()
        self.calls += 1
        loss = ((out - batch["y"] - 0.1 * target - self.center.to(out.device)) ** 2).mean()
        return {"loss": loss * (1.0 + 0.01 * self.calls)}

    def param_groups(self) -> list[dict]:
        return [{"params": [self.embed.weight, self.head.weight], "weight_decay": 0.05, "lr_scale": 1.0},
                {"params": [self.embed.bias, self.norm.weight, self.norm.bias], "weight_decay": 0.0, "lr_scale": 1.0},
                {"params": [self.head.bias], "weight_decay": 0.0, "lr_scale": 0.5}]

    def teacher_pairs(self) -> list[tuple[str, str]]:
        return [("teacher.weight", "embed.weight"), ("teacher.bias", "embed.bias")]

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"center": self.center.clone()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.center = state["center"].clone()


class Run:
    """One engine, its teacher and its step count, on every rank of the process group."""

    def __init__(self, case: str, seed: int, renamed: bool = False) -> None:
        stage, offload, precision = parse_case(case)
        cfg = DistributedConfig(zero_stage=stage, offload=offload, precision=precision)
        world = comm.world_size()
        self.ds_config = deepspeed_config(cfg, micro_batch=GLOBAL_BATCH // world, accumulation=1, world_size=world,
                                          grad_clip=1.0)
        torch.manual_seed(seed)
        with model_init_context(self.ds_config):
            self.model = Tiny(renamed)
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "weight_decay": 0.0,
                   "lr_scale": 1.0}] if renamed else self.model.param_groups()
        self.engine = Engine(self.model, groups, self.ds_config, betas=(0.9, 0.95), eps=1e-8,
                             device=torch.device("cpu"))
        params = dict(self.model.named_parameters())
        self.teacher = EMATeacher(self.engine, [(t, params[t], params[s]) for t, s in self.model.teacher_pairs()])
        self.teacher.initialize()
        self.stage, self.step = stage, 0

    def train_step(self) -> float:
        """One optimizer step on this rank's slice of the step's global batch; returns the global mean loss."""
        generator = torch.Generator().manual_seed(1000 + self.step)
        x, y = torch.randn(GLOBAL_BATCH, 6, generator=generator), torch.randn(GLOBAL_BATCH, 4, generator=generator)
        per, rank = GLOBAL_BATCH // comm.world_size(), comm.rank()
        for group in self.engine.param_groups:
            group["lr"] = LR * group["lr_scale"]
        loss = self.engine({"x": x[rank * per:(rank + 1) * per], "y": y[rank * per:(rank + 1) * per]})["loss"]
        self.engine.backward(loss)
        self.engine.step()
        self.teacher.update(0.9)
        self.model.center = 0.9 * self.model.center + 0.1 * y.mean(0)
        self.step += 1
        if self.step == 1:
            self.engine.reset_optimizer_state(2)  # the head bias group's step count now lags the others
        return float(comm.all_reduce_mean(loss.detach().float().reshape(1)))

    def state(self) -> dict[str, torch.Tensor]:
        """Everything a resume must restore, as whole tensors on CPU (collective at ZeRO-1/2/3)."""
        if self.stage in (1, 2):
            self._link_optimizer_state()
        out = {}
        for name, param in self.model.named_parameters():
            out[f"compute/{name}"] = self._compute(param)
            if param.requires_grad:
                for key in ("fp32", "exp_avg", "exp_avg_sq"):
                    out[f"{key}/{name}"] = self._master(param, key)
        for index in range(len(self.engine.param_groups)):
            step = self.engine.optimizer.state[self.engine.optimizer_masters(index)[0]]["step"]
            out[f"step/{index}"] = torch.as_tensor(step, dtype=torch.float64)
        out["buffer/calls"] = self.model.calls.detach().cpu().clone()
        out["center"] = self.model.center.clone()
        out["engine/global_steps"] = torch.tensor(self.engine.ds.global_steps)
        return out

    def _link_optimizer_state(self) -> None:
        """DeepSpeed links each parameter's view of the AdamW state once, after stepping the first group, when the
        other groups have no state yet (0.19.8): link them all again, as DeepSpeed does, before reading them."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        ds_optimizer = self.engine.ds.optimizer
        for lp_params, flat in zip(ds_optimizer.bit16_groups, ds_optimizer.single_partition_of_fp32_groups,
                                   strict=True):
            lazy_init_hp_params_optimizer_state(lp_params, flat, ds_optimizer.optimizer.state)

    def _master(self, param: nn.Parameter, key: str) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if self.stage == 0:  # fp32: the parameter is its own master; bf16: DeepSpeed's fp32 copy of it
            master = self.engine._stage0_masters().get(id(param), param)
            return (master if key == "fp32" else self.engine.optimizer.state[master][key]).detach().float().clone()
        value = safe_get_full_fp32_param(param) if key == "fp32" else safe_get_full_optimizer_state(param, key)
        return value.detach().cpu().clone()

    def _compute(self, param: nn.Parameter) -> torch.Tensor:
        if self.stage != 3:
            return param.detach().float().cpu().clone()
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().float().cpu().clone()


def parse_case(case: str) -> tuple[int, bool, str]:
    """`z3o-bf16` -> (3, True, 'bf16')."""
    zero, precision = case.split("-")
    return int(zero[1]), zero.endswith("o"), precision


def train(out: Path, case: str) -> None:
    run = Run(case, seed=0)
    for _ in range(STEPS):
        run.train_step()
    rundir = RunDir(str(out / f"w{comm.world_size()}"), case)
    if comm.rank() == 0:
        rundir.ckpt_dir.mkdir(parents=True, exist_ok=True)
    comm.barrier()
    client = {"step": run.step, "world_size": comm.world_size(), "objective": run.model.extra_state()}
    layout = {"zero_stage": run.stage, "world_size": comm.world_size(), "precision": parse_case(case)[2]}
    checkpointing.save(run.engine, run.teacher, rundir, run.step, lambda: client, layout=layout, keep_last=1,
                       is_main=comm.rank() == 0)
    state = run.state()
    losses = [run.train_step() for _ in range(AFTER)]
    if comm.rank() == 0:
        torch.save({"state": state, "losses": losses}, rundir.path / "record.pt")


def differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float, atol: float,
                what: str) -> list[str]:
    problems = []
    for key, value in want.items():
        if key not in got:
            problems.append(f"{what}: {key} missing")
        elif not torch.allclose(got[key].double(), value.double(), rtol=rtol, atol=atol):
            diff = float((got[key].double() - value.double()).abs().max())
            problems.append(f"{what}: {key} differs by up to {diff:.3g}")
    return problems


def load(out: Path, case: str, other: int) -> list[str]:
    """Resume `case` from what `other` ranks wrote; the problems found (none: it resumed exactly)."""
    stage, _, precision = parse_case(case)
    written = RunDir(str(out / f"w{other}"), case)
    saver = torch.load(written.path / "record.pt")
    reference = torch.load(out / f"w{comm.world_size()}" / case / "record.pt")
    run = Run(case, seed=1)
    if stage == 3:  # into an engine that has stepped: small parameters are kept gathered from then on
        run.train_step()
    tag = checkpoint.choose_resume_tag(written.ckpt_dir).tag
    client = checkpointing.load(run.engine, run.teacher, written.ckpt_dir, tag)
    run.step = int(client["step"])
    state = run.state()
    problems = differences(state, saver["state"], 0.0, 0.0, f"vs the {other}-rank state it was saved from")
    exact = precision == "fp32"  # bf16: another world size reduces bf16 gradients in another order
    if exact:
        problems += differences(state, reference["state"], RTOL, ATOL, "vs the uninterrupted reference")
    losses = torch.tensor([run.train_step() for _ in range(AFTER)])
    want = torch.tensor(reference["losses"])
    if not torch.allclose(losses, want, rtol=RTOL if exact else 2e-2, atol=ATOL if exact else 1e-3):
        problems.append(f"losses after resuming {losses.tolist()}, uninterrupted {want.tolist()}")
    return problems


def misfit_line(out: Path, other: int, case: str) -> str:
    """The error of a model whose parameters are not the checkpoint's (a renamed head)."""
    run = Run(case, seed=0, renamed=True)
    ckpt_dir = RunDir(str(out / f"w{other}"), case).ckpt_dir
    try:
        checkpointing.load(run.engine, run.teacher, ckpt_dir, checkpoint.choose_resume_tag(ckpt_dir).tag)
    except UserError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def main() -> None:
    out, modes, cases = Path(sys.argv[1]), sys.argv[2].split("+"), sys.argv[3].split(",")
    init_distributed(DistributedConfig(zero_stage=0, precision="fp32"))
    world, other = comm.world_size(), 3 - comm.world_size()
    if "train" in modes:
        for case in cases:
            train(out, case)
    if "load" in modes:
        result: dict[str, Any] = {case: load(out, case, other) for case in cases
                                  if (out / f"w{other}" / case / "record.pt").is_file()}
        result["misfit"] = misfit_line(out, other, cases[-1])
        if comm.rank() == 0:
            (out / f"result_w{world}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

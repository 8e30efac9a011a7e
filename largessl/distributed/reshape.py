"""Resuming a ZeRO-1/2/3 checkpoint on another number of ranks (another data-parallel world size).

DeepSpeed refuses such a load: each rank's file holds flat partitions whose boundaries depend on the world
size that wrote them. ZeRO-0 needs nothing here: its weights and optimizer state are whole in the model file,
and DeepSpeed's ordinary load restores them on any number of ranks.

How a checkpoint written on W ranks is loaded on W' ranks, on every rank, without a conversion on disk:
1. Every rank reads the W partition files itself (memory-mapped, so a rank pages in what it uses and ranks on a
   node share the page cache) and un-flattens them into whole tensors per parameter with DeepSpeed's own
   reconstruction (deepspeed/utils/zero_to_fp32.py, as `zero_to_fp32.py` does for the weights). The AdamW
   moments are flat partitions laid out exactly like the fp32 master partitions, so the same reconstruction
   un-flattens them too. One state at a time (weights, then each moment), so a rank holds at most one whole
   copy of the model in host memory at ZeRO-1/2, and one parameter at a time at ZeRO-3.
2. The new engine's optimizer state is created where AdamW has not made it yet (it does so lazily at its first
   step) with each parameter group's saved step count (groups can differ: `Engine.reset_optimizer_state`).
3. Each trainable parameter's fp32 master and moments are written through DeepSpeed's public API
   (`safe_set_full_fp32_param`, `safe_set_full_optimizer_state`): each rank keeps the slice it owns under W'.
   The compute weights (bf16 or fp32), frozen parameters and buffers are written from the same whole tensors;
   at ZeRO-3 the compute weights are the rank's partition, and parameters DeepSpeed keeps gathered are gathered
   again (`Engine.refresh_gathered`).
4. The client state, and DeepSpeed's step counters, come from rank 0's model file, as DeepSpeed's load
   returns them.

Why not DeepSpeed's universal checkpoint (ds_to_universal.py + `checkpoint.load_universal`): it writes a
converted copy of the model and optimizer state (one file per parameter and state), needs `load_universal` set
before the engine is built (before the checkpoint is chosen), and at ZeRO-3 (0.19.8) it gives every parameter
group the hyperparameters and step count of group 0, which breaks our groups (no weight decay on biases and
norms, per-group steps after a reset).

Everything is checked before anything is written, identically on every rank, so a checkpoint that does not fit
stops every rank with the same line (SharedError) and never half-loads.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from largessl.errors import SharedError

FP32 = "fp32"  # the master weights, beside the optimizer state keys (exp_avg, exp_avg_sq)
# What DeepSpeed's own load keeps out of the client state it returns (DeepSpeedEngine._load_checkpoint).
DEEPSPEED_KEYS = ("module", "skipped_steps", "global_steps", "dp_world_size", "mp_world_size", "data_sampler",
                  "random_ltd", "lr_scheduler", "optimizer")


@dataclass
class Saved:
    """The ZeRO partitions of one checkpoint tag, as written on `world_size` ranks."""

    tag_dir: Path
    stage: int
    world_size: int
    optim: list[dict[str, Any]]  # each rank's optimizer_state_dict, memory-mapped
    model_states: list[Any]  # DeepSpeed's zero_model_state of each model file (shapes, buffers, frozen parameters)

    def base(self, rank: int) -> dict[str, Any]:
        """Rank `rank`'s AdamW state dict over its flat partitions ({state, param_groups})."""
        from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT

        sd = self.optim[rank]
        base = sd[OPTIMIZER_STATE_DICT] if self.stage == 3 else sd[BASE_OPTIMIZER_STATE]
        if isinstance(base, list):  # an 'elastic' ZeRO-1/2 checkpoint: one state dict per group
            return {"state": dict(enumerate(base)), "param_groups": [{"params": [i]} for i in range(len(base))]}
        return base

    def fp32_groups(self, rank: int) -> list[torch.Tensor]:
        from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, SINGLE_PARTITION_OF_FP32_GROUPS

        return self.optim[rank][FP32_FLAT_GROUPS if self.stage == 3 else SINGLE_PARTITION_OF_FP32_GROUPS]

    def state_indices(self) -> list[int]:
        """The optimizer-state index of each flat group. ZeRO-1/2: one flat tensor per parameter group; ZeRO-3:
        its sub-groups, which DeepSpeed creates group after group, so state order is sub-group order."""
        return [i for group in self.base(0)["param_groups"] for i in group["params"]]


# ----------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """zero_to_fp32 reports with print() and tqdm bars; a resume says one line of its own instead."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def read_saved(tag_dir: Path) -> Saved:
    """Every rank's partition files of `tag_dir` (optimizer files memory-mapped)."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARTITION_COUNT, ZERO_STAGE
    from deepspeed.utils import zero_to_fp32

    optim = [torch.load(f, map_location="cpu", mmap=True, weights_only=False)[OPTIMIZER_STATE_DICT]
             for f in zero_to_fp32.get_optim_files(str(tag_dir))]
    with _quiet():
        model_states = zero_to_fp32.parse_model_states(zero_to_fp32.get_model_state_files(str(tag_dir)))
    count = optim[0][PARTITION_COUNT]
    world_size = max(count) if isinstance(count, list) else int(count)
    if len(optim) != world_size:
        raise SharedError(f"{tag_dir} holds {len(optim)} optimizer partition files for a world size of "
                          f"{world_size}; it cannot be resumed on another number of ranks")
    return Saved(Path(tag_dir), int(optim[0][ZERO_STAGE]), world_size, optim, model_states)


def state_keys(saved: Saved) -> list[str]:
    """The per-element optimizer states (AdamW: exp_avg, exp_avg_sq); none before the first step."""
    states = saved.base(0)["state"]
    first = states.get(saved.state_indices()[0], {})
    return [key for key, value in first.items() if torch.is_tensor(value) and value.dim() == 1]


def saved_steps(saved: Saved) -> dict[int, Any]:
    """Each parameter group's AdamW step count (as the optimizer keeps it: a tensor or a number)."""
    base = saved.base(0)
    steps = {}
    for index, group in enumerate(base["param_groups"]):
        state = base["state"].get(group["params"][0], {}) if group["params"] else {}
        if "step" in state:
            steps[index] = state["step"]
    return steps


def flat_groups(saved: Saved, key: str) -> list[list[torch.Tensor]]:
    """Per rank, the flat partition of each group for `key` (FP32 or an optimizer state key), laid out as the
    fp32 partitions DeepSpeed's reconstruction expects (ZeRO-1/2 states lose the padding the fp32 groups lost)."""
    if key == FP32:
        return [saved.fp32_groups(rank) for rank in range(saved.world_size)]
    indices = saved.state_indices()
    result = []
    for rank in range(saved.world_size):
        states = saved.base(rank)["state"]
        result.append([states[index][key][:fp32.numel()] if index in states else torch.zeros_like(fp32)
                       for index, fp32 in zip(indices, saved.fp32_groups(rank), strict=True)])
    return result


def full_tensors(saved: Saved, key: str) -> dict[str, Any]:
    """{name: whole tensor} of `key` for every trainable parameter; for FP32 also buffers, and at ZeRO-3 the frozen
    parameters. At ZeRO-3 the parameters' values are DeepSpeed's lazy GatheredTensor (`.contiguous()` assembles one)."""
    from deepspeed.checkpoint.constants import PARAM_ALIGNMENT_PADDINGS
    from deepspeed.utils import zero_to_fp32

    groups, weights_only = flat_groups(saved, key), key != FP32
    with _quiet():
        if saved.stage == 3:
            return zero_to_fp32._get_fp32_state_dict_from_zero3_checkpoint(saved.world_size, groups,
                                                                           saved.model_states, weights_only)
        paddings = saved.optim[0].get(PARAM_ALIGNMENT_PADDINGS)
        return zero_to_fp32._get_fp32_state_dict_from_zero2_checkpoint(saved.world_size, groups, saved.model_states,
                                                                       weights_only, paddings)


def client_state(tag_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(rank 0's whole model file, the client state in it as DeepSpeed's load returns it)."""
    from largessl.checkpoint import model_states_file

    states = torch.load(model_states_file(tag_dir), map_location="cpu", mmap=True, weights_only=False)
    return states, {key: value for key, value in states.items() if key not in DEEPSPEED_KEYS}


# ----------------------------------------------------------------------------- checking


def persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a checkpoint holds (DeepSpeed saves the persistent ones)."""
    found = {}
    for prefix, sub in module.named_modules():
        for name, buffer in sub.named_buffers(recurse=False):
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                found[f"{prefix}.{name}" if prefix else name] = buffer
    return found


def check_fits(saved: Saved, weights: dict[str, Any], module: nn.Module) -> None:
    """Every parameter and buffer of `module` is in the checkpoint with its shape, and nothing more."""
    expected = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in module.named_parameters()}
    expected.update({name: tuple(b.shape) for name, b in persistent_buffers(module).items()})
    where = f"{saved.tag_dir} (written on {saved.world_size} rank(s))"
    missing = [name for name in expected if name not in weights]
    if missing:
        raise SharedError(f"{where} holds no '{missing[0]}' ({len(missing)} missing); it does not fit this model")
    aliases = {alias for alias, _ in saved.model_states[0].shared_params}  # tied parameters, saved under each name
    extra = [name for name in weights if name not in expected and name not in aliases]
    if extra:
        raise SharedError(f"{where} holds '{extra[0]}', which this model has not; it does not fit this model")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise SharedError(f"{where}: '{name}' is {tuple(weights[name].shape)} there and {shape} in this "
                              "model; it does not fit this model")


# ----------------------------------------------------------------------------- writing


def prepare_optimizer_state(engine: Any, keys: list[str], steps: dict[int, Any]) -> None:
    """AdamW state on every master tensor of the new engine (AdamW creates it at its first step), with each
    group's saved step; then, at ZeRO-1/2, DeepSpeed's per-parameter views into it (made at the first step too)."""
    state = engine.optimizer.state
    for group_index in range(len(engine.param_groups)):
        for master in engine.optimizer_masters(group_index):
            for key in keys:
                state[master].setdefault(key, torch.zeros_like(master))
            if group_index in steps:
                state[master]["step"] = copy.deepcopy(steps[group_index])
    if engine.zero_stage in (1, 2):
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        ds_optimizer = engine.ds.optimizer
        for lp_params, flat in zip(ds_optimizer.bit16_groups, ds_optimizer.single_partition_of_fp32_groups,
                                   strict=True):
            lazy_init_hp_params_optimizer_state(lp_params, flat, state)


def set_compute_weight(engine: Any, param: nn.Parameter, value: torch.Tensor) -> None:
    """The tensor a parameter's forward reads: whole, or at ZeRO-3 this rank's (padded) partition of it."""
    with torch.no_grad():
        if engine.zero_stage != 3:
            param.data.copy_(value.reshape(param.shape))
            return
        target = engine.compute_partition(param)
        start = dist.get_rank() * target.numel()
        part = value.reshape(-1)[start:start + target.numel()]
        target.zero_()
        target[:part.numel()].copy_(part)


def write_weights(engine: Any, weights: dict[str, Any]) -> None:
    """fp32 masters (trainable parameters), compute weights (all parameters) and persistent buffers."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, param in engine.module.named_parameters():
        value = weights[name].contiguous().float()
        if param.requires_grad:
            safe_set_full_fp32_param(param, value)
        set_compute_weight(engine, param, value)
    with torch.no_grad():
        for name, buffer in persistent_buffers(engine.module).items():
            buffer.copy_(weights[name])


def write_state(engine: Any, key: str, values: dict[str, Any]) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            safe_set_full_optimizer_state(param, values[name].contiguous().float(), key)


def restore_counters(engine: Any, states: dict[str, Any], saved: Saved) -> None:
    """DeepSpeed's step counters and (fp16) loss scaler, as its own load restores them."""
    engine.ds.global_steps = states["global_steps"]
    engine.ds.global_samples = states.get("global_samples", states["global_steps"] * engine.ds.train_batch_size())
    engine.ds.skipped_steps = states["skipped_steps"]
    for name in ("loss_scaler", "dynamic_loss_scale", "overflow"):
        if name in saved.optim[0] and hasattr(engine.ds.optimizer, name):
            setattr(engine.ds.optimizer, name, saved.optim[0][name])


def load_resharded(engine: Any, tag_dir: Path) -> dict[str, Any]:
    """Load a ZeRO-1/2/3 checkpoint written on another number of ranks into `engine` (every rank calls this);
    returns the client state."""
    saved = read_saved(tag_dir)
    if saved.stage != engine.zero_stage:
        raise SharedError(f"{tag_dir} was written at ZeRO stage {saved.stage}, this engine runs stage "
                          f"{engine.zero_stage}")
    states, client = client_state(tag_dir)
    weights = full_tensors(saved, FP32)
    if saved.stage < 3:  # ZeRO-1/2 keep frozen parameters only in the module's state dict (whole, compute dtype)
        weights = {**states["module"], **weights}
    check_fits(saved, weights, engine.module)
    keys = state_keys(saved)
    prepare_optimizer_state(engine, keys, saved_steps(saved))
    write_weights(engine, weights)
    del weights
    for key in keys:
        write_state(engine, key, full_tensors(saved, key))
    restore_counters(engine, states, saved)
    engine.refresh_gathered(list(engine.module.parameters()))
    return client


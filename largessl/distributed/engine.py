"""The DeepSpeed engine (with ops.py, for DeepSpeed's JIT-built ops, the only modules that import deepspeed).

Our config owns batch size, accumulation, precision and clipping; ds_configs/*.json own ZeRO and
communication settings only. `deepspeed_config` merges the two and refuses a JSON that repeats ours.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Callable
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from largessl import checksums
from largessl.config.loader import require
from largessl.distributed import ops
from largessl.distributed.config import DistributedConfig
from largessl.distributed.env import DistEnv, pick_device, read_env, single_process_defaults
from largessl.errors import ConfigError

# Keys our config injects; a ds_configs JSON that sets them would be a second source of truth.
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16",
              "amp", "gradient_clipping", "optimizer", "scheduler")
SOURCE_DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


def _deepspeed() -> Any:
    ops.prepare()  # the accelerator and this installation's op build directory, before deepspeed is imported
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed calls collectives torch has renamed; the warning would repeat every step.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.",
                            category=FutureWarning)
    return deepspeed


def ds_config_path(cfg: DistributedConfig) -> Path:
    if cfg.ds_config:
        path = Path(cfg.ds_config)
        require(path.is_file(), "distributed.ds_config", f"no such file '{cfg.ds_config}'")
        return path
    name = f"zero{cfg.zero_stage}{'_offload' if cfg.offload else ''}.json"
    if (SOURCE_DS_CONFIGS / name).is_file():  # a source checkout or editable install
        return SOURCE_DS_CONFIGS / name
    return Path(str(resources.files("largessl.ds_configs") / name))  # an installed wheel


def deepspeed_config(cfg: DistributedConfig, *, micro_batch: int, accumulation: int, world_size: int,
                     grad_clip: float) -> dict[str, Any]:
    """ZeRO/communication settings from the JSON plus batch, precision and clipping from our config."""
    path = ds_config_path(cfg)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"distributed.ds_config: {path} is not valid JSON ({exc})") from None
    for key in OWNED_KEYS:
        require(key not in ds, "distributed.ds_config",
                f"{path} sets '{key}', which largessl's config owns (data.*, optim.*, distributed.precision)")
    zero = ds.setdefault("zero_optimization", {})
    require(zero.get("stage", cfg.zero_stage) == cfg.zero_stage, "distributed.zero_stage",
            f"{cfg.zero_stage} but {path} sets stage {zero.get('stage')}")
    zero["stage"] = cfg.zero_stage
    ds.update({
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    })
    if accumulation > 1 and cfg.precision != "fp32":
        ds["data_types"] = {"grad_accum_dtype": "fp32"}  # bf16 accumulation would round small gradients away
    return ds


def init_distributed(cfg: DistributedConfig) -> DistEnv:
    rank, world_size, local_rank = read_env()
    if world_size == 1:
        single_process_defaults()
    device = pick_device(local_rank)
    require(cfg.precision != "fp16" or device.type == "cuda", "distributed.precision",
            "fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); use bf16 or fp32")
    backend = cfg.backend or ("nccl" if device.type == "cuda" else "gloo")
    deepspeed = _deepspeed()
    ops.ensure("comm")  # builds DeepSpeed's CPU communication op (if needed) with a line saying so
    # the watchdog (distributed.timeout_s) names a silent rank first; the backend's timeout is the backstop
    timeout = {"timeout": timedelta(seconds=cfg.timeout_s + 60)} if cfg.timeout_s else {}
    with ops.without_built_notice():
        deepspeed.init_distributed(dist_backend=backend, verbose=False, **timeout)
    return DistEnv(rank, world_size, local_rank, device)


def model_init_context(ds_config: dict[str, Any]) -> contextlib.AbstractContextManager:
    """ZeRO-3 builds the model partitioned (no rank ever holds all of it); other stages build it whole."""
    if ds_config["zero_optimization"]["stage"] == 3:
        return _deepspeed().zero.Init(config_dict_or_path=ds_config)
    return contextlib.nullcontext()


class Engine:
    """A DeepSpeed engine around an objective, with a client AdamW over our parameter groups."""

    def __init__(self, module: torch.nn.Module, param_groups: list[dict], ds_config: dict[str, Any], *,
                 betas: tuple[float, float], eps: float, device: torch.device,
                 make_optimizer: Callable[[list[dict]], torch.optim.Optimizer] | None = None) -> None:
        """`make_optimizer` builds the client optimizer from the groups (optim/build.py); default AdamW. With CPU
        offload it is DeepSpeed's CPU AdamW whatever is asked (OptimConfig is validated to be adamw there)."""
        deepspeed = _deepspeed()
        self.zero_stage = ds_config["zero_optimization"]["stage"]
        if self.zero_stage < 3:
            module.to(device)
        if "offload_optimizer" in ds_config["zero_optimization"]:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            ops.ensure("cpu_adam")
            optimizer = DeepSpeedCPUAdam(param_groups, lr=0.0, betas=betas, eps=eps, adamw_mode=True)
        elif make_optimizer is not None:
            optimizer = make_optimizer(param_groups)
        else:
            optimizer = torch.optim.AdamW(param_groups, lr=0.0, betas=betas, eps=eps)
        self.optimizer = optimizer  # its param_groups are the ones DeepSpeed steps: we set lr/wd on them
        self.device = device
        self.ds, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        hash_saves(self.ds.checkpoint_engine)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def describe(self, cfg: Any, accumulation: int, world_size: int) -> str:
        """The engine in one line, for the start-up (`cfg`: the run's PretrainConfig)."""
        return (f"DeepSpeed engine: ZeRO-{self.zero_stage}, {cfg.distributed.precision}, "
                f"{self.num_parameters() / 1e6:.1f}M parameters; {cfg.optim.global_batch_size} images per step = "
                f"{cfg.data.micro_batch_size} x {accumulation} accumulation x {world_size} rank(s)")

    def num_parameters(self) -> int:
        """Elements of the whole model, also when ZeRO-3 holds only a partition of each parameter here."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.module.parameters())

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.ds(batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self, want_norm: bool = False) -> float | None:
        """One micro-step of DeepSpeed's step(). With `want_norm`, at an accumulation boundary, returns the
        global gradient norm of this update (reading it forces a device sync, so only when it is logged)."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        want_norm = want_norm and boundary
        norm = self._stage0_grad_norm() if want_norm and self.zero_stage == 0 else None
        self.ds.step()
        if not want_norm:
            return None
        reported = self.last_grad_norm()
        return float(reported) if reported is not None else norm

    def last_grad_norm(self) -> torch.Tensor | float | None:
        """The gradient norm DeepSpeed computed in the last step, as it keeps it: a device tensor (reading it would
        sync), inf after a step it skipped for overflow, or None where it computes none (ZeRO-0)."""
        return self.ds.get_global_grad_norm()

    @torch.no_grad()
    def local_weights_finite(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """Whether this rank's fp32 master weights of `params` are all finite (a device bool; no sync)."""
        try:
            pieces = [piece for _, piece in filter(None, self.master_pieces(params))]
        except ConfigError:  # ZeRO-0's fused fp16 optimizer keeps no per-parameter masters: its copies tell as well
            pieces = [p.detach().view(-1) for p in params]
        flags = [torch.isfinite(piece).all().to(self.device) for piece in pieces if piece.numel()]  # offload: CPU
        return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=self.device)

    def _stage0_grad_norm(self) -> float | None:
        # Without ZeRO, fp32 DeepSpeed steps a plain torch optimizer and reports no norm; grads are reduced here.
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else None

    def loss_scale(self) -> float:
        scale = getattr(self.ds.optimizer, "cur_scale", None) or getattr(self.ds.optimizer, "loss_scale", None)
        return float(scale) if scale else 1.0

    def reset_optimizer_state(self, group_index: int) -> None:
        """Zero the AdamW state (step count and moments) of one parameter group, as if it had never stepped.

        DeepSpeed steps our AdamW over its own fp32 master tensors (flat partitions at ZeRO-1/2/3), so the
        state to reset is keyed by those, not by the module's parameters."""
        for master in self.optimizer_masters(group_index):
            for key, value in self.optimizer.state.get(master, {}).items():
                if torch.is_tensor(value):
                    value.zero_()
                else:  # DeepSpeedCPUAdam keeps the step as a Python number
                    self.optimizer.state[master][key] = type(value)(0)

    def optimizer_masters(self, group_index: int) -> list[torch.Tensor]:
        """The tensors our AdamW steps for one parameter group, which its state is keyed by: the parameters
        (ZeRO-0), the group's flat fp32 partition (ZeRO-1/2), or its sub-groups' flat partitions (ZeRO-3)."""
        ds_optimizer = self.ds.optimizer
        if self.zero_stage == 3:
            return [ds_optimizer.fp32_partitioned_groups_flat[sub]
                    for sub, group in ds_optimizer.sub_group_to_group_id.items() if group == group_index]
        return list(self.optimizer.param_groups[group_index]["params"])

    # ----------------------------------------------------------------- fp32 masters, for EMA teachers

    @property
    def master_layout(self) -> str:
        """How the fp32 master weights are spread over ranks (see distributed/ema.py).

        'replicated': every rank holds all of them (ZeRO-0); 'fragments': each rank holds disjoint slices of
        the flattened parameters (ZeRO-1/2); 'partitioned': rank r holds partition r of every parameter (ZeRO-3).
        """
        return {0: "replicated", 3: "partitioned"}.get(self.zero_stage, "fragments")

    def master_pieces(self, params: list[torch.nn.Parameter]) -> list[tuple[int, torch.Tensor] | None]:
        """For each trainable parameter: (start within the flattened parameter, this rank's fp32 master
        elements from there, as a flat tensor), or None where this rank holds none of it. At ZeRO-3 the
        piece is this rank's partition, padding included."""
        if self.zero_stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param

            rank = torch.distributed.get_rank()
            return [(rank * p.ds_tensor.ds_numel, safe_get_local_fp32_param(p).view(-1)) for p in params]
        if self.zero_stage > 0:
            pieces = []
            for p in params:
                fragment = p._hp_mapping
                pieces.append(None if fragment is None else
                              (fragment.lp_fragment_address.start, fragment.hp_fragment.view(-1)))
            return pieces
        masters = self._stage0_masters()
        return [(0, masters.get(id(p), p).detach().view(-1)) for p in params]

    def _stage0_masters(self) -> dict[int, torch.Tensor]:
        """ZeRO-0 in bf16 keeps a whole fp32 copy of each parameter beside it (DeepSpeed's unfused fp16/bf16
        optimizer); in fp32 the parameters are their own masters."""
        ds_optimizer = self.ds.optimizer
        if not hasattr(ds_optimizer, "fp16_groups"):
            return {}
        if not hasattr(ds_optimizer, "fp32_groups"):
            raise ConfigError("an EMA teacher at ZeRO-0 with bf16/fp16 needs DeepSpeed's unfused optimizer wrapper; "
                              "use distributed.zero_stage=1 or 2")
        return {id(lp): hp for lps, hps in zip(ds_optimizer.fp16_groups, ds_optimizer.fp32_groups, strict=True)
                for lp, hp in zip(lps, hps, strict=True)}

    def compute_partition(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The flat tensor a frozen parameter's forward reads from: the whole parameter, or at ZeRO-3 this rank's
        partition (DeepSpeed gathers partitions for the forward)."""
        return param.ds_tensor.view(-1) if self.zero_stage == 3 else param.data.view(-1)

    def refresh_gathered(self, params: list[torch.nn.Parameter]) -> None:
        """After writing ZeRO-3 partitions directly: release any full copies DeepSpeed still holds (small
        'persistent' parameters, kept whole on every rank) and gather the persistent ones again, as
        DeepSpeed does for the student after its step."""
        if self.zero_stage != 3:
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        stale = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
        if stale:
            stale[0].partition(stale)
        persistent = [p for p in params if getattr(p, "ds_persist", False)]
        if persistent:
            persistent[0].all_gather(persistent)

    def save(self, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Every rank must call this (each writes its own ZeRO partition)."""
        # `latest` is ours to write, once the tag is complete (checkpoint.mark_complete)
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)

    def load(self, ckpt_dir: Path, tag: str | None = None, *,
             saved_world_size: int | None = None) -> dict[str, Any] | None:
        """Restore weights, optimizer and scheduler state; returns our client state (None without a checkpoint).

        A ZeRO-1/2/3 checkpoint written on `saved_world_size` ranks, another number than now, is loaded by
        distributed/reshape.py (DeepSpeed's own load refuses it); ZeRO-0 state is whole and loads as it is."""
        if tag is not None and self.needs_reshape(saved_world_size):
            from largessl.distributed import reshape

            return reshape.load_resharded(self, Path(ckpt_dir) / tag)
        path, client_state = self.ds.load_checkpoint(str(ckpt_dir), tag=tag)
        return client_state if path is not None else None

    @staticmethod
    def ranks_written(tag_dir: Path) -> int | None:
        """How many ranks wrote a ZeRO-1/2/3 checkpoint (one optimizer partition file each); None at ZeRO-0."""
        return len(list(Path(tag_dir).glob("*_optim_states.pt"))) or None

    def needs_reshape(self, saved_world_size: int | None) -> bool:
        """Whether a checkpoint written on `saved_world_size` ranks (None: unknown, taken as now) has ZeRO
        partitions to redistribute over this run's ranks."""
        return self.zero_stage > 0 and saved_world_size is not None and saved_world_size != self.ds.dp_world_size


def read_checkpoint(tag_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(full fp32 weights on CPU, client state) of a checkpoint tag directory, for any ZeRO stage, without a
    process group (evaluation, export)."""
    tag_dir = Path(tag_dir)
    from largessl.checkpoint import model_states_file

    states = torch.load(model_states_file(tag_dir), map_location="cpu", weights_only=False)
    stage = int((states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
    if stage == 0:  # weights are whole in the model file (in the training dtype)
        return {k: v.float() for k, v in states["module"].items()}, states
    _deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name), states


@torch.no_grad()
def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> int:
    """Copy whole fp32 `weights` (parameter name -> tensor) into `module` before DeepSpeed takes it, so its fp32
    masters start from them (a resumed run's checkpoint replaces them right after); at ZeRO-3 (parameters built
    partitioned by zero.Init) each is gathered, written by every rank alike and partitioned again. Returns how many
    tensors were loaded; raises ConfigError when a name is not the module's or a shape differs."""
    params = dict(module.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ConfigError(f"initial weights name parameters this model does not have: {', '.join(unknown[:3])}")
    for name, value in weights.items():
        param = params[name]
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if tuple(value.shape) != shape:
            raise ConfigError(f"initial weights: {name} has shape {tuple(value.shape)}, the model's is {shape}")
        if hasattr(param, "ds_id"):
            with _deepspeed().zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(value)
        else:
            param.data.copy_(value)
    return len(weights)


def hash_saves(checkpoint_engine: Any) -> None:
    """Every file DeepSpeed's checkpoint engine writes is hashed while it is written (checksums.hash_while_writing:
    its torch.save writes each file from its start, in order)."""
    write = checkpoint_engine.save

    def save(state_dict: Any, path: str) -> None:
        checksums.hash_while_writing(Path(path), lambda: write(state_dict, path))

    checkpoint_engine.save = save

"""Run (alone or under torchrun): train a tiny DINO through largessl's DeepSpeed engine for a few steps with an
EMA teacher, and alongside it a reference EMA computed in fp32 from the gathered full fp32 master weights.
Rank 0 writes what it measured as JSON to ARGV[4]. Used by test_ema.py.

ARGV: zero stage, precision, comma-separated momentum per step, output JSON path[, objective: dino (default) or
sim, whose target branch (momentum encoder + batch-norm projector) is the teacher].
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from largessl.distributed import comm
from largessl.distributed.config import DistributedConfig
from largessl.distributed.ema import EMATeacher, read_teacher_fp32
from largessl.distributed.engine import Engine, deepspeed_config, init_distributed, model_init_context
from largessl.models.config import ModelConfig
from largessl.objectives.config import SIMConfig
from largessl.objectives.dino import DINO, DINOConfig
from largessl.objectives.sim import SIM
from largessl.optim.config import OptimConfig
from largessl.optim.param_groups import build_param_groups

stage, precision, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[4]
momenta = [float(m) for m in sys.argv[3].split(",")]
method = sys.argv[5] if len(sys.argv) > 5 else "dino"
cfg = DistributedConfig(zero_stage=stage, precision=precision)
env = init_distributed(cfg)
ds_config = deepspeed_config(cfg, micro_batch=4, accumulation=1, world_size=env.world_size, grad_clip=0.0)
model_cfg = ModelConfig(name="vit_tiny_patch16", image_size=32)
if method == "dino":
    method_cfg = DINOConfig(out_dim=300, hidden_dim=64, bottleneck_dim=32, local_crops=2, local_crop_size=16)
else:  # 2 x 2 patches, 2 masked; a 64-wide projector and predictor of one batch-norm block each
    method_cfg = SIMConfig(num_masked=2, min_block_patches=1, decoder_dim=64, decoder_heads=4, projector_depth=1,
                           predictor_depth=1)
Method = DINO if method == "dino" else SIM
torch.manual_seed(0)
with model_init_context(ds_config):
    objective = Method(method_cfg, model_cfg)
engine = Engine(objective, build_param_groups(objective, OptimConfig(weight_decay=0.04)), ds_config,
                betas=(0.9, 0.999), eps=1e-8, device=env.device)
for group in engine.param_groups:
    group["lr"] = 1e-3
params = dict(objective.named_parameters())
pairs = [(t, params[t], params[s]) for t, s in objective.teacher_pairs()]
teacher = EMATeacher(engine, pairs)
teacher.initialize()


def full_master(param: torch.nn.Parameter) -> torch.Tensor:
    """The whole fp32 master of a student parameter, gathered from every rank (the reference's input)."""
    if stage == 0:
        start, piece = engine.master_pieces([param])[0]
        return piece.detach().clone().view(param.shape).cpu()
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param).detach().clone().cpu()


def full_teacher_state() -> dict[str, torch.Tensor]:
    """The EMA's fp32 teacher as whole tensors (partitions gathered at ZeRO-3)."""
    out = {}
    for name, view, numel, shape in zip(teacher.names, teacher.views, teacher.numels, teacher.shapes, strict=True):
        flat = comm.all_gather_cat(view.contiguous()) if teacher.layout == "partitioned" else view
        out[name] = flat[:numel].reshape(shape).cpu().clone()
    return out


def full_compute_copy() -> dict[str, torch.Tensor]:
    """What the teacher's forward reads (gathered at ZeRO-3)."""
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([t for _, t, _ in pairs]):
            return {name: t.detach().clone().cpu() for name, t, _ in pairs}
    return {name: t.detach().clone().cpu() for name, t, _ in pairs}


def gathered_patch_embed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The (frozen) patch embedding's weights, whole."""
    params = list(model.encoder.patch_embed.parameters())
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().clone() for k, v in model.encoder.patch_embed.state_dict().items()}
    return {k: v.detach().clone() for k, v in model.encoder.patch_embed.state_dict().items()}


reference = {name: full_master(s) for name, _, s in pairs}  # teacher = student at the start
initial = {k: v.clone() for k, v in reference.items()}
naive = {k: v.to(torch.bfloat16) for k, v in reference.items()}  # what a bf16 EMA would hold
generator = torch.Generator().manual_seed(1234 + env.rank)
dtype = objective.compute_dtype()


def random_batch() -> dict[str, torch.Tensor]:
    if method == "dino":
        return {"globals": torch.randn(4, 2, 3, 32, 32, generator=generator),
                "locals": torch.randn(4, 2, 3, 16, 16, generator=generator)}
    mask = torch.stack([torch.randperm(4, generator=generator) < 2 for _ in range(4)])
    geometry = torch.tensor([[0.1, -0.2, 1.3, 0.8, 1.0, 0.9]] * 4, dtype=torch.float64)
    return {"view1": torch.randn(4, 3, 32, 32, generator=generator),
            "view2": torch.randn(4, 3, 32, 32, generator=generator), "mask": mask, "geometry": geometry}


def teacher_forward(model: torch.nn.Module, probe: torch.Tensor) -> torch.Tensor:
    """What the teacher computes from images (DINO: logits of the teacher; SIM: the target branch's tokens)."""
    with torch.no_grad():
        return (model.teacher([probe]) if method == "dino" else model.targets(probe)).float().cpu()


for momentum in momenta:
    batch = random_batch()
    objective.begin_step(0, len(momenta))
    out = engine(batch)
    engine.backward(out["loss"])
    engine.step()
    objective.after_optimizer_step(1)
    teacher.update(momentum)
    for name, _, student in pairs:
        s = full_master(student)
        reference[name].mul_(momentum).add_(s * (1.0 - momentum))
        naive[name] = naive[name] * momentum + s.to(torch.bfloat16) * (1.0 - momentum)

state = full_teacher_state()
compute = full_compute_copy()
compute_dtype = next(iter(compute.values())).dtype
report = {
    "world_size": env.world_size,
    "layout": teacher.layout,
    "teacher_local_numel": teacher.flat.numel(),
    "teacher_total_numel": sum(teacher.numels),
    "max_abs_diff": max(float((state[n] - reference[n]).abs().max()) for n in reference),
    "compute_copy_equal": all(torch.equal(compute[n].float(), reference[n].to(compute_dtype).float())
                              for n in reference),
    "moved_fraction": sum(int((reference[n] != initial[n]).sum()) for n in reference) / sum(
        v.numel() for v in reference.values()),
    "naive_bf16_stuck_fraction": sum(int((naive[n] == initial[n].to(torch.bfloat16)).sum()) for n in reference) / sum(
        v.numel() for v in reference.values()),
}

# The teacher's forward sees the new weights (no stale gathered copies), whichever stage.
probe = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7)).to(dtype)
seen = teacher_forward(objective, probe)
plain = Method(method_cfg, model_cfg)
plain.load_state_dict({n: v for n, v in reference.items()}, strict=False)
plain.to(compute_dtype)
if method == "sim":  # the target reads the online patch embedding (frozen, so the student's own compute copy)
    plain.encoder.patch_embed.load_state_dict(
        {k: v.cpu() for k, v in gathered_patch_embed(objective).items()})
expected = teacher_forward(plain, probe.cpu().to(compute_dtype))
report["forward_max_abs_diff"] = float((seen - expected).abs().max())

# Checkpoint round trip: save, overwrite, load; and read the whole teacher back without a process group.
shared = Path(tempfile.gettempdir()) / f"ema-ref-{os.environ.get('MASTER_PORT', 'single')}"
shared.mkdir(exist_ok=True)
comm.barrier()
teacher.save(shared)
comm.barrier()
saved_flat = teacher.flat.clone()
teacher.flat.add_(1.0)
teacher.load(shared)
report["reload_equal"] = bool(torch.equal(teacher.flat, saved_flat))
read_back = read_teacher_fp32(shared)
report["read_back_max_abs_diff"] = max(float((read_back[n] - reference[n]).abs().max()) for n in reference)
if env.is_main:
    Path(out_path).write_text(json.dumps(report, indent=2))

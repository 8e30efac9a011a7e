"""`largessl eval knn`: k-NN accuracy of a checkpoint's encoder, in one process (CPU or one GPU)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch

from largessl.checkpoint import reading
from largessl.data.build import build_eval_loader
from largessl.data.index import SplitIndex, open_split
from largessl.data.transforms import EvalTransform
from largessl.distributed.ema import read_teacher_fp32
from largessl.errors import UserError
from largessl.eval.config import knn_metric
from largessl.eval.knn import discordant, extract_features, knn_correct, mcnemar_exact
from largessl.eval.labels import relabelled
from largessl.eval.source import load_encoder as load_exported
from largessl.eval.source import open_pretrained
from largessl.objectives import objective_class


def load_encoder(run_dir: Path, step: int | None = None, *,
                 arg: str = "--checkpoint") -> tuple[torch.nn.Module, object, dict, Path]:
    """(eval encoder with the checkpoint's fp32 weights, run config, client state, tag directory) of a run's newest
    complete checkpoint, or of its checkpoint at `step`; from any ZeRO stage, without a process group. `run_dir`
    may be an export instead (eval/source.py): then the file stands for the tag directory."""
    pretrained = open_pretrained(run_dir, step, arg)
    if pretrained.exported:
        return load_exported(pretrained), pretrained.config, pretrained.states(), pretrained.checkpoint
    tag_dir, cfg = pretrained.checkpoint, pretrained.config
    from largessl.distributed.engine import read_checkpoint

    objective = objective_class(cfg.objective.name)(cfg.objective, cfg.model)
    with reading(tag_dir, arg):  # checked against its digests already (checkpoint_of); a tag without them may fail
        weights, states = read_checkpoint(tag_dir)
        if objective.teacher_pairs():  # the teacher's exact fp32 EMA, not DeepSpeed's compute-dtype copy
            weights.update(read_teacher_fp32(tag_dir))
    missing, unexpected = objective.load_state_dict(weights, strict=False)
    encoder = objective.eval_encoder()
    prefix = next(name for name, module in objective.named_modules() if module is encoder)
    if any(key.startswith(prefix + ".") for key in missing) or unexpected:
        raise UserError(f"{arg}: {tag_dir} does not match the run's config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return encoder, cfg, states, tag_dir


def checkpoint_features(checkpoint: Path, train: str, val: str, *, train_split: str, val_split: str,
                        batch_size: int, num_workers: int, pool: str = "cls",
                        step: int | None = None) -> tuple[list, object, dict, Path]:
    """([train (features, labels), val (features, labels)], run config, client state, tag directory) from
    the eval encoder of a run's newest complete checkpoint (or the one of `step`)."""
    encoder, cfg, states, tag_dir = load_encoder(checkpoint, step)
    indices = open_splits(train, train_split, val, val_split)
    return pooled_features(encoder, split_loaders(cfg, indices, batch_size, num_workers), pool), cfg, states, tag_dir


def open_splits(train: str, train_split: str, val: str, val_split: str) -> list[SplitIndex]:
    return [open_split(train, train_split, "--train"), open_split(val, val_split, "--val")]


def split_loaders(cfg: object, indices: list[SplitIndex], batch_size: int, num_workers: int) -> list:
    """The train and val splits' evaluation loaders at the run's image size, val labels mapped onto train's."""
    transform = EvalTransform(cfg.model.image_size)
    loaders = [build_eval_loader(index, transform, batch_size=batch_size, rank=0, world_size=1,
                                 num_workers=num_workers, image_size=cfg.model.image_size) for index in indices]
    loaders[1] = relabelled(loaders[1], *indices, ("--train", "--val"))
    return loaders


def initial_encoder(cfg: object) -> torch.nn.Module:
    """The eval encoder of the run's model at a random initialisation drawn as the trainer draws it (seeded with
    trainer.seed): the baseline a trained encoder's k-NN is compared with."""
    from largessl import rng

    rng.seed_everything(cfg.trainer.seed)
    return objective_class(cfg.objective.name)(cfg.objective, cfg.model).eval_encoder()


def pooled_features(encoder: torch.nn.Module, loaders: list, pool: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(features, labels) of each loader's images through the frozen encoder, on the GPU in bf16 where there is
    one (fp32 features either way)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder.to(device).eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return [extract_features(partial(encoder.forward_pooled, pool=pool), loader, device=device,
                                 dtype=torch.float32) for loader in loaders]


def run_knn(checkpoint: Path, train: str, val: str, *, train_split: str, val_split: str, k: int,
            temperature: float, batch_size: int, num_workers: int, pool: str = "cls", step: int | None = None,
            tracking_uri: str = "", baseline: bool = False) -> dict:
    encoder, cfg, states, tag_dir = load_encoder(checkpoint, step)
    indices = open_splits(train, train_split, val, val_split)
    features = pooled_features(encoder, split_loaders(cfg, indices, batch_size, num_workers), pool)
    correct = knn_correct(features[0], features[1], k=k, temperature=temperature)
    pretrained = open_pretrained(checkpoint, step)
    step, metric = int(states.get("step", 0)), knn_metric(pool)
    result = {"knn_top1": float(correct.float().mean()), "metric": metric, "pool": pool, "step": step,
              "checkpoint": str(tag_dir), "train": train, "val": val, "num_train": len(features[0][1]),
              "num_val": len(features[1][1]), "k": k, "temperature": temperature,
              "chance": 1 / max(1, len(indices[0].classes))}
    if baseline:
        initial = pooled_features(initial_encoder(cfg), split_loaders(cfg, indices, batch_size, num_workers), pool)
        result.update(compared_with_init(correct, knn_correct(initial[0], initial[1], k=k, temperature=temperature)))
    out = pretrained.eval_dir / f"{metric.replace('_top1', '')}_step{step:08d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    result["mlflow_run_id"] = pretrained.log_to_run({metric: result["knn_top1"]}, tracking_uri)
    return result


def compared_with_init(trained: torch.Tensor, initial: torch.Tensor) -> dict:
    """The baseline's top-1 and the paired comparison on the same queries (exact McNemar)."""
    only_trained, only_initial = discordant(trained, initial)
    return {"baseline_top1": float(initial.float().mean()), "only_trained": only_trained,
            "only_baseline": only_initial, "mcnemar_p": mcnemar_exact(only_trained, only_initial)}

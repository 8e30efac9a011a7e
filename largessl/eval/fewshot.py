"""`largessl eval fewshot`: SIM's low-shot protocol (methods.md 5.5; SIM main_logistic.py, after MSN's).

1. A deterministic subset of the train split: from each class, round(percent / 100 x its count) samples (at least
   one), the ones whose keys rank first under a seeded hash; the same subset on every machine and every run. Or
   the images a file names (--subset: SIM's imagenet_subset1/1percent.txt, matched to the shards' source file
   names; an image it names that the split lacks is an error, not a smaller subset).
2. Frozen features of the subset and of the whole val split, through the eval transform (Resize 256/224, centre
   crop): the eval encoder's [cls] (SIM's encoder has no final norm, so its raw last-block [cls], as SIM's script) or
   the mean patch output (`--pool mean`). Cached in RUN_DIR/eval/fewshot_features_*.pt, so a killed job refits only.
3. Each feature row centred (its own mean subtracted) and L2-normalised (cyanure's preprocess with centering,
   normalize, columns=False).
4. A multinomial logistic regression without intercept, minimising (1/n) sum CE(W x_i, y_i) + (lambda / n) / 2
   ||W||^2 (SIM divides its lambda by n, then cyanure's L2 penalty is lambda/2 ||W||^2), fitted to convergence in
   float64 with L-BFGS (the reference: cyanure's solver, tol 1e-3, 300 epochs at most). It is convex, so any
   solver that converges finds the same classifier.
5. Top-1 on the val features.

The protocol caches features because its reference does (no augmentation, one fit); it runs in one process (CPU or
one GPU), as `eval knn`. Its result goes onto the pretraining run's MLflow run and into the JSON.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from largessl.data.index import SplitIndex
from largessl.data.loader import label_of
from largessl.data.stream import derive_seed, read_range
from largessl.errors import DataError

SUBSET_SEED = 1  # a fixed seed: the subset is part of the protocol's definition


def fewshot_subset(index: SplitIndex, percent: float, seed: int = SUBSET_SEED,
                   names: frozenset[str] | None = None) -> list[int]:
    """Positions (in index order) of the subset: per class round(percent% of its samples), at least one; or, with
    `names`, the samples whose source file is named there (SIM's imagenet_subset1/1percent.txt), every one found."""
    by_class: dict[int, list[tuple[int, int]]] = defaultdict(list)
    found: dict[str, int] = {}
    for position, sample in enumerate(read_range(list(index.shards), 0, index.num_samples)):
        by_class[label_of(sample)].append((derive_seed(seed, sample["__key__"]), position))
        if names is not None and (name := source_name(sample)) in names:
            found[name] = position
    if -1 in by_class:
        raise DataError(f"--train: few-shot needs labelled samples (.cls in the shards); {index.root} has some without")
    if names is not None:
        missing = sorted(names - found.keys())
        if missing:
            raise DataError(f"--subset: {len(missing)} of its {len(names)} images are not in {index.root} "
                            f"(first: {', '.join(missing[:3])})")
        return sorted(found.values())
    chosen = []
    for members in by_class.values():
        count = max(1, round(len(members) * percent / 100))
        chosen += [position for _, position in sorted(members)[:count]]
    return sorted(chosen)


def source_name(sample: dict) -> str:
    """The file name the sample was converted from (KEY.json's `source`, docs/shard-format.md), else its key."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    return Path(meta.get("source") or sample["__key__"]).name


def read_subset_file(path: Path) -> frozenset[str]:
    """Image file names, one per line (blank lines skipped); a path's directories are dropped."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--subset: cannot read {path} ({exc})") from None
    names = frozenset(Path(line.strip()).name for line in lines if line.strip())
    if not names:
        raise DataError(f"--subset: {path} lists no images")
    return names


def subset_tag(path: Path, names: frozenset[str]) -> str:
    """The subset file's name in the feature cache: its stem and a digest of the names it lists."""
    digest = hashlib.sha1("\n".join(sorted(names)).encode()).hexdigest()[:10]
    return f"{path.stem}-{digest}"


def preprocess(features: torch.Tensor) -> torch.Tensor:
    """Each row centred and L2-normalised (float64)."""
    x = features.double()
    return F.normalize(x - x.mean(dim=1, keepdim=True), dim=1)


def objective_value(weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor, penalty: float) -> torch.Tensor:
    """(1/n) sum CE(W x_i, y_i) + penalty / 2 ||W||^2."""
    return F.cross_entropy(x @ weights.T, y) + 0.5 * penalty * weights.pow(2).sum()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, lambd: float, *, max_iter: int = 500,
                 tolerance: float = 1e-9) -> tuple[torch.Tensor, int]:
    """(W [C, D], iterations) minimising objective_value with penalty lambd / n, by L-BFGS in float64."""
    penalty = lambd / x.shape[0]
    weights = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS([weights], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance,
                               tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        solver.zero_grad()
        value = objective_value(weights, x, y, penalty)
        value.backward()
        return value

    solver.step(closure)
    return weights.detach(), int(solver.state[weights]["n_iter"])


def subset_loader(index: SplitIndex, positions: list[int], transform: object, batch_size: int) -> list[dict]:
    """Batches of the subset's samples (decoded here; the rest of the split is read past), in position order."""
    from PIL import Image

    from largessl.data.loader import collate, decode_image

    wanted, batch, batches = set(positions), [], []
    for position, sample in enumerate(read_range(list(index.shards), 0, index.num_samples)):
        if position not in wanted:
            continue
        image = decode_image(sample)
        item = transform(image if image is not None else Image.new("RGB", (224, 224)))
        item["label"], item["valid"] = torch.tensor(label_of(sample)), torch.tensor(image is not None)
        batch.append(item)
        if len(batch) == batch_size:
            batches.append(collate(batch))
            batch = []
    if batch:
        batches.append(collate(batch))
    return batches


def splits_key(train: SplitIndex, val: SplitIndex) -> str:
    """12 hex digits that change with either split (its directory, split, shards, counts or classes): the feature
    cache of one pair of splits is never read for another."""
    described = [[index.root, index.split, [[s.path, s.num_samples] for s in index.shards], list(index.classes)]
                 for index in (train, val)]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:12]


def run_fewshot(checkpoint: Path, step: int | None, train: SplitIndex, val: SplitIndex, *, percent: float,
                lambd: float, pool: str, batch_size: int, num_workers: int,
                names: frozenset[str] | None = None, subset_tag: str = "", tracking_uri: str = "") -> dict:
    """Features (cached), the fit and the result dict; writes RUN_DIR/eval/fewshot_stepNNNNNNNN.json. `names`: the
    subset as a list of files (--subset, named `subset_tag` in the cache) instead of `percent` per class."""
    from largessl.eval.source import open_pretrained
    from largessl.eval.standalone import load_encoder

    encoder, cfg, states, tag_dir = load_encoder(checkpoint, step)
    step = int(states.get("step", 0))
    pretrained = open_pretrained(checkpoint, step)
    out_dir = pretrained.eval_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / (f"fewshot_features_step{step:08d}_{pool}_{subset_tag or f'{percent:g}pct'}_"
                       f"{splits_key(train, val)}.pt")
    if cache.is_file():
        feats = torch.load(cache, weights_only=True)
    else:
        positions = fewshot_subset(train, percent, names=names)
        feats = frozen_features(encoder, cfg.model.image_size, train, positions, val, pool=pool,
                                batch_size=batch_size, num_workers=num_workers)
        torch.save(feats, cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").replace(cache)
    num_classes = int(max(feats["train_labels"].max(), feats["val_labels"].max())) + 1
    weights, iterations = fit_logistic(preprocess(feats["train"]), feats["train_labels"], num_classes, lambd)
    predicted = (preprocess(feats["val"]) @ weights.T).argmax(dim=1)
    top1 = float((predicted == feats["val_labels"]).double().mean())
    result = {"fewshot_top1": top1, "metric": "fewshot_top1", "protocol": "fewshot", "step": step,
              "checkpoint": str(tag_dir), "percent": None if names else percent, "subset": subset_tag or None,
              "lambd": lambd, "pool": pool,
              "num_train": len(feats["train_labels"]), "num_val": len(feats["val_labels"]),
              "lbfgs_iterations": iterations, "train": train.root, "val": val.root}
    (out_dir / f"fewshot_step{step:08d}.json").write_text(json.dumps(result, indent=2) + "\n")
    result["mlflow_run_id"] = pretrained.log_to_run({"fewshot_top1": top1}, tracking_uri)
    return result



def frozen_features(encoder: torch.nn.Module, image_size: int, train: SplitIndex, positions: list[int],
                    val: SplitIndex, *, pool: str, batch_size: int, num_workers: int) -> dict[str, torch.Tensor]:
    """The pooled eval-view features and labels of the subset's samples and of the whole val split."""
    from largessl.data.build import build_eval_loader
    from largessl.data.transforms import EvalTransform
    from largessl.eval.labels import relabelled
    from largessl.eval.standalone import pooled_features

    transform = EvalTransform(image_size)
    queries = build_eval_loader(val, transform, batch_size=batch_size, rank=0, world_size=1, num_workers=num_workers,
                                image_size=image_size)
    subset, queries = pooled_features(encoder, [subset_loader(train, positions, transform, batch_size),
                                                relabelled(queries, train, val, ("--train", "--val"))], pool)
    return {"train": subset[0], "train_labels": subset[1], "val": queries[0], "val_labels": queries[1]}

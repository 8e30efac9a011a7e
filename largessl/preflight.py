"""What a command checks before it imports torch, DeepSpeed or timm, so a wrong path or setting is reported in
well under two seconds instead of after start-up: the config (already validated when loaded), the datasets the
run reads (each directory, its dataset.json, the split and its shard files) and the batch arithmetic for this
job's world size. The trainer checks the same again when it opens them; this only makes the failure early.
A dataset at an http(s) URL is checked with its dataset.json and a HEAD request per shard; one read by a pipe:
command with its dataset.json only (data/remote.py): no shard is downloaded here.

Only global rank 0 checks the datasets (the others would find the same on a shared filesystem, and print the
same line N times); if it stops, the launcher ends the other ranks.
"""

from __future__ import annotations

import os
from pathlib import Path

from largessl.config.schema import PretrainConfig
from largessl.data.index import SplitIndex, open_split
from largessl.distributed.env import read_env
from largessl.epochs import resolve
from largessl.errors import ConfigError

NEEDS = {"data.train": "is required: a shard dataset directory, http(s) URL or pipe: command (docs/shard-format.md; "
                       "python -m data_tools writes one)",
         "eval.knn_train": "needs a dataset for eval.knn_every: set data.train (or eval.knn_train)",
         "eval.knn_val": "needs a dataset for eval.knn_every: set data.val (or eval.knn_val)",
         "data.val": "is required by an evaluation protocol (its top-1): a labelled shard dataset (directory, URL or "
                     "pipe: command)"}


def check_pretrain(cfg: PretrainConfig) -> None:
    """The batch divides over this job's ranks, and (on rank 0) every dataset the run reads is there."""
    rank, world_size, _ = read_env()
    cfg.accumulation_steps(world_size)
    if rank == 0:
        found = {key: check_dataset(key, root, split) for key, (root, split) in cfg.datasets().items()}
        resolve(cfg, found["data.train"].num_samples)  # a schedule in epochs needs at least one step per epoch
        cfg.data.check_fill(found["data.train"].num_samples, world_size, cfg.optim.global_batch_size)
        for pair in (("eval.knn_train", "eval.knn_val"), ("data.train", "data.val")):
            if all(key in found for key in pair):
                check_labels(found, pair)
        for key, path in getattr(cfg.objective, "input_files", dict)().items():
            check_file(key, path)
        check_init_from(cfg)


def check_init_from(cfg: PretrainConfig) -> None:
    """model.init_from names a file or directory, unless the run resumes from its own checkpoint: the file is not
    read then, and a requeued job must not need it."""
    from largessl.checkpoint import newest_complete

    source = cfg.model.init_from
    if not source or Path(source).expanduser().exists():
        return
    if not newest_complete(Path(cfg.run.output_dir) / cfg.run.name / "checkpoints"):
        raise ConfigError(f"model.init_from: {source} does not exist")


def check_labels(found: dict[str, SplitIndex], pair: tuple[str, str]) -> None:
    """The two splits of an evaluation mean the same classes by the same labels (eval/labels.py); a mapping by
    class name is said."""
    from largessl.eval.labels import check

    note = check(found[pair[0]], found[pair[1]], pair)
    if note:
        print(note, flush=True)


def check_file(key: str, path: str) -> None:
    """`path` is a readable file; the error names `key`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}: no file '{path}'")
    if not os.access(file, os.R_OK):
        raise ConfigError(f"{key}: '{path}' cannot be read (permission denied)")


def check_dataset(key: str, root: str, split: str) -> SplitIndex:
    """`root` names a dataset (directory, URL or pipe: command) with `split` and all its shards; the error names
    `key`."""
    if not root:
        raise ConfigError(f"{key}: {NEEDS.get(key, 'is required: a shard dataset directory')}")
    return open_split(root, split, key)


def check_eval_knn(checkpoint: Path, datasets: dict[str, tuple[str, str]], step: int | None = None) -> None:
    """`checkpoint` is a run directory (config.yaml) with a checkpoint (of `step`), or an export, and the datasets
    are there."""
    from largessl.eval.source import open_pretrained

    open_pretrained(checkpoint, step)
    found = {key: check_dataset(key, root, split) for key, (root, split) in datasets.items()}
    check_labels(found, ("--train", "--val"))

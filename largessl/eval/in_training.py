"""What a training job measures while it trains: the k-NN top-1 of a pretraining run's encoder every
eval.knn_every steps (methods.md 1.8), and an evaluation protocol's top-1 on data.val every eval.every steps and at
the end. All ranks compute each one together (ZeRO-3 safe); rank 0 says and logs it.

The trainer asks `due(step)` after each step and calls `run(step)` when it is (its step timer paused meanwhile).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from largessl.config.schema import PretrainConfig
from largessl.data.build import build_eval_loader
from largessl.data.index import SplitIndex, open_split
from largessl.data.transforms import EvalTransform
from largessl.distributed.env import DistEnv
from largessl.eval.config import knn_metric
from largessl.eval.knn import extract_features, knn_top1
from largessl.eval.labels import relabelled
from largessl.eval.top1 import top1_accuracy


class InTrainingEval:
    """The evaluations of one training job; `log(metrics, step)` records them, `note(line)` says them."""

    def __init__(self, cfg: PretrainConfig, module: Any, env: DistEnv, log: Callable[[dict[str, float], int], None],
                 note: Callable[[str], None]) -> None:
        self.cfg, self.module, self.env = cfg, module, env
        self.log, self.note = log, note
        self.top1: float | None = None  # the evaluation protocol's last top-1

    def knn_due(self, step: int) -> bool:
        every = self.cfg.eval.knn_every
        return bool(every) and step % every == 0

    def top1_due(self, step: int) -> bool:
        every = self.cfg.eval.every
        return bool(self.module.metric) and (step == self.cfg.trainer.max_steps or bool(every and step % every == 0))

    def due(self, step: int) -> bool:
        return self.knn_due(step) or self.top1_due(step)

    def run(self, step: int) -> None:
        """Every evaluation due at `step`."""
        if self.knn_due(step):
            top1, metric = self.knn_accuracy(), knn_metric(self.cfg.eval.knn_pool)
            self._say_and_log(step, metric, top1)
        if self.top1_due(step):
            self.log_top1(step)

    def finish(self, step: int) -> None:
        """An evaluation run that had already finished, run again: its top-1 once more, for the report."""
        if self.module.metric and self.top1 is None:
            self.log_top1(step)

    def knn_accuracy(self) -> float:
        """k-NN top-1 of the objective's eval encoder, computed by all ranks together."""
        cfg = self.cfg.eval
        datasets = self.cfg.knn_datasets()
        train, val = (open_split(root, split, key) for key, (root, split) in datasets.items())
        loaders = [self._loader(train), relabelled(self._loader(val), train, val, tuple(datasets))]
        encoder = self.module.eval_encoder()
        was_training = self.module.training
        self.module.eval()
        try:
            forward = partial(encoder.forward_pooled, pool=cfg.knn_pool)
            features = [extract_features(forward, loader, device=self.env.device,
                                         dtype=self.module.compute_dtype()) for loader in loaders]
        finally:
            self.module.train(was_training)
        return knn_top1(features[0], features[1], k=cfg.knn_k, temperature=cfg.knn_temperature)

    def log_top1(self, step: int) -> float:
        """The evaluation protocol's top-1 on data.val; said, logged and returned."""
        data = self.cfg.data
        train, val = open_split(data.train, data.train_split, "data.train"), open_split(data.val, data.val_split,
                                                                                       "data.val")
        loader = relabelled(self._loader(val), train, val, ("data.train", "data.val"))
        self.top1 = top1_accuracy(self.module, loader, device=self.env.device, dtype=self.module.compute_dtype())
        self._say_and_log(step, self.module.metric, self.top1)
        return self.top1

    def _say_and_log(self, step: int, metric: str, value: float) -> None:
        self.note(f"step {step} | {metric} {value:.4f}")
        self.log({metric: value}, step)

    def _loader(self, index: SplitIndex) -> Any:
        cfg = self.cfg
        return build_eval_loader(index, EvalTransform(cfg.model.image_size),
                                 batch_size=cfg.eval.knn_batch_size or cfg.data.micro_batch_size,
                                 rank=self.env.rank, world_size=self.env.world_size,
                                 num_workers=cfg.data.num_workers, image_size=cfg.model.image_size)

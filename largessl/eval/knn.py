"""Weighted k-NN classification of frozen features (DINO's eval_knn, methods.md 1.8).

Features are L2-normalised [cls] outputs; each query takes its k most cosine-similar training
features, weights each by exp(similarity / T), sums the weights per class and predicts the arg-max.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from largessl import watchdog
from largessl.distributed.comm import all_gather_cat
from largessl.errors import DataError


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, *,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Predicted class [Q] for each query [Q, D] given labelled features [M, D] (normalised here)."""
    train_features = F.normalize(train_features.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, train_features.shape[0])
    predictions = []
    for part in queries.split(chunk):
        similarity, neighbours = (part @ train_features.T).topk(k, dim=1)
        votes = torch.zeros(part.shape[0], num_classes, device=part.device)
        votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


@torch.no_grad()
def extract_features(forward_cls: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, *,
                     device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """([M, D] fp32 features, [M] labels) of every valid sample, gathered from all ranks."""
    features, labels, valid = [], [], []
    for batch in loader:
        watchdog.mark("evaluation batch")
        features.append(forward_cls(batch["image"].to(device, dtype)).float())
        labels.append(batch["label"].to(device))
        valid.append(batch["valid"].to(device))
    keep = all_gather_cat(torch.cat(valid))
    return all_gather_cat(torch.cat(features))[keep].cpu(), all_gather_cat(torch.cat(labels))[keep].cpu()


def knn_correct(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], *,
                k: int, temperature: float) -> torch.Tensor:
    """[Q] bool: which val queries the k-NN classifier over the train features gets right."""
    (train_features, train_labels), (val_features, val_labels) = train, val
    if (train_labels < 0).any() or (val_labels < 0).any():
        raise DataError("k-NN evaluation needs labelled samples (.cls in the shards); some have none")
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    predicted = knn_predict(train_features, train_labels, val_features, num_classes=num_classes, k=k,
                            temperature=temperature)
    return predicted == val_labels


def knn_top1(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], *,
             k: int, temperature: float) -> float:
    return float(knn_correct(train, val, k=k, temperature=temperature).float().mean())


def discordant(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(queries only `a` gets right, queries only `b` gets right), of two [Q] bool correctness vectors."""
    return int((a & ~b).sum()), int((b & ~a).sum())


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the chance that the queries only one of two models gets right split at least
    this unevenly between them if both were equally good. Two accuracies on the same queries are not independent,
    so this paired test, not their standard errors, says whether their difference is noise."""
    n = only_a + only_b
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n)

"""Weighted k-NN voting (DINO's eval_knn) on cases whose answer is known; `eval knn --baseline`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_largessl

from largessl.errors import DataError
from largessl.eval.knn import knn_predict, knn_top1, mcnemar_exact


def test_nearest_clusters_win() -> None:
    # Three tight clusters on orthogonal axes; queries near an axis must get that axis's class.
    torch.manual_seed(0)
    centres = torch.eye(3) * 5
    train = torch.cat([centres[c] + 0.1 * torch.randn(10, 3) for c in range(3)])
    labels = torch.arange(3).repeat_interleave(10)
    queries = torch.tensor([[4.0, 0.5, 0.2], [0.1, 0.2, 3.0], [0.3, 6.0, -0.1]])
    assert knn_predict(train, labels, queries, num_classes=3, k=5).tolist() == [0, 2, 1]


def test_votes_are_weighted_by_exp_similarity_over_temperature() -> None:
    # One very close neighbour of class 1 against two farther ones of class 0 (k = 3):
    # with T = 0.07 the close one outweighs the other two; with a huge T every vote counts the same.
    train = torch.tensor([[1.0, 0.0], [math.cos(0.8), math.sin(0.8)], [math.cos(0.8), -math.sin(0.8)]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(train, labels, query, num_classes=2, k=3, temperature=0.07).item() == 1
    assert knn_predict(train, labels, query, num_classes=2, k=3, temperature=1e6).item() == 0
    # exp(1/0.07) = 1.6e6 vs 2 exp(cos 0.8 / 0.07) = 2 x 2.1e4: the weights are what the rule says.
    assert math.exp(1 / 0.07) > 2 * math.exp(math.cos(0.8) / 0.07)


def test_features_are_normalised_first() -> None:
    train = torch.tensor([[100.0, 0.0], [0.0, 0.01]])  # lengths must not matter, only directions
    labels = torch.tensor([0, 1])
    assert knn_predict(train, labels, torch.tensor([[0.1, 1.0]]), num_classes=2, k=1).item() == 1


def test_top1_and_unlabelled_data() -> None:
    features = torch.eye(4)
    labels = torch.tensor([0, 1, 2, 3])
    assert knn_top1((features, labels), (features, labels), k=1, temperature=0.07) == 1.0
    assert knn_top1((features, labels), (features, labels.flip(0)), k=1, temperature=0.07) == 0.0
    with pytest.raises(DataError, match="needs labelled samples"):
        knn_top1((features, torch.tensor([0, -1, 2, 3])), (features, labels), k=1, temperature=0.07)


@pytest.mark.parametrize(("only_a", "only_b", "p"), [(0, 0, 1.0), (5, 5, 1.0), (10, 0, 2 / 1024), (0, 10, 2 / 1024),
                                                     (8, 2, 2 * (1 + 10 + 45) / 1024)])
def test_the_exact_mcnemar_test_counts_the_uneven_splits(only_a: int, only_b: int, p: float) -> None:
    assert mcnemar_exact(only_a, only_b) == pytest.approx(p)


def test_eval_knn_baseline_compares_with_a_random_initialisation_on_the_same_queries(mini_shards: Path,
                                                                                      tmp_path: Path) -> None:
    trained = run_largessl(["pretrain", "--config", "debug/mae_vit_tiny", f"data.train={mini_shards}",
                            "trainer.max_steps=3", "tracking.enabled=false", "run.name=r"], tmp_path)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    done = run_largessl(["eval", "knn", "--checkpoint", "runs/r", "--train", str(mini_shards), "--val",
                         str(mini_shards), "--baseline"], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "runs" / "r" / "eval" / "knn_step00000003.json").read_text())
    assert result["chance"] == pytest.approx(1 / 10) and 0 <= result["baseline_top1"] <= 1
    n = result["num_val"]  # the two accuracies differ by exactly the queries only one of them gets right
    assert result["knn_top1"] - result["baseline_top1"] == pytest.approx(
        (result["only_trained"] - result["only_baseline"]) / n)
    assert result["mcnemar_p"] == pytest.approx(mcnemar_exact(result["only_trained"], result["only_baseline"]))
    baseline, last = done.stdout.strip().splitlines()[-2:]
    assert baseline.startswith(f"baseline: random init {result['baseline_top1']:.4f}, chance 0.1000; on the same "
                               f"{n} queries {result['only_trained']} right only after training")
    assert last == f"knn_top1: {result['knn_top1']:.4f}"

"""Top-1 accuracy of a classifier (an evaluation protocol) on a labelled split, all ranks together."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from largessl import watchdog
from largessl.distributed import comm
from largessl.errors import DataError


@torch.no_grad()
def top1_accuracy(module: torch.nn.Module, loader: DataLoader, *, device: torch.device, dtype: torch.dtype) -> float:
    """Fraction of the valid samples (each counted once, over all ranks) whose arg-max logit is the label; the
    module is in eval mode meanwhile (BatchNorm reads its running statistics, no drop path)."""
    was_training = module.training
    module.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for batch in loader:
            watchdog.mark("evaluation batch")
            labels, valid = batch["label"].to(device), batch["valid"].to(device)
            if (labels[valid] < 0).any():
                raise DataError("top-1 evaluation needs labelled samples (.cls in the shards); some have none")
            predicted = module.classify(batch["image"].to(device, dtype)).argmax(dim=1)
            counts += torch.stack([((predicted == labels) & valid).sum(), valid.sum()]).double()
    finally:
        module.train(was_training)
    correct, total = comm.all_reduce_sum(counts).tolist()
    return correct / max(total, 1.0)

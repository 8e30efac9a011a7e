"""Run under torchrun (gloo, each rank an equal share of the same global batch), or call `report(0, 1)` in a
process with no process group (the whole batch): TokenSyncBatchNorm's forward and backward, TargetCorrelation
("batch") and unigrad_loss, on fixed float64 data. Under torchrun rank 0 writes every rank's report as JSON to
ARGV[1]. Used by test_sim.py, which computes the one-process reference itself.

Each rank's losses are means over its own share, so their mean over ranks is the loss of the global batch.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from largessl.distributed import comm
from largessl.models.batchnorm import TokenSyncBatchNorm, token_moments
from largessl.objectives.sim import TargetCorrelation, unigrad_loss

BATCH, TOKENS, IN_DIM, DIM = 4, 5, 6, 8  # the batch norm: B x L tokens of width IN_DIM, embedded to DIM
ROWS, WIDTH, NEG_WEIGHT = 12, 8, 0.02  # the loss: n rows of width Dd


def flat(values: torch.Tensor) -> list[float]:
    return values.detach().double().flatten().tolist()


def batch_norm_part(rank: int, world: int, generator: torch.Generator) -> dict[str, object]:
    """Linear embedding -> TokenSyncBatchNorm on this rank's share; a train forward without grad (running
    statistics), one with, then an eval forward."""
    inputs = torch.randn(BATCH, TOKENS, IN_DIM, generator=generator, dtype=torch.float64) * 2 + 1
    inputs[BATCH // 2:] += 1.5  # the two halves (the ranks' shares) differ in their statistics
    warmup = torch.randn(BATCH, TOKENS, IN_DIM, generator=generator, dtype=torch.float64) * 3 - 1
    mix = torch.randn(BATCH, TOKENS, DIM, generator=generator, dtype=torch.float64)
    embed = torch.nn.Linear(IN_DIM, DIM, dtype=torch.float64)
    norm = TokenSyncBatchNorm(DIM, dtype=torch.float64)
    with torch.no_grad():
        embed.weight.copy_(torch.randn(DIM, IN_DIM, generator=generator, dtype=torch.float64))
        embed.bias.copy_(torch.randn(DIM, generator=generator, dtype=torch.float64))
        norm.weight.copy_(1 + 0.5 * torch.randn(DIM, generator=generator, dtype=torch.float64))
        norm.bias.copy_(torch.randn(DIM, generator=generator, dtype=torch.float64))
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    with torch.no_grad():
        norm(embed(warmup[share]))
    x = inputs[share].clone().requires_grad_()
    embedded = embed(x)
    out = norm(embedded)
    loss = (out * mix[share]).sum(dim=-1).mean()  # this rank's mean over its tokens
    loss.backward()
    norm.eval()
    with torch.no_grad():
        eval_out = norm(embed(inputs[share]))
    return {"local_mean": flat(token_moments(embedded.detach())[1:1 + DIM]), "bn_out": flat(out),
            "bn_loss": loss.item(), "input_grad": flat(x.grad), "embed_weight_grad": flat(embed.weight.grad),
            "embed_bias_grad": flat(embed.bias.grad), "bn_weight_grad": flat(norm.weight.grad),
            "bn_bias_grad": flat(norm.bias.grad), "running_mean": flat(norm.running_mean),
            "running_var": flat(norm.running_var), "eval_out": flat(eval_out)}


def loss_part(rank: int, world: int, generator: torch.Generator) -> dict[str, object]:
    """The batch correlation (all-reduced mean over ranks) and the UniGrad loss on this rank's rows."""
    target = F.layer_norm(torch.randn(ROWS, WIDTH, generator=generator, dtype=torch.float64) * 2 + 0.5, (WIDTH,))
    pred = torch.randn(ROWS, WIDTH, generator=generator, dtype=torch.float64)
    share = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    pred_share = pred[share].clone().requires_grad_()
    correlation = TargetCorrelation("batch", 0.99)(target[share])
    loss = unigrad_loss(pred_share, target[share], correlation, NEG_WEIGHT)
    loss["loss"].backward()
    return {"correlation": flat(correlation), "loss": loss["loss"].item(), "pos": loss["pos"].item(),
            "neg": loss["neg"].item(), "pred_grad": flat(pred_share.grad)}


def report(rank: int, world: int) -> dict[str, object]:
    """What this rank computes on its share (rank 0 of 1: the whole batch)."""
    generator = torch.Generator().manual_seed(0)  # the same global batch on every rank
    return {**batch_norm_part(rank, world, generator), **loss_part(rank, world, generator)}


def main(out_path: str) -> None:
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    rank, world = comm.rank(), comm.world_size()
    reports = comm.all_gather_object(report(rank, world))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"world_size": world, "ranks": reports}, f)
    if comm.is_distributed():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

"""An evaluation protocol's recipe is written at its paper's scale: the linear probe's global batch is 16,384 on 32
GPUs, the attentive probe's 8,192, fine-tuning's 1,024, each with 10 DataLoader workers per rank. Run as printed on a
small labelled set or on a few ranks, that stops on a batch larger than the data, on bf16 accumulation at ZeRO-0 (the
linear probe's recipe asks for data.micro_batch_size = 16,384 / GPUs) or on readers that cannot each fill a batch.

So before anything heavy starts, the keys the command line did not set are fitted to this job, and each change is
said in one line, with the key to set to choose otherwise:
- optim.global_batch_size: at most the training split (the largest power of two per rank that fits); the peak
  learning rate follows by the linear rule, as the recipes' base_lr is per 256 images;
- data.micro_batch_size: at most the global batch per rank; at ZeRO-0 with bf16, exactly that (no accumulation);
- data.num_workers: at most the CPUs of this rank less one, and no more readers than can each fill a batch.
A key given on the command line is never changed: a setting that cannot work is then refused as before, naming it.
"""

from __future__ import annotations

import dataclasses

from largessl.config.schema import PretrainConfig
from largessl.cpus import cpus_per_rank


def given_keys(overrides: list[str]) -> set[str]:
    """The `section.key` names of command-line overrides."""
    return {item.split("=", 1)[0].strip() for item in overrides if "=" in item}


def power_of_two_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def fitted_batches(cfg: PretrainConfig, num_samples: int, world: int, given: set[str]) -> tuple[int, int]:
    """(global batch, micro-batch) for `num_samples` training samples on `world` ranks."""
    global_batch, micro = cfg.optim.global_batch_size, cfg.data.micro_batch_size
    per_rank = power_of_two_at_most(num_samples // world)
    if global_batch > num_samples and per_rank and "optim.global_batch_size" not in given:
        global_batch = per_rank * world
    if "data.micro_batch_size" not in given and global_batch % world == 0:
        if micro * world > global_batch or (not cfg.distributed.accumulates and micro * world < global_batch):
            micro = global_batch // world
    return global_batch, micro


def fitted_workers(cfg: PretrainConfig, num_samples: int, world: int, micro: int, given: set[str], cpus: int) -> int:
    """DataLoader workers: at most this rank's `cpus` less one, and readers that each fill a batch per pass."""
    workers = cfg.data.num_workers
    if "data.num_workers" in given or workers <= 1:
        return workers
    fill = num_samples // max(1, world * micro)  # readers that each get one batch per pass
    return max(1, min(workers, cpus - 1, fill))


def fit(cfg: PretrainConfig, num_samples: int, world: int, overrides: list[str]) -> tuple[PretrainConfig, list[str]]:
    """`cfg` fitted to a training split of `num_samples` on `world` ranks, and one line per key changed."""
    given = given_keys(overrides)
    global_batch, micro = fitted_batches(cfg, num_samples, world, given)
    cpus = cpus_per_rank()
    workers = fitted_workers(cfg, num_samples, world, micro, given, cpus)
    why = {"optim.global_batch_size": (cfg.optim.global_batch_size, global_batch,
                                       f"--train has {num_samples} samples; the peak lr follows by the linear rule"),
           "data.micro_batch_size": (cfg.data.micro_batch_size, micro, f"the global batch over {world} rank(s)"
                                     + ("" if cfg.distributed.accumulates
                                        else ", without accumulation at ZeRO-0 in bf16")),
           "data.num_workers": (cfg.data.num_workers, workers, f"{cpus} CPU(s) for this rank and readers "
                                "that can each fill a batch")}
    said = [f"fitted to this job: {key} {old} -> {new} ({reason}; set {key} to choose)"
            for key, (old, new, reason) in why.items() if old != new]
    fitted = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, global_batch_size=global_batch),
                                 data=dataclasses.replace(cfg.data, micro_batch_size=micro, num_workers=workers))
    fitted.validate()
    return fitted, said

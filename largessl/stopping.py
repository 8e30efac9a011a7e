"""How a training job ends before its last step, the same way on every rank: a stop signal, agreed at a stop point;
the hand-over before any rank exits (a SLURM requeue); a rank that stops answering (the watchdog).

The command holds the process's stop signals from its first line (lifecycle.STOPS), so a signal in any phase is
only recorded; the trainer asks at its stop points whether any rank got one (one small collective), and every rank
then stops at the same point: during start-up with nothing to save, while training after a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from largessl import endings, watchdog
from largessl.distributed import comm
from largessl.distributed.env import DistEnv
from largessl.launch import slurm
from largessl.lifecycle import STOPS, Stopped, rank_prefix, signal_name


def stop_point(env: DistEnv, phase: str, note: Callable[[str], None], *, last: bool = False) -> None:
    """A start-up phase begins: the watchdog's clock starts again, and a stop signal that any rank got so far
    (during the imports, the build, resuming) ends the job here (raises Stopped on every rank). After the `last`
    one, training's stop checks take over from start-up's (lifecycle.StopSignals)."""
    watchdog.mark(f"start-up: {phase}")
    signum = int(comm.all_reduce_max(torch.tensor([float(STOPS.received)], device=env.device))[0])
    if last and not signum:
        STOPS.training(watchdog.progress)
    if signum:
        STOPS.stand_down()
        note(f"stopped by {signal_name(signum)} during start-up ({phase}); nothing new to save")
        raise Stopped(signum)


def hand_over(signum: int, is_main: bool, outcome: str) -> None:
    """Stopping for `signum`, before any rank exits: on the time-limit signal rank 0 requeues a SLURM job, and every
    rank waits for that (srun's --kill-on-bad-exit ends the step as soon as one rank exits, and with it a requeue
    still to come)."""
    STOPS.stand_down()
    endings.keep(f"{rank_prefix()}stopped by {signal_name(signum)}; {outcome}")
    watchdog.mark("requeue")
    slurm.requeue_on(signum, is_main, outcome)
    comm.barrier()


def closing() -> None:
    """The job is closing (whatever ended it): the watchdog stops, and a stop signal no longer finds a held rank."""
    STOPS.stand_down()
    watchdog.watch(None)


def start_watchdog(timeout_s: float, env: DistEnv) -> None:
    """distributed.timeout_s: this rank's watchdog (watchdog.py), until the job closes (`watchdog.watch(None)`)."""
    if timeout_s:
        rank, world = env.rank, env.world_size
        watchdog.watch(watchdog.Watchdog(
            timeout_s, rank, world, comm.store_client,
            on_hang=lambda silent: watchdog.end_process(silent, rank, world, slurm.requeue)))

"""Saving and resuming a run, as every rank does it (checkpoint.py is the files on disk, without a process group).

Saving: refused when any rank's weights are not finite; rank 0 marks the tag incomplete, every rank writes its
part (hashed while it is written) and takes the digests of its share of the tag's files (checksums.py), and only
then does rank 0 record every file's size and digest, mark the tag complete and point `latest` at it (then prunes).

Resuming: rank 0 picks a candidate (checkpoint.choose_resume_tag: the newest complete tag whose sizes are right,
whatever `latest` says), every rank checks its share of the candidate's files against their digests and all agree
on the outcome; a damaged candidate is said in one line and the next older one is tried, and once a resume has
loaded, the damaged ones are set aside. A tag from before checksums is checked by its files' zip CRC-32s and by
torch opening each file (memory-mapped), so it too is passed over before anything is loaded. A run never silently
starts over on top of its own checkpoints: when checkpoints exist but none can be read, it stops and says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from largessl import checkpoint, checksums, rng
from largessl.data.loader import DataPosition
from largessl.distributed import comm
from largessl.errors import SharedError, UserError, is_lost_peer, one_line
from largessl.health import diverged
from largessl.progress import say
from largessl.run_dir import RunDir


def save(engine: Any, teacher: Any, run: RunDir, step: int, client_state: Callable[[], dict[str, Any]], *,
         layout: dict[str, Any], keep_last: int, is_main: bool) -> None:
    """The checkpoint of `step`, on every rank; refused (DivergedError) when any rank's weights are not finite, and
    one line (UserError) when it cannot be written. `layout` goes into complete.json."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    finite = engine.local_weights_finite(params)
    if teacher:
        finite = finite & torch.isfinite(teacher.flat).all()
    if not comm.all_true(finite):
        raise diverged(step, checkpoint.newest_complete(run.ckpt_dir), "the weights")
    tag = checkpoint.tag_for(step)
    try:
        _write(engine, teacher, run.ckpt_dir, tag, client_state, layout, is_main)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and is_lost_peer(exc):
            raise
        raise UserError(f"cannot write the checkpoint {run.ckpt_dir / tag} ({one_line(exc)[:300]}); the "
                        "checkpoints before it are kept: make room or fix the permissions, then rerun the same "
                        "command to resume") from None
    if is_main:
        checkpoint.prune(run.ckpt_dir, keep_last)
    comm.barrier()


def _write(engine: Any, teacher: Any, ckpt_dir: Path, tag: str, client_state: Callable[[], dict[str, Any]],
           layout: dict[str, Any], is_main: bool) -> None:
    tag_dir = ckpt_dir / tag
    if is_main:
        tag_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.begin_save(tag_dir)
    comm.barrier()
    if teacher:  # in the tag directory before it is marked complete
        teacher.save(tag_dir)
    engine.save(ckpt_dir, tag, client_state())
    comm.barrier()
    names = checkpoint.tag_files(tag_dir)
    mine = checksums.share(names, comm.rank(), comm.world_size())
    digests = comm.all_gather_object(checksums.written_digests(tag_dir, mine))
    if is_main:
        checkpoint.mark_complete(ckpt_dir, tag, layout, digests)


def choose(run: RunDir, is_main: bool) -> checkpoint.Choice:
    """The tag to resume from, on every rank: rank 0's candidate, its files checked by every rank (`verify`), until
    one passes or none is left; rank 0 says what it passed over and why."""
    found: dict[str, str] = {}
    started = time.perf_counter()
    while True:
        choice = comm.broadcast_object(checkpoint.choose_resume_tag(run.ckpt_dir, found) if is_main else None)
        why = verify(run.ckpt_dir / choice.tag) if choice.tag else ""
        if not why:
            break
        found[choice.tag] = why
    if is_main:
        for note in choice.notes:
            say(f"checkpoints: {note}")
        if choice.tag:
            took = time.perf_counter() - started
            say(f"checkpoints: {verified(run.ckpt_dir / choice.tag)} (checked in {took:.1f} s)")
    if choice.tag is None and choice.unusable:
        raise SharedError(f"{run.ckpt_dir} holds checkpoints but none can be read ({'; '.join(choice.notes)}); "
                          "refusing to start over on top of them: restore them, or move them away to start from "
                          "scratch, or choose another run.name")
    return choice


def verify(tag_dir: Path) -> str:
    """Every rank checks its share of the tag's files (checksums.share at this run's world size, so together they
    check every file, also the other ranks' partitions a reshaped load reads): against their digests, or for a tag
    from before checksums, their zip CRC-32s and whether torch opens them. Returns the same on every rank: '' or
    the first problem in rank order."""
    marker = checkpoint.read_marker(tag_dir)
    names = checkpoint.listed_files(tag_dir, marker)
    mine = checksums.share(names, comm.rank(), comm.world_size())
    why = checksums.problem(tag_dir, mine, marker)
    if not why and not checksums.recorded(marker):
        why = checksums.unloadable(tag_dir, mine)
    return next((said for said in comm.all_gather_object(why) if said), "")


def verified(tag_dir: Path) -> str:
    """What `verify` found a tag to be, in words."""
    marker = checkpoint.read_marker(tag_dir)
    what = "checksums" if checksums.recorded(marker) else "zip CRC-32s (written before checksums)"
    return f"the {len(checkpoint.listed_files(tag_dir, marker))} file(s) of {tag_dir.name} match their {what}"


def check_layout(run: RunDir, tag: str, zero_stage: int) -> None:
    """A checkpoint loads only into the ZeRO stage that wrote it; say so in one line instead of DeepSpeed's error."""
    written = checkpoint.read_marker(run.ckpt_dir / tag).get("zero_stage", run.previous_zero_stage())
    if written is not None and int(written) != zero_stage:
        raise SharedError(f"{run.ckpt_dir / tag} was written at ZeRO stage {written} and this run asks for "
                          f"distributed.zero_stage={zero_stage}; DeepSpeed cannot load a checkpoint into another "
                          f"stage: resume with distributed.zero_stage={written}, or choose another run.name")


def load(engine: Any, teacher: Any, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Weights, optimizer, teacher and the objective's extra state of `tag`; returns the client state.

    A ZeRO-1/2/3 checkpoint written on another number of ranks (complete.json's world_size; for a tag from before
    markers, its partition files) is redistributed over this run's ranks as it loads (distributed/reshape.py: no
    conversion step, nothing written); rank 0 says so, with the time it took."""
    saved_world_size = checkpoint.read_marker(ckpt_dir / tag).get("world_size") or engine.ranks_written(ckpt_dir / tag)
    started = time.perf_counter()
    try:
        client_state = engine.load(ckpt_dir, tag, saved_world_size=saved_world_size)
        if client_state is None:
            raise FileNotFoundError(ckpt_dir / tag)
        if teacher:
            teacher.load(ckpt_dir / tag)
    except Exception as exc:
        if checksums.damage_error(exc):
            raise UserError(damaged_on_load(ckpt_dir / tag, exc)) from None
        if not isinstance(exc, (RuntimeError, KeyError, ValueError, AssertionError, OSError)):
            raise
        raise UserError(f"cannot resume from {ckpt_dir / tag}: it does not fit this config "
                        f"({one_line(exc)[:200]}); use another run.name to start a new run") from None
    engine.module.load_extra_state(client_state.get("objective", {}))
    if engine.needs_reshape(saved_world_size) and comm.rank() == 0:
        say(f"checkpoints: {tag} was written on {saved_world_size} rank(s); its ZeRO partitions were redistributed "
            f"over {comm.world_size()} rank(s) in {time.perf_counter() - started:.2f} s")
    return client_state


def damaged_on_load(tag_dir: Path, exc: BaseException) -> str:
    """The line for a tag whose bytes failed to load although its checks passed (a tag from before checksums with
    a damaged zip directory, say): which file, and how to resume from the previous checkpoint."""
    why = checksums.unloadable(tag_dir, checkpoint.listed_files(tag_dir, checkpoint.read_marker(tag_dir)))
    return (f"cannot resume from {tag_dir}: it is damaged ({why or one_line(exc)[:200]}); move it out of "
            f"{tag_dir.parent} (to damaged_{tag_dir.name}, say) and rerun the same command to resume from the "
            "checkpoint before it")


def set_aside_damaged(run: RunDir, choice: checkpoint.Choice) -> None:
    """Rank 0, after resuming from an older tag: rename the damaged newer ones so they are neither chosen nor
    pruned into the count of kept checkpoints (and a re-save of their step does not meet their files)."""
    for tag in choice.unusable:
        moved = checkpoint.set_aside(run.ckpt_dir, tag)
        say(f"checkpoints: moved the damaged {tag} to {moved}")


def resumed_position(client_state: dict[str, Any], plan: Any, *, rank: int, world_size: int, num_workers: int,
                     micro_batch_size: int, accumulation: int) -> tuple[DataPosition, str]:
    """This rank's data position after a resume, its RNG restored; and, when the world size, the workers or the
    micro-batch changed since the checkpoint, a line that says so and whether the data order continues exactly
    ('' when nothing changed: then each rank takes back its own saved position and RNG)."""
    same_layout = (client_state["world_size"] == world_size and client_state["num_workers"] == num_workers
                   and client_state["micro_batch_size"] == micro_batch_size)
    if same_layout:
        rng.restore_rng(client_state["rng"][rank])
        return DataPosition.from_state_dict(client_state["data"][rank]), ""
    step = int(client_state["step"])
    position, exact = DataPosition.continued(
        plan, samples=int(client_state["samples_seen"]), epoch=float(client_state["epoch"]), rank=rank,
        world_size=world_size, num_workers=num_workers, micro_batches=step * accumulation)
    return position, (
        f"world size, workers or micro-batch changed since the checkpoint ({client_state['world_size']} rank(s) then, "
        f"{world_size} now): " + (
            "the data order continues sample for sample (data.order=global)" if exact else
            f"warning: the data order continues from the same point of epoch {int(client_state['epoch'])} but not "
            "sample for sample (docs/slurm.md; data.order=global continues exactly)"))

"""Checkpoint naming, completion, discovery and pruning, and the per-rank state our checkpoints carry.

DeepSpeed writes the weights and optimizer partitions; we add a client state (design.md "Run directory"):
step, samples seen, every reader's data position, RNG states, the MLflow run. DeepSpeed stores the client
state from rank 0 only, so per-rank parts are gathered into lists indexed by rank.

A tag directory is complete only once `complete.json` is in it: rank 0 writes it (atomically) after every rank
has finished writing, listing every file with its size and its digest (checksums.py), and only then points
`latest` at the tag. So a tag that a killed job half-wrote is never chosen, a file truncated afterwards is
recognised as damaged from its size, and a file changed in place from its digest, before anything reads it.
Resuming takes the newest complete tag that passes those checks, whatever `latest` says (checkpointing.py checks
the digests across ranks); export and evaluation (`checkpoint_of`) read the newest complete tag or the one asked
for, check it the same way, and refuse it in one line when it is damaged, never taking an older one unasked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from largessl import checksums
from largessl.errors import UserError, one_line
from largessl.files import write_atomic

TAG = re.compile(r"step_(\d+)$")
MARKER = "complete.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(TAG.match(tag)[1])


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, if the file exists, names a tag and its directory is there."""
    try:
        tag = (ckpt_dir / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag if TAG.match(tag) and (ckpt_dir / tag).is_dir() else None


def step_tags(ckpt_dir: Path) -> list[str]:
    """Every step_* directory, newest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG.match(p.name)), key=step_of, reverse=True)


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / MARKER).is_file()


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete tags, newest first. A run directory written before completion markers existed has none: then the
    tag `latest` names counts as complete (DeepSpeed wrote `latest` after the files)."""
    tags = step_tags(ckpt_dir)
    marked = [t for t in tags if is_complete(ckpt_dir / t)]
    if marked:
        return marked
    legacy = latest_tag(ckpt_dir)
    return [legacy] if legacy else []


def newest_complete(ckpt_dir: Path) -> str:
    """The newest complete tag ('' when there is none)."""
    tags = complete_tags(ckpt_dir)
    return tags[0] if tags else ""


# ----------------------------------------------------------------------------- writing


def begin_save(tag_dir: Path) -> None:
    """Rank 0, before any rank writes `tag_dir`: it is incomplete until `mark_complete` (a re-save of a step must
    never leave an old marker vouching for half-rewritten files)."""
    (tag_dir / MARKER).unlink(missing_ok=True)


def tag_files(tag_dir: Path) -> list[str]:
    """Every file of a tag but its marker, as paths relative to the tag directory, sorted."""
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and p.name != MARKER)


def mark_complete(ckpt_dir: Path, tag: str, layout: dict[str, Any],
                  digests: list[dict[str, str]] | None = None) -> None:
    """Rank 0, after every rank's files are written and hashed: record them with their sizes and with the digests
    every rank gathered (`digests`, one dict per rank; None writes a tag without checksums, as before them), then
    point `latest` here. Raises RuntimeError when a file it lists has no digest."""
    tag_dir = ckpt_dir / tag
    names = tag_files(tag_dir)
    sums = {checksums.KEY: checksums.record(digests, names)} if digests is not None else {}
    record = {"tag": tag, "step": step_of(tag), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **layout,
              "files": {name: (tag_dir / name).stat().st_size for name in names}, **sums}
    write_atomic(tag_dir / MARKER, json.dumps(record, indent=1) + "\n")
    write_atomic(ckpt_dir / "latest", tag)


def read_marker(tag_dir: Path) -> dict[str, Any]:
    try:
        marker = json.loads((tag_dir / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def listed_files(tag_dir: Path, marker: dict[str, Any]) -> list[str]:
    """The files complete.json lists, sorted; a tag from before markers: the files in the directory."""
    files = marker.get("files")
    return sorted(files) if isinstance(files, dict) and files else tag_files(tag_dir)


# ----------------------------------------------------------------------------- reading


def damage(tag_dir: Path) -> str:
    """Why a complete tag cannot be read ('' when it looks whole): a listed file missing or of another size, or a
    torch file whose zip structure is broken (a truncated write). Reads only file sizes and zip directories."""
    marker = read_marker(tag_dir)
    if is_complete(tag_dir) and not marker.get("files"):
        return f"{MARKER} is unreadable"
    for name, size in (marker.get("files") or {}).items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} when written (truncated or overwritten)"
    names = marker.get("files") or {p.name: 0 for p in tag_dir.glob("*.pt")}
    if not names:
        return "it holds no checkpoint files"
    for name in names:
        if name.endswith(".pt"):
            try:
                with zipfile.ZipFile(tag_dir / name) as archive:
                    archive.infolist()
            except (zipfile.BadZipFile, OSError) as exc:
                return f"{name} is not a readable torch file ({exc})"
    return ""


@dataclass(frozen=True)
class Choice:
    """The tag to resume from (None: start from scratch) and what was passed over, in words."""

    tag: str | None
    notes: list[str]
    unusable: list[str]  # complete tags passed over as damaged


def choose_resume_tag(ckpt_dir: Path, found: dict[str, str] | None = None) -> Choice:
    """The newest complete, undamaged tag; what was skipped is said in `notes`. `found`: tags already found
    damaged (by their checksums, checkpointing.choose) and why."""
    notes, unusable, found = [], [], found or {}
    complete = complete_tags(ckpt_dir)
    newest = step_of(complete[0]) if complete else -1
    partial = [t for t in step_tags(ckpt_dir) if t not in complete and step_of(t) > newest]
    notes += [f"{t} was never completely written (ignored)" for t in partial]
    for tag in complete:
        why = found.get(tag) or damage(ckpt_dir / tag)
        if not why:
            named = latest_tag(ckpt_dir)
            if named != tag:
                said = f"names {named}" if named else "is missing or names no checkpoint"
                notes.append(f"checkpoints/latest {said}; the newest complete checkpoint is {tag}")
            return Choice(tag, notes, unusable)
        notes.append(f"{tag} is damaged: {why}")
        unusable.append(tag)
    return Choice(None, notes, unusable)


def set_aside(ckpt_dir: Path, tag: str) -> Path:
    """Move a damaged tag out of the way (renamed, not deleted: it may be worth a look), so it is neither chosen
    nor counted by `prune`; returns its new path."""
    target = ckpt_dir / f"damaged_{tag}"
    if target.exists():
        target = ckpt_dir / f"damaged_{tag}_{int(time.time())}"
    os.replace(ckpt_dir / tag, target)
    return target


def model_states_file(tag_dir: Path) -> Path:
    """Rank 0's model file of a DeepSpeed checkpoint (with the client state); ZeRO-3 names it differently."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise FileNotFoundError(tag_dir / "mp_rank_00_model_states.pt")


def checkpoint_of(run_dir: Path, step: int | None = None, *, arg: str = "--checkpoint") -> Path:
    """The tag directory to read (export, evaluation): the newest complete checkpoint of a run, or the one of
    `step`, whose files match their sizes and digests. Errors name `arg` (the command-line argument that gave
    `run_dir`) and, for an unknown step, the steps there are; a damaged checkpoint is refused, never replaced by
    an older one unasked (the error names the older one to ask for)."""
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{arg}: {run_dir} is not a run directory (no config.yaml)")
    tags = complete_tags(run_dir / "checkpoints")
    if step is None and not tags:
        raise UserError(f"{arg}: no complete checkpoint under {run_dir}")
    if step is not None and tag_for(step) not in tags:
        steps = ", ".join(str(step_of(tag)) for tag in reversed(tags)) or "none"
        raise UserError(f"--step {step}: {run_dir} has no complete checkpoint of that step (complete: {steps})")
    tag_dir = run_dir / "checkpoints" / (tags[0] if step is None else tag_for(step))
    why = fault(tag_dir)
    if why:
        raise UserError(f"{arg if step is None else f'--step {step}'}: {tag_dir} is damaged: {why}"
                        f"{older_hint(tag_dir, arg)}")
    return tag_dir


def fault(tag_dir: Path) -> str:
    """Why a complete tag cannot be read ('' when it can): `damage` (sizes, zip directories), then its files
    against their digests (without digests, their zip CRC-32s); the digests once per process and file version."""
    marker = read_marker(tag_dir)
    return damage(tag_dir) or checksums.checked(tag_dir, listed_files(tag_dir, marker), marker)


def older_hint(tag_dir: Path, arg: str) -> str:
    """'; --step N reads step_N, the newest older complete checkpoint' ('objective.checkpoint_step=N' for a
    config's checkpoint), or that there is none. Older tags are checked by size only (cheap)."""
    option = "objective.checkpoint_step=" if arg == "objective.checkpoint" else "--step "
    older = [t for t in complete_tags(tag_dir.parent) if step_of(t) < step_of(tag_dir.name)
             and not damage(tag_dir.parent / t)]
    if not older:
        return "; this run has no older complete checkpoint"
    return f"; {option}{step_of(older[0])} reads {older[0]}, the newest older complete checkpoint"


@contextmanager
def reading(tag_dir: Path, arg: str) -> Iterator[None]:
    """Around torch.load of a checkpoint's files outside resuming (export, evaluation): an error that says the
    bytes are damaged (checksums.damage_error; a tag without digests can get that far) becomes one UserError line
    naming the file, the tag and the older checkpoint to ask for."""
    try:
        yield
    except Exception as exc:
        if not checksums.damage_error(exc):
            raise
        why = checksums.unloadable(tag_dir, listed_files(tag_dir, read_marker(tag_dir))) or one_line(exc)[:200]
        raise UserError(f"{arg}: {tag_dir} is damaged: {why}{older_hint(tag_dir, arg)}") from None


def prune(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and tags that never completed; never the tag `latest`
    names, never the newest complete one. Returns what was removed."""
    complete = complete_tags(ckpt_dir)
    protected = {latest_tag(ckpt_dir), *complete[:max(1, keep)]}
    removed = [ckpt_dir / t for t in step_tags(ckpt_dir) if t not in protected]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed

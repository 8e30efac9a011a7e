"""Checkpoint files are hashed while they are written (checksums.hash_while_writing), and what is recorded is always
the checksum of the bytes on disk: a file written in pieces across many segments, an empty one, a write that fails,
a file replaced or changed meanwhile, DeepSpeed's own checkpoint engine and the EMA teacher's torch.save.
Segments are made 1 MiB here so that a few MiB span many of them."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from largessl import checksums

SEGMENT = 1 << 20


@pytest.fixture(autouse=True)
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksums, "SEGMENT", SEGMENT)
    checksums._WRITTEN.clear()


def from_disk(path: Path) -> str:
    return checksums.digests(path.parent, [path.name], segment=SEGMENT)[path.name]


def followers() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "checksums-follower"]


def write_in_pieces(path: Path, sizes: list[int], pause_s: float = 0.0) -> bytes:
    """Append random pieces of `sizes` bytes to `path` (opened as torch.save opens it: truncating), pausing between
    them; returns what was written."""
    written = b""
    with open(path, "wb") as handle:
        for size in sizes:
            piece = os.urandom(size)
            handle.write(piece)
            handle.flush()
            written += piece
            time.sleep(pause_s)
    return written


def test_segments_are_hashed_while_the_write_goes_on_and_the_checksum_is_that_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    follower = checksums.Follower(path)
    write_in_pieces(path, [300_000] * 20, pause_s=0.02)  # 5.7 segments, a piece every 20 ms
    during = follower.hashed
    follower.finish()
    assert during >= 3 * SEGMENT  # most of it was hashed before the write ended
    assert checksums.written_digests(tmp_path, [path.name]) == {path.name: from_disk(path)}
    assert not followers() and not checksums._WRITTEN


@pytest.mark.parametrize("size", [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT])
def test_every_size_gets_the_checksum_a_reader_computes(tmp_path: Path, size: int) -> None:
    path = tmp_path / "b.pt"
    checksums.hash_while_writing(path, lambda: write_in_pieces(path, [size]))
    assert checksums._WRITTEN[path.resolve()][2] == from_disk(path)
    assert checksums.written_digests(tmp_path, [path.name]) == {path.name: from_disk(path)}


def test_a_write_that_fails_leaves_nothing_vouched_for_and_no_thread(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"

    def failing() -> None:
        write_in_pieces(path, [SEGMENT * 2])
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        checksums.hash_while_writing(path, failing)
    assert not checksums._WRITTEN and not followers()


def test_a_file_replaced_during_its_write_is_hashed_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "d.pt"

    def replacing() -> None:
        write_in_pieces(path, [SEGMENT * 2])
        write_in_pieces(tmp_path / "other", [SEGMENT + 5])
        os.replace(tmp_path / "other", path)  # another inode now holds the name

    checksums.hash_while_writing(path, replacing)
    assert not checksums._WRITTEN
    assert checksums.written_digests(tmp_path, [path.name]) == {path.name: from_disk(path)}


def test_a_file_changed_after_its_write_keeps_the_checksum_of_what_was_written(tmp_path: Path) -> None:
    """The record is of what the writer wrote; a change between the write and the record is damage, found when the
    tag is verified (a resize or rewrite under another inode is not vouched for at all)."""
    path = tmp_path / "e.pt"
    checksums.hash_while_writing(path, lambda: write_in_pieces(path, [SEGMENT * 2]))
    as_written = from_disk(path)
    with open(path, "r+b") as handle:
        handle.seek(SEGMENT + 7)
        handle.write(b"\x00" if handle.read(1) != b"\x00" else b"\x01")
    assert checksums.written_digests(tmp_path, [path.name]) == {path.name: as_written} != {path.name: from_disk(path)}
    checksums.hash_while_writing(path, lambda: write_in_pieces(path, [SEGMENT * 2]))
    with open(path, "ab") as handle:
        handle.write(b"more")
    assert checksums.written_digests(tmp_path, [path.name]) == {path.name: from_disk(path)}


def test_without_following_the_files_are_hashed_after_their_write(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksums, "FOLLOW_WRITES", False)
    path = tmp_path / "f.pt"
    checksums.hash_while_writing(path, lambda: write_in_pieces(path, [SEGMENT * 2 + 3]))
    assert not checksums._WRITTEN
    assert checksums.written_digests(tmp_path, [path.name]) == {path.name: from_disk(path)}


def test_deepspeeds_checkpoint_engine_and_torch_save_are_followed(tmp_path: Path) -> None:
    """The real TorchCheckpointEngine, as distributed/engine.py wraps it, and a torch.save as the EMA teacher makes
    it: each file's checksum is taken while it is written and equals that of its bytes."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from largessl.distributed.engine import hash_saves

    checkpoint_engine = TorchCheckpointEngine()
    hash_saves(checkpoint_engine)
    state = {"weights": torch.randn(1_000_000), "step": 3}
    checkpoint_engine.save(state, str(tmp_path / "model_states.pt"))
    path = tmp_path / "teacher.pt"
    checksums.hash_while_writing(path, lambda: torch.save(state, path))
    names = ["model_states.pt", "teacher.pt"]
    assert sorted(p.name for p in checksums._WRITTEN) == names
    assert checksums.written_digests(tmp_path, names) == {name: from_disk(tmp_path / name) for name in names}
    assert torch.equal(torch.load(path)["weights"], state["weights"])

"""Checkpoints carry checksums of their contents (largessl/checksums.py), verified wherever a checkpoint is read.

The class of damage, not one example: one changed byte in each region of a torch file (its pickle, a tensor's bytes,
its zip directory) of every file of a tag is found, by name, by the check a resume makes (checkpointing.verify) and
by the one export and evaluation make (checkpoint.fault). Two real runs, made once for the module: MAE at ZeRO-0 in
one process (one file per tag) and DINO at ZeRO-3 on two ranks (each rank's model and optimizer partitions and its
fp32 teacher partition). Tests copy a run before damaging it. Through the real commands: a resume passes over the
damaged tag with one line naming the file and repeats the uninterrupted run's losses (on two ranks, where rank 1
owns the damaged file); export and `largessl eval knn` refuse in one line (exit 2, no traceback) naming the older
step to ask for; a tag from before checksums still resumes, and its damage is one line too, never a traceback nor
"does not fit this config".
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_largessl
from test_train import ok

from largessl import checkpoint, checkpointing, checksums
from largessl.cli import main as cli_main

MAE = ["pretrain", "--config", "debug/mae_vit_tiny", "model.image_size=32", "trainer.max_steps=4",
       "trainer.ckpt_every=2", "trainer.keep_last=3", "trainer.log_every=1", "tracking.enabled=false"]
DINO = ["pretrain", "--config", "debug/dino_vit_tiny", "model.image_size=32", "objective.local_crop_size=16",
        "objective.local_crops=2", "objective.out_dim=1024", "distributed.zero_stage=3", "data.micro_batch_size=8",
        "optim.global_batch_size=16", "data.num_workers=0", "eval.knn_every=0", "trainer.max_steps=4",
        "trainer.ckpt_every=2", "trainer.keep_last=3", "trainer.log_every=1", "tracking.enabled=false"]
NEWEST, OLDER = "step_00000004", "step_00000002"


@dataclass
class Run:
    workdir: Path
    name: str
    args: list[str]
    nproc: int

    @property
    def run_dir(self) -> Path:
        return self.workdir / "runs" / self.name

    def tag(self, tag: str = NEWEST) -> Path:
        return self.run_dir / "checkpoints" / tag

    def copy(self, workdir: Path) -> Run:
        """The run directory copied into `workdir` (the module's runs stay whole for the other tests)."""
        shutil.copytree(self.run_dir, workdir / "runs" / self.name)
        return Run(workdir, self.name, self.args, self.nproc)

    def resume(self) -> str:
        """The same command again, after the records of the steps past the older checkpoint are dropped (so only
        the resumed job's losses are there to compare); its stdout."""
        journal = self.run_dir / "metrics.jsonl"
        kept = [line for line in journal.read_text().splitlines() if json.loads(line)["step"] <= 2]
        journal.write_text("".join(line + "\n" for line in kept))
        return ok(run_largessl(self.args, self.workdir, nproc=self.nproc)).stdout


def train(workdir: Path, name: str, recipe: list[str], shards: Path, nproc: int) -> Run:
    run = Run(workdir, name, [*recipe, f"data.train={shards}", f"run.name={name}"], nproc)
    ok(run_largessl(run.args, workdir, nproc=nproc))
    return run


@pytest.fixture(scope="module")
def mae(mini_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """4 MAE steps at ZeRO-0, one process, tags at steps 2 and 4 (~10 s)."""
    return train(tmp_path_factory.mktemp("mae"), "mae", MAE, mini_shards, 1)


@pytest.fixture(scope="module")
def dino(mini_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """4 DINO steps at ZeRO-3 on two ranks, tags at steps 2 and 4: six files each (~30 s)."""
    return train(tmp_path_factory.mktemp("dino"), "dino", DINO, mini_shards, 2)


# ----------------------------------------------------------------------------- damage


def regions(path: Path) -> dict[str, int]:
    """One byte offset in each region of a torch file (a zip): its pickle (the third byte: an opcode), the middle
    of its largest tensor, and the disk-number field of its first zip directory entry, which Python's zipfile
    ignores and torch's reader refuses (so a zip CRC-32 check misses it and a load fails)."""
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        members, directory = archive.infolist(), archive.start_dir

    def data_at(info: zipfile.ZipInfo) -> int:
        name_length, extra_length = struct.unpack_from("<HH", raw, info.header_offset + 26)
        return info.header_offset + 30 + name_length + extra_length

    assert raw[directory:directory + 4] == b"PK\x01\x02"
    tensor = max((m for m in members if "/data/" in m.filename), key=lambda m: m.file_size)
    pickle_member = next(m for m in members if m.filename.endswith("/data.pkl"))
    return {"pickle": data_at(pickle_member) + 2, "tensor": data_at(tensor) + tensor.file_size // 2,
            "zip directory": directory + 35}


def flip(path: Path, offset: int) -> None:
    """Change one byte of `path` in place (one bit of it)."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 1]))


def strip_checksums(tag_dir: Path) -> None:
    """Make a tag one from before checksums: its complete.json without them (sizes kept)."""
    marker = json.loads((tag_dir / checkpoint.MARKER).read_text())
    del marker[checksums.KEY]
    (tag_dir / checkpoint.MARKER).write_text(json.dumps(marker))


def each_damage(tag_dir: Path) -> list[tuple[str, str, int]]:
    """(file, region, offset) for every region of every file of the tag."""
    names = checkpoint.listed_files(tag_dir, checkpoint.read_marker(tag_dir))
    return [(name, region, offset) for name in names for region, offset in regions(tag_dir / name).items()]


# ----------------------------------------------------------------------------- what is recorded


def of_segments(path: Path, hash_bytes: Callable[[bytes], bytes]) -> bytes:
    """`hash_bytes` of the `hash_bytes` of a file's 64 MiB segments, computed here the plain way."""
    data = path.read_bytes()
    return hash_bytes(b"".join(hash_bytes(data[i:i + 2**26]) for i in range(0, max(len(data), 1), 2**26)))


def crc32_of_segments(path: Path) -> str:
    """A file's checksum as checksums.py documents it: the CRC-32 of the CRC-32s (4 bytes, big-endian) of its
    segments, as 8 hex digits."""
    return of_segments(path, lambda data: zlib.crc32(data).to_bytes(4, "big")).hex()


def sha256_of_segments(path: Path) -> str:
    """A file's digest as tags written before CRC-32 record it: SHA-256 of the SHA-256 digests of its segments."""
    return of_segments(path, lambda data: hashlib.sha256(data).digest()).hex()


def test_every_file_is_recorded_with_the_checksum_of_its_bytes(mae: Run, dino: Run) -> None:
    """The checksums taken while the files were written (and gathered from their owners) are those of the bytes on
    disk: the MAE file spans two segments, the DINO ZeRO-3 tag has six files from two ranks."""
    single = mae.tag() / "mp_rank_00_model_states.pt"  # 69 MiB: two segments
    assert single.stat().st_size > 2**26
    assert checkpoint.read_marker(mae.tag())[checksums.KEY]["files"] == {single.name: crc32_of_segments(single)}
    tag_dir = dino.tag()
    marker = checkpoint.read_marker(tag_dir)
    names = sorted(p.name for p in tag_dir.glob("*.pt"))
    assert len(names) == 6 and sorted(marker["files"]) == names
    assert (marker[checksums.KEY]["algorithm"], marker[checksums.KEY]["segment_bytes"]) == ("crc32", 2**26)
    assert marker[checksums.KEY]["files"] == {name: crc32_of_segments(tag_dir / name) for name in names}
    owners = {name: checksums.owner(name, 2) for name in names}
    assert owners == {"teacher_fp32_rank00000.pt": 0, "teacher_fp32_rank00001.pt": 1,
                      "zero_pp_rank_0_mp_rank_00_model_states.pt": 0, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 0,
                      "zero_pp_rank_1_mp_rank_00_model_states.pt": 1, "zero_pp_rank_1_mp_rank_00_optim_states.pt": 1}
    assert checksums.owner("zero_pp_rank_7_mp_rank_00_optim_states.pt", 4) == 3  # a bigger world's leftover
    assert checksums.owner("mp_rank_00_model_states.pt", 2) == checksums.owner("teacher_fp32.pt", 2) == 0


def test_a_tag_recorded_with_sha256_still_verifies_and_its_damage_is_found(mae: Run, tmp_path: Path) -> None:
    """Tags written before CRC-32 carry SHA-256 digests: the record names its algorithm, and that one is checked."""
    tag_dir = mae.copy(tmp_path).tag()
    marker = json.loads((tag_dir / checkpoint.MARKER).read_text())
    names = sorted(marker[checksums.KEY]["files"])
    marker[checksums.KEY] = {"algorithm": "sha256", "segment_bytes": 2**26,
                             "files": {name: sha256_of_segments(tag_dir / name) for name in names}}
    (tag_dir / checkpoint.MARKER).write_text(json.dumps(marker))
    assert checkpointing.verify(tag_dir) == "" and checkpoint.fault(tag_dir) == ""
    flip(tag_dir / names[0], (tag_dir / names[0]).stat().st_size // 2)
    said = f"{names[0]} does not match the sha256 checksum recorded when it was written"
    assert said in checkpointing.verify(tag_dir) and said in checkpoint.fault(tag_dir)
    marker[checksums.KEY]["algorithm"] = "sha999"
    (tag_dir / checkpoint.MARKER).write_text(json.dumps(marker))
    assert "its checksums are of a kind this version does not know ('sha999'" in checkpointing.verify(tag_dir)


def test_a_file_no_rank_hashed_keeps_the_tag_incomplete(mae: Run, tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(mae.tag(), ckpt / NEWEST)
    checkpoint.begin_save(ckpt / NEWEST)
    (ckpt / NEWEST / "stray.bin").write_bytes(b"x")  # appeared after the ranks listed the tag
    digests = [checksums.digests(ckpt / NEWEST, ["mp_rank_00_model_states.pt"])]
    with pytest.raises(RuntimeError, match="no rank hashed stray.bin"):
        checkpoint.mark_complete(ckpt, NEWEST, {}, digests)
    assert not checkpoint.is_complete(ckpt / NEWEST) and not (ckpt / "latest").exists()


# ----------------------------------------------------------------------------- the class of damage


@pytest.mark.parametrize("which", ["mae", "dino"])
def test_one_changed_byte_in_any_region_of_any_file_is_found_by_name(which: str, request: pytest.FixtureRequest,
                                                                     tmp_path: Path) -> None:
    run = request.getfixturevalue(which).copy(tmp_path)
    tag_dir = run.tag()
    assert checkpointing.verify(tag_dir) == "" and checkpoint.fault(tag_dir) == ""
    for name, region, offset in each_damage(tag_dir):
        flip(tag_dir / name, offset)
        said = f"{name} does not match the crc32 checksum recorded when it was written"
        assert said in checkpointing.verify(tag_dir), (name, region)  # resuming
        assert said in checkpoint.fault(tag_dir), (name, region)  # export, evaluation
        flip(tag_dir / name, offset)
    assert checkpointing.verify(tag_dir) == "" and checkpoint.fault(tag_dir) == ""


@pytest.mark.parametrize("which", ["mae", "dino"])
def test_a_tag_from_before_checksums_is_checked_by_its_zip_crcs_and_by_opening_it(
        which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    run = request.getfixturevalue(which).copy(tmp_path)
    tag_dir = run.tag()
    strip_checksums(tag_dir)
    assert checkpointing.verify(tag_dir) == "" and checkpoint.fault(tag_dir) == ""
    for name, region, offset in each_damage(tag_dir):
        flip(tag_dir / name, offset)
        why = checkpointing.verify(tag_dir)
        assert why.startswith(name) and ("fails its zip check" in why or "cannot be read" in why), (region, why)
        if region != "zip directory":  # the CRC-32s cover the members' bytes; export's loading covers the rest
            assert checkpoint.fault(tag_dir).startswith(f"{name} fails its zip check"), region
        flip(tag_dir / name, offset)


def test_what_torch_raises_for_a_damaged_file_is_told_from_a_checkpoint_of_another_shape(mae: Run,
                                                                                         tmp_path: Path) -> None:
    path = tmp_path / "states.pt"
    shutil.copy(mae.tag() / "mp_rank_00_model_states.pt", path)
    offsets = regions(path)
    for region in ("pickle", "zip directory"):
        flip(path, offsets[region])
        with pytest.raises(Exception) as raised:
            torch.load(path, map_location="cpu", weights_only=False)
        assert checksums.damage_error(raised.value), (region, raised.value)
        flip(path, offsets[region])
    with pytest.raises(RuntimeError) as raised:
        torch.nn.Linear(2, 3).load_state_dict(torch.nn.Linear(2, 4).state_dict())
    assert not checksums.damage_error(raised.value)  # "does not fit this config" stays for this


# ----------------------------------------------------------------------------- through the commands


def assert_resumed_past(stdout: str, run: Run, name: str, said: str, uninterrupted: Run) -> None:
    """The resume said in one line that the newest tag is damaged (naming `name`), resumed from the older one, set
    the damaged one aside, and logged the uninterrupted run's losses."""
    damaged = [line for line in stdout.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and re.fullmatch(rf"checkpoints: {NEWEST} is damaged: {re.escape(name)} {said}",
                                              damaged[0]), damaged
    assert f"resumed from {run.tag(OLDER).relative_to(run.workdir)} (step 2)" in stdout, stdout[-2000:]
    assert (run.run_dir / "checkpoints" / f"damaged_{NEWEST}").is_dir()
    assert checksums.recorded(checkpoint.read_marker(run.tag()))  # the step saved again, with checksums
    resumed, straight = read_metrics(run.run_dir), read_metrics(uninterrupted.run_dir)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-5, abs=1e-6), step


def test_resume_passes_over_a_changed_weight_and_repeats_the_uninterrupted_losses(mae: Run, tmp_path: Path) -> None:
    run = mae.copy(tmp_path)
    name = "mp_rank_00_model_states.pt"
    flip(run.tag() / name, regions(run.tag() / name)["tensor"])  # a silent change: it loads, with another weight
    stdout = run.resume()
    assert_resumed_past(stdout, run, name, r"does not match the crc32 checksum recorded when it was written "
                                           r"\(changed since\)", mae)


def test_two_ranks_agree_on_damage_that_only_rank_1_checks(dino: Run, tmp_path: Path) -> None:
    run = dino.copy(tmp_path)
    name = "teacher_fp32_rank00001.pt"  # rank 1's share: rank 0 never reads it before loading
    flip(run.tag() / name, regions(run.tag() / name)["tensor"])
    stdout = run.resume()
    assert_resumed_past(stdout, run, name, r"does not match the crc32 checksum recorded when it was written "
                                           r"\(changed since\)", dino)


def call(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """`largessl ARGV` in this process: (exit code, stderr lines)."""
    capsys.readouterr()
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def refusals(run: Run, shards: Path, capsys: pytest.CaptureFixture) -> dict[str, str]:
    """The one error line of `largessl export RUN_DIR` and of `largessl eval knn` on it, each exit code 2."""
    lines = {}
    for command, argv in (("export", ["export", str(run.run_dir)]),
                          ("knn", ["eval", "knn", "--checkpoint", str(run.run_dir), "--train", str(shards), "--val",
                                   str(shards), "--num-workers", "0"])):
        code, err = call(argv, capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("largessl: error: "), (command, code, err)
        lines[command] = err[0]
    assert not (run.run_dir / "export").exists() and not (run.run_dir / "eval").exists()  # no older tag used
    return lines


def test_export_and_knn_refuse_a_changed_file_and_name_the_older_step(mae: Run, dino: Run, mini_shards: Path,
                                                                      tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    for source, name in ((mae, "mp_rank_00_model_states.pt"), (dino, "teacher_fp32_rank00001.pt")):
        run = source.copy(tmp_path / source.name)
        flip(run.tag() / name, regions(run.tag() / name)["pickle"])
        lines = refusals(run, mini_shards, capsys)
        for command, arg in (("export", "export"), ("knn", "--checkpoint")):
            assert lines[command] == (
                f"largessl: error: {arg}: {run.tag()} is damaged: {name} does not match the crc32 checksum recorded "
                f"when it was written (changed since); --step 2 reads {OLDER}, the newest older complete checkpoint")
    code, err = call(["export", str(run.run_dir), "--step", "2"], capsys)  # what the line suggests works
    assert code == 0 and (run.run_dir / "export" / f"{OLDER}.safetensors").is_file(), err
    code, err = call(["eval", "knn", "--checkpoint", str(run.run_dir), "--step", "2", "--train", str(mini_shards),
                      "--val", str(mini_shards), "--num-workers", "0"], capsys)
    assert code == 0 and list((run.run_dir / "eval").glob("knn_step00000002.json")), err


def test_a_tag_from_before_checksums_resumes_and_its_damage_is_one_line(mae: Run, mini_shards: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    run = mae.copy(tmp_path)
    for tag in (NEWEST, OLDER):
        strip_checksums(run.tag(tag))
    name = "mp_rank_00_model_states.pt"
    flip(run.tag() / name, regions(run.tag() / name)["zip directory"])  # passes the zip CRC-32s; torch fails
    lines = refusals(run, mini_shards, capsys)  # the load's error, as one line
    for command, arg in (("export", "export"), ("knn", "--checkpoint")):
        assert re.fullmatch(rf"largessl: error: {arg}: {re.escape(str(run.tag()))} is damaged: {name} cannot be read "
                            rf"\(RuntimeError: PytorchStreamReader failed reading zip archive: .*\); --step 2 reads "
                            rf"{OLDER}, the newest older complete checkpoint", lines[command]), lines[command]
    stdout = run.resume()  # found before loading (torch opens each file): the older tag, from before checksums too
    assert "does not fit" not in stdout
    assert_resumed_past(stdout, run, name, r"cannot be read \(RuntimeError: PytorchStreamReader failed reading zip "
                                           r"archive: .*\)", mae)
    assert f"checkpoints: the 1 file(s) of {OLDER} match their zip CRC-32s (written before checksums)" in stdout


def test_the_cost_benchmark_runs_as_documented_on_a_small_recipe(tmp_path: Path) -> None:
    """benchmarks/checksum_cost.py (docs/benchmarks.md runs it on ViT-B and ViT-L) on the debug recipe, once: it
    writes a real checkpoint, and each timing it reports is of the files that checkpoint holds."""
    import subprocess
    import sys

    from conftest import REPO, child_env

    out = tmp_path / "cost.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "checksum_cost.py"), "--recipes",
                           "debug/mae_vit_tiny", "--repeats", "1", "--workdir", str(tmp_path / "work"), "--json",
                           str(out)], env=child_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["algorithm"] == "crc32" and result["hash_gb_per_s"]["crc32"]["1"] > 0
    (run,) = result["results"]
    assert run["recipe"] == "debug/mae_vit_tiny" and sorted(run["files"]) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert run["gb"] == pytest.approx(sum(run["files"].values()) / 1e9)
    assert all(seconds > 0 for seconds in run["best_s"].values()), run["best_s"]
    assert "| vit_tiny_patch16 (6M) | 1 | 2 |" in done.stdout

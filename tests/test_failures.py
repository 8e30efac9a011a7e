"""Failure paths of a training run, through the real command (DeepSpeed on CPU/gloo, real shards, real processes).

Each failure must end the job at once with one line and a non-zero exit, leave no process of the job alive,
and lose nothing that was saved: no hang, no silent restart, no non-finite checkpoint, no second job in one run
directory.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import child_env, command_line, free_port, job_processes, read_metrics, run_largessl

from largessl.checkpoint import newest_complete

DEBUG = ["pretrain", "--config", "debug/mae_vit_tiny"]
EXIT_BOUND = 60  # seconds from the failure to the end of the job, on 2 busy cores


def args(data: Path, name: str, *extra: str) -> list[str]:
    return [*DEBUG, f"data.train={data}", f"run.name={name}", "tracking.enabled=false", *extra]


def start(cmd_args: list[str], workdir: Path, nproc: int = 1) -> subprocess.Popen:
    """The command in a session of its own (so a test can kill its whole process group, as SLURM would)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "largessl", *cmd_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), "-m", "largessl", *cmd_args]
    return subprocess.Popen(cmd, cwd=workdir, env=child_env(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_line(job: subprocess.Popen, pattern: str, timeout: float = 300) -> list[str]:
    """Read the job's stdout up to a line matching `pattern`; the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    for line in job.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return lines
        assert time.monotonic() < deadline, "".join(lines)[-3000:]
    raise AssertionError(f"ended before {pattern!r}: {''.join(lines)[-3000:]} {job.stderr.read()[-3000:]}")


def finish(job: subprocess.Popen, bound: float = EXIT_BOUND) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a job that must end within `bound` seconds."""
    try:
        out, err = job.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        out, err = job.communicate()
        raise AssertionError(f"still running after {bound} s: {out[-2000:]} {err[-3000:]}") from None
    return job.returncode, out, err


def survivors(marker: str) -> list[str]:
    """Live processes whose command line holds `marker` (ranks, launchers, DataLoader workers)."""
    return [f"{pid}: {command_line(pid)[:200]}" for pid in job_processes(marker)]


def assert_none_left(marker: str, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while survivors(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not survivors(marker), survivors(marker)


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("largessl: error:")]
    assert lines, stderr[-3000:]
    return lines[0]


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def chattr(path: Path, flag: str) -> None:
    """Make a directory immutable (+i) or not (-i): 'read-only' even for root, which ignores permission bits."""
    result = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"chattr {flag} is not available here ({result.stderr.strip()})")


def imageless_dataset(src: Path, dst: Path) -> Path:
    """The dataset's shards with every image member removed (labels and metadata kept)."""
    copy_dataset(src, dst)
    for shard in dst.glob("train-*.tar"):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar if not m.name.endswith(".jpg")]
        with tarfile.open(shard, "w") as tar:
            for member, data in members:
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return dst


# ----------------------------------------------------------------------------- errors end the job at once


def truncate_shards(data: Path, names: list[str] | None = None) -> None:
    for shard in sorted(data.glob("train-*.tar")):
        if names is None or shard.name in names:
            os.truncate(shard, shard.stat().st_size * 6 // 10)


@pytest.mark.parametrize("case", ["truncated", "deleted-after-start", "no-image-member", "checkpoint-unwritable"])
def test_an_error_after_workers_start_ends_the_job(case: str, mini_shards: Path, tmp_path: Path) -> None:
    data = copy_dataset(mini_shards, tmp_path / "data")
    if case == "truncated":
        truncate_shards(data)
    if case == "no-image-member":
        imageless_dataset(mini_shards, data.with_name("bare"))
        data = data.with_name("bare")
    marker = f"run.name=fail-{case}"
    job = start(args(data, f"fail-{case}", "data.num_workers=2", "trainer.max_steps=200", "trainer.log_every=1",
                     "trainer.ckpt_every=4"), tmp_path)
    if case == "deleted-after-start":
        wait_for_line(job, r"^step 1/")
        for shard in data.glob("train-*.tar"):
            shard.unlink()
    if case == "checkpoint-unwritable":
        wait_for_line(job, r"^step 1/")
        chattr(tmp_path / "runs" / f"fail-{case}" / "checkpoints", "+i")
    try:
        code, _, err = finish(job)
    finally:
        if case == "checkpoint-unwritable":
            chattr(tmp_path / "runs" / f"fail-{case}" / "checkpoints", "-i")
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = error_line(err)
    expected = {"truncated": r"shard \S+train-\d+\.tar is damaged", "deleted-after-start": r"missing shard \S+\.tar",
                "no-image-member": r"no decodable image in the whole training split",
                "checkpoint-unwritable": r"Operation not permitted.*checkpoints"}[case]
    assert re.search(expected, line), line
    assert_none_left(marker)


def test_an_error_on_one_of_two_ranks_ends_both(mini_shards: Path, tmp_path: Path) -> None:
    # One truncated shard: whichever rank reads it fails; the other, waiting in a collective, must not hang.
    data = copy_dataset(mini_shards, tmp_path / "data")
    truncate_shards(data, ["train-000001.tar"])
    job = start(args(data, "one-rank", "data.num_workers=1", "data.micro_batch_size=16", "optim.global_batch_size=32",
                     "distributed.zero_stage=2", "trainer.max_steps=200", "trainer.log_every=1"), tmp_path, nproc=2)
    code, _, err = finish(job, bound=120)
    assert code != 0
    assert re.search(r"largessl: error: \[rank \d\] shard \S+train-000001\.tar is damaged", err), err[-3000:]
    assert_none_left("run.name=one-rank")


def test_killing_torchrun_leaves_no_rank_and_the_rerun_resumes(mini_shards: Path, tmp_path: Path) -> None:
    common = args(mini_shards, "orphans", "data.num_workers=1", "data.micro_batch_size=16",
                  "optim.global_batch_size=32", "distributed.zero_stage=2", "trainer.max_steps=8",
                  "trainer.log_every=1", "trainer.ckpt_every=2")
    job = start(common, tmp_path, nproc=2)
    wait_for_line(job, r"^step 3/")
    os.killpg(job.pid, signal.SIGKILL)  # torchrun's process group: the ranks run in sessions of their own
    job.wait(timeout=30)
    assert_none_left("run.name=orphans", within=15)
    result = run_largessl(common, tmp_path, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"resumed from \S+step_0000000[24] ", result.stdout), result.stdout[-2000:]
    assert sorted(read_metrics(tmp_path / "runs" / "orphans")) == list(range(1, 9))


# ----------------------------------------------------------------------------- the run lock, duplicate metrics


def progress(run: Path) -> tuple[int, int]:
    """(step of the newest complete checkpoint, last step in metrics.jsonl) of a run directory. Complete, as resuming
    sees it: a kill after a checkpoint's marker but before `latest` moves leaves that checkpoint the one to resume."""
    tag = newest_complete(run / "checkpoints") if (run / "checkpoints").is_dir() else ""
    saved = int(tag[5:]) if tag else 0
    return saved, max(read_metrics(run), default=0)


def kill_between_checkpoints(job: subprocess.Popen, run: Path) -> tuple[int, int]:
    """SIGKILL a job at a moment when it has logged steps after its newest checkpoint: frozen first (SIGSTOP), so
    what is on disk is what the kill leaves. Returns that (checkpoint step, last logged step)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        saved, logged = progress(run)
        if saved and logged > saved:
            os.killpg(job.pid, signal.SIGSTOP)
            time.sleep(0.2)  # a write in flight lands
            saved, logged = progress(run)
            if logged > saved:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait(timeout=30)
                return saved, logged
            os.killpg(job.pid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError("the job never logged a step after a checkpoint")


def test_run_directory_is_locked_and_a_dead_holder_never_blocks(mini_shards: Path, tmp_path: Path) -> None:
    common = args(mini_shards, "locked", "trainer.max_steps=400", "trainer.log_every=1", "trainer.ckpt_every=3")
    first = start(common, tmp_path)
    wait_for_line(first, r"^step 4/")
    second = run_largessl(common, tmp_path, timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    line = second.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"largessl: error: run directory \S+locked is in use by pid {first.pid} on \S+, since .*; "
                        "wait for that job to end or choose another run.name", line), line
    run = tmp_path / "runs" / "locked"
    saved, logged = kill_between_checkpoints(first, run)  # a dead holder: its lock must not block the resume
    resumed = run_largessl([*common, f"trainer.max_steps={logged + 2}"], tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {saved})" in resumed.stdout, resumed.stdout[-2000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in records if "loss" in record]
    assert [(r["step"], r["resumes"]) for r in records if "resumes" in r] == [(saved, 1)]  # the restart, once
    assert steps == list(range(1, logged + 3)), steps  # replaced, not repeated


# ----------------------------------------------------------------------------- divergence


def all_finite(tag_dir: Path) -> bool:
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return all(torch.isfinite(v).all() for v in states["module"].values() if torch.is_tensor(v))


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(mini_shards: Path, tmp_path: Path) -> None:
    common = args(mini_shards, "nan", "trainer.log_every=5", "trainer.ckpt_every=1", "trainer.keep_last=1",
                  "optim.warmup_steps=0")
    assert run_largessl([*common, "trainer.max_steps=2"], tmp_path).returncode == 0
    ckpt = tmp_path / "runs" / "nan" / "checkpoints"
    result = run_largessl([*common, "trainer.max_steps=40", "optim.base_lr=1e9"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"largessl: error: .* was not finite \(NaN or inf\) at step \d+: training diverged and "
                        r"stopped; the newest checkpoint, step_\d{8}, is from before it\. .*", line), line
    bad_step = int(re.search(r"at step (\d+)", line)[1])
    tags = sorted(p.name for p in ckpt.glob("step_*"))
    latest = (ckpt / "latest").read_text().strip()
    assert latest == tags[-1] and int(latest[5:]) < bad_step, (tags, latest, line)
    assert all(all_finite(ckpt / tag) for tag in tags)
    assert not (tmp_path / "runs" / "nan" / "checkpoints" / f"step_{bad_step:08d}").exists()


# ----------------------------------------------------------------------------- finding the checkpoint to resume


def three_checkpoints(mini_shards: Path, tmp_path: Path, name: str) -> tuple[list[str], Path]:
    common = args(mini_shards, name, "trainer.max_steps=3", "trainer.log_every=1", "trainer.ckpt_every=1",
                  "trainer.keep_last=3")
    assert run_largessl(common, tmp_path).returncode == 0
    return common, tmp_path / "runs" / name / "checkpoints"


def resume_to(common: list[str], tmp_path: Path, steps: int) -> subprocess.CompletedProcess:
    return run_largessl([*common, f"trainer.max_steps={steps}"], tmp_path)


def test_missing_dangling_or_empty_latest_resumes_from_the_newest_complete(mini_shards: Path, tmp_path: Path) -> None:
    common, ckpt = three_checkpoints(mini_shards, tmp_path, "latest")
    (ckpt / "latest").unlink()
    (ckpt / "step_00000009").mkdir()  # a tag a killed job began to write: never chosen
    result = resume_to(common, tmp_path, 4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoints: step_00000009 was never completely written (ignored)" in result.stdout
    assert "checkpoints/latest is missing or names no checkpoint; the newest complete checkpoint is step_00000003" \
        in result.stdout
    assert "resumed from" in result.stdout and "(step 3)" in result.stdout
    for step, content in ((4, "step_00000042"), (5, "")):  # dangling, then empty
        (ckpt / "latest").write_text(content)
        result = resume_to(common, tmp_path, step + 1)
        assert result.returncode == 0 and f"(step {step})" in result.stdout, result.stdout[-2000:] + result.stderr
        assert (ckpt / "latest").read_text() == f"step_{step + 1:08d}"
    assert not (ckpt / "step_00000009").exists()  # pruned once a new checkpoint completed


def test_damaged_newest_checkpoint_falls_back_and_none_usable_refuses(mini_shards: Path, tmp_path: Path) -> None:
    common, ckpt = three_checkpoints(mini_shards, tmp_path, "damaged")
    model = ckpt / "step_00000003" / "mp_rank_00_model_states.pt"
    os.truncate(model, model.stat().st_size // 2)
    result = resume_to(common, tmp_path, 4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"checkpoints: step_00000003 is damaged: mp_rank_00_model_states\.pt is \d+ bytes, \d+ when "
                     r"written", result.stdout), result.stdout[-2000:]
    assert "(step 2)" in result.stdout and (ckpt / "damaged_step_00000003").is_dir()
    assert read_metrics(tmp_path / "runs" / "damaged")[4]["loss"] > 0
    for tag in ckpt.glob("step_*"):  # every checkpoint damaged: refuse instead of starting over
        states = tag / "mp_rank_00_model_states.pt"
        os.truncate(states, 100)
    result = resume_to(common, tmp_path, 6)
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("largessl: error: runs/damaged/checkpoints holds checkpoints but none can be read (") and \
        "refusing to start over on top of them" in line, line
    assert "Traceback" not in result.stderr


def test_resume_with_another_zero_stage_is_one_line(mini_shards: Path, tmp_path: Path) -> None:
    common, ckpt = three_checkpoints(mini_shards, tmp_path, "stage")
    result = run_largessl([*common, "distributed.zero_stage=2", "trainer.max_steps=4"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line == ("largessl: error: runs/stage/checkpoints/step_00000003 was written at ZeRO stage 0 and this run "
                    "asks for distributed.zero_stage=2; DeepSpeed cannot load a checkpoint into another stage: resume "
                    "with distributed.zero_stage=0, or choose another run.name"), line


# ----------------------------------------------------------------------------- one line, not a traceback


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_bad_run_paths_are_one_line(mini_shards: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    for extra, expected in [
        (["run.name=../escape"], "run.name: '../escape' must be one directory name inside run.output_dir"),
        (["run.name=/abs"], "run.name: '/abs' must be one directory name inside run.output_dir"),
        (["run.output_dir=afile"], "run.output_dir: 'afile' is a file, not a directory"),
        (["run.output_dir=.", "run.name=afile"], "run directory 'afile' exists and is not a directory"),
    ]:
        line = one_line_error(run_largessl(args(mini_shards, "x", *extra), tmp_path))
        assert expected in line, line
    assert not (tmp_path.parent / "escape").exists() and not Path("/abs").exists()


def test_read_only_run_directory_is_one_line(mini_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "ro"
    run.mkdir(parents=True)
    chattr(run, "+i")
    try:
        line = one_line_error(run_largessl(args(mini_shards, "ro"), tmp_path))
    finally:
        chattr(run, "-i")
    assert re.fullmatch(r"largessl: error: cannot write to \S+ro(/checkpoints)? \(.*\); make it writable or choose "
                        r"another run\.output_dir", line), line


def hostile_index(mini_shards: Path, dst: Path, file: str) -> Path:
    data = copy_dataset(mini_shards, dst)
    index = json.loads((data / "dataset.json").read_text())
    index["splits"]["train"]["shards"][0]["file"] = file
    (data / "dataset.json").write_text(json.dumps(index))
    return data


def test_shard_entries_outside_the_dataset_are_refused(mini_shards: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.tar"
    shutil.copy(mini_shards / "train-000000.tar", outside)
    for n, file in enumerate(["../outside.tar", str(outside), "link.tar"]):
        data = hostile_index(mini_shards, tmp_path / f"d{n}", file)
        (data / "link.tar").symlink_to(outside)
        line = one_line_error(run_largessl(args(data, f"h{n}"), tmp_path))
        assert line.startswith(f"largessl: error: data.train: {data / 'dataset.json'}: shard entry "), line
        assert "refusing to read it" in line and (repr(file) in line or "symlink" in line), line


def test_shards_that_yield_no_samples_stop_instead_of_spinning(tmp_path: Path) -> None:
    data = tmp_path / "empty"
    data.mkdir()
    for n in range(2):
        with tarfile.open(data / f"train-{n:06d}.tar", "w"):
            pass
    shards = [{"file": f"train-{n:06d}.tar", "num_samples": 250, "bytes": 0, "sha256": ""} for n in range(2)]
    (data / "dataset.json").write_text(json.dumps({"format": "largessl-wds/1", "classes": ["a"], "splits": {
        "train": {"num_samples": 500, "shards": shards}}}))
    for extra, expected in [([], r"shard \S+train-00000\d\.tar holds 0 samples but dataset\.json says 250"),
                            (["data.resampled=true"], r"the shards of \S+empty yield no samples at all")]:
        started = time.monotonic()
        line = one_line_error(run_largessl(args(data, "spin", "data.num_workers=1", *extra), tmp_path, timeout=120))
        assert re.search(expected, line), line
        assert time.monotonic() - started < 60


def test_timed_checkpoint_killed_mid_write_is_never_resumed_from(mini_shards: Path, tmp_path: Path) -> None:
    # trainer.ckpt_every_minutes alone (ckpt_every far away) saves at the checks every 10 steps; the job is
    # SIGKILLed while its second checkpoint is being written: the rerun resumes from the first.
    common = args(mini_shards, "midwrite", "data.num_workers=0", "data.micro_batch_size=16",
                  "optim.global_batch_size=16", "trainer.log_every=10", "trainer.ckpt_every=1000",
                  "trainer.ckpt_every_minutes=0.0001")
    job = start([*common, "trainer.max_steps=100"], tmp_path)
    ckpt = tmp_path / "runs" / "midwrite" / "checkpoints"
    deadline = time.monotonic() + 300
    while not any((ckpt / "step_00000020").glob("*.pt")):
        assert time.monotonic() < deadline and job.poll() is None, job.stderr.read()[-3000:] if job.poll() else ""
        time.sleep(0.001)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    assert (ckpt / "step_00000010" / "complete.json").is_file()
    assert not (ckpt / "step_00000020" / "complete.json").is_file()  # killed mid-write
    result = run_largessl([*common, "trainer.max_steps=12"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoints: step_00000020 was never completely written (ignored)" in result.stdout
    assert "(step 10)" in result.stdout and "resumed from" in result.stdout

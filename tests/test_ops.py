"""DeepSpeed's JIT ops (largessl/distributed/ops.py): built in this installation, one line when a start builds.

Real DeepSpeed and torch builds throughout. The default tests use the venv's own build directory (what
`make install` fills; built here first if needed) or copies of it; the slow one builds from nothing."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from largessl.distributed import ops

REPO = Path(__file__).resolve().parents[1]
SHM = "deepspeed_shm_comm"
WHAT = f"DeepSpeed's CPU communication op ({SHM})"
IN_VENV = sys.prefix != sys.base_prefix


def child_env(extensions: Path | None) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop(ops.EXTENSIONS_ENV, None)
    if extensions is not None:
        env[ops.EXTENSIONS_ENV] = str(extensions)
    return env


def run_ops(extensions: Path | None, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m largessl.distributed.ops` (what `make install` runs) against `extensions`."""
    return subprocess.run([sys.executable, "-m", "largessl.distributed.ops"], env=child_env(extensions),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="session")
def built_dir() -> Path:
    """This installation's extensions directory with the comm op built (a no-op once `make install` ran)."""
    directory = ops.installation_dir() or pytest.skip("needs a virtual or conda environment")
    result = run_ops(directory, timeout=900)
    assert result.returncode == 0, result.stderr
    assert (directory / SHM / f"{SHM}.so").is_file()
    return directory


def copy_of(built: Path, tmp_path: Path) -> Path:
    shutil.copytree(built / SHM, tmp_path / SHM, ignore=shutil.ignore_patterns("lock"))  # keeps mtimes
    return tmp_path


# ----------------------------------------------------------------- where ops are built


@pytest.mark.skipif(not IN_VENV, reason="needs a virtual environment")
def test_a_venv_builds_in_its_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ops.EXTENSIONS_ENV, raising=False)
    chosen = ops.use_installation_dir()
    assert chosen == os.environ[ops.EXTENSIONS_ENV] == str(Path(sys.prefix) / "torch_extensions")
    assert ops.build_dir(SHM) == Path(sys.prefix) / "torch_extensions" / SHM  # what torch's load() will use


def test_the_users_directory_is_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ops.EXTENSIONS_ENV, str(tmp_path))
    assert ops.use_installation_dir() == str(tmp_path)
    assert ops.build_dir(SHM) == tmp_path / SHM


@pytest.mark.skipif(not IN_VENV, reason="needs a virtual environment")
def test_deepspeed_builds_where_largessl_points_it() -> None:
    """Set before DeepSpeed's first load: torch, asked after `import deepspeed` through the engine, agrees."""
    code = ("from largessl.distributed import engine; engine._deepspeed()\n"
            "from torch.utils.cpp_extension import _get_build_directory\n"
            f"print(_get_build_directory({SHM!r}, False))")
    result = subprocess.run([sys.executable, "-c", code], env=child_env(None), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(Path(sys.prefix) / "torch_extensions" / SHM)


# ----------------------------------------------------------------- what a start prints


def test_a_start_with_the_op_built_prints_nothing_about_it(built_dir: Path) -> None:
    code = ("from largessl.distributed.config import DistributedConfig\n"
            "from largessl.distributed.engine import init_distributed\n"
            "env = init_distributed(DistributedConfig(precision='fp32'))\n"
            "import torch.distributed as dist; print('world', dist.get_world_size()); dist.destroy_process_group()")
    result = subprocess.run([sys.executable, "-c", code], env=child_env(built_dir), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "world 1\n"  # no build line, no "built successfully"
    assert "No CUDA runtime is found" not in result.stderr


def test_a_stale_build_is_announced_before_it_is_rebuilt(built_dir: Path, tmp_path: Path) -> None:
    extensions = copy_of(built_dir, tmp_path)
    library = extensions / SHM / f"{SHM}.so"
    os.utime(library, (0, 0))  # older than its objects: ninja relinks it (a second)
    first = run_ops(extensions)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0] == f"building {WHAT} in {extensions}: {ops.STALE} ({ops.OPS['comm'].estimate})"
    assert lines[1].startswith(f"{WHAT} ready after ") and len(lines) == 2
    assert library.stat().st_mtime > 0
    again = run_ops(extensions)
    assert again.returncode == 0 and again.stdout == "", again.stdout + again.stderr


def test_a_build_held_by_another_process_is_waited_for_with_one_line(built_dir: Path, tmp_path: Path) -> None:
    extensions = copy_of(built_dir, tmp_path)
    lock = extensions / SHM / "lock"
    hold = "from filelock import FileLock; import sys\nwith FileLock(sys.argv[1]):\n print('held'); sys.stdin.read()"
    holder = subprocess.Popen([sys.executable, "-u", "-c", hold, str(lock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    waiter = None
    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = subprocess.Popen([sys.executable, "-m", "largessl.distributed.ops"], env=child_env(extensions),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        assert select.select([waiter.stdout], [], [], 60)[0], "no line while the lock is held"
        first = waiter.stdout.readline().rstrip("\n")
        assert first == f"waiting for another process that is building {WHAT} in {extensions} (lock file {lock})"
        assert waiter.poll() is None  # still waiting on torch's lock
        holder.stdin.close()
        rest, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0, err
        assert rest.splitlines()[0].startswith(f"{WHAT} ready after ") and len(rest.splitlines()) == 1
    finally:
        for process in (holder, waiter):
            if process is not None and process.poll() is None:
                process.kill()


def test_only_deepspeeds_built_notice_is_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    with ops.without_built_notice():
        print("before")
        print(f"DeepSpeed deepspeed.ops.comm.{SHM}_op built successfully")
        print("after")
    assert capsys.readouterr().out == "before\nafter\n"


@pytest.mark.slow
def test_a_first_build_says_so_before_it_starts_and_a_second_start_is_silent(tmp_path: Path) -> None:
    library = tmp_path / SHM / f"{SHM}.so"
    builder = subprocess.Popen([sys.executable, "-m", "largessl.distributed.ops"], env=child_env(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        first = builder.stdout.readline().rstrip("\n")
        assert first == (f"building {WHAT} in {tmp_path}: {ops.NOT_BUILT} (once, {ops.OPS['comm'].estimate})")
        assert not library.exists()  # the line came before the build
        rest, err = builder.communicate(timeout=900)
    finally:
        if builder.poll() is None:
            builder.kill()
    assert builder.returncode == 0, err
    assert rest.splitlines()[0].startswith(f"{WHAT} ready after ") and len(rest.splitlines()) == 1
    assert library.is_file()
    again = run_ops(tmp_path)
    assert again.returncode == 0 and again.stdout == "", again.stdout + again.stderr

"""Shared fixtures: real images (Imagenette from ../shared, the bundled mini set), real shards, CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from data_tools.shards import SplitWriter, write_index

REPO = Path(__file__).resolve().parents[1]
IMAGENETTE_TAR = REPO.parent / "shared" / "data" / "imagenette2-224" / "imagenette2-224.tar.gz"
MINI_IMAGES = REPO / "demo" / "imagenette-mini"
pytest_plugins = ["slurm_cluster", "slurm_nodes"]  # session fixtures: real one-node and multi-node SLURM clusters


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


CLASSES = sorted(p.name for p in (MINI_IMAGES / "train").iterdir())


def uneven_dataset(out: Path, sizes: list[int], corrupt_at: int | None = None) -> Path:
    """Shards of the given sizes holding the bundled real images; sample `corrupt_at` gets truncated JPEG bytes."""
    files = sorted((MINI_IMAGES / "train").rglob("*.JPEG"))
    out.mkdir(parents=True)
    writer = SplitWriter(out, "train", samples_per_shard=10**9, shard_bytes=1 << 40)
    position = 0
    for size in sizes:
        for _ in range(size):
            path = files[position % len(files)]
            data = path.read_bytes()
            if position == corrupt_at:
                data = data[: len(data) // 3]
            writer.write(f"s{position:05d}", data, CLASSES.index(path.parent.name), {"source": path.name})
            position += 1
        writer.end_shard()  # one shard per requested size
    write_index(out, name="test", source="test", classes=CLASSES, split="train", split_entry=writer.finish(),
                preprocess={})
    return out


def write_shards(src: Path, out: Path, split: str, per_shard: int | None, *options: str) -> Path:
    """`data_tools imagefolder` of one split (per_shard None: the converter's default shard size)."""
    from data_tools.__main__ import main

    sizing = ["--samples-per-shard", str(per_shard)] if per_shard else []
    assert main(["imagefolder", str(src), str(out), "--split", split, *sizing, "--workers", "2", *options]) == 0
    return out


@pytest.fixture(scope="session")
def mini_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled 500 train + 200 val Imagenette images (112 px) as shards of 128 samples."""
    out = tmp_path_factory.mktemp("mini") / "shards"
    write_shards(MINI_IMAGES / "train", out, "train", 128)
    return write_shards(MINI_IMAGES / "val", out, "val", 128)


@pytest.fixture(scope="session")
def imagenette_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """../shared's Imagenette (9,469 train + 3,925 val JPEGs, 224 px), unpacked once per session."""
    if not IMAGENETTE_TAR.is_file():
        pytest.skip(f"needs the Imagenette test data {IMAGENETTE_TAR} (../shared beside the checkout; README)")
    out = tmp_path_factory.mktemp("imagenette")
    with tarfile.open(IMAGENETTE_TAR) as tar:
        tar.extractall(out, filter="data")
    return out / "imagenette2-224"


@pytest.fixture(scope="session")
def imagenette_shards(imagenette_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imagenette-shards") / "shards"
    write_shards(imagenette_dir / "train", out, "train", 1000)
    return write_shards(imagenette_dir / "val", out, "val", 1000)


@pytest.fixture(scope="session")
def imagenette_112(imagenette_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full Imagenette shrunk to at most 112 px (`--max-size 112`, as docs/benchmarks.md): about 40 s."""
    out = tmp_path_factory.mktemp("imagenette-112") / "shards"
    write_shards(imagenette_dir / "train", out, "train", None, "--max-size", "112")
    return write_shards(imagenette_dir / "val", out, "val", None, "--max-size", "112")


def child_env(workdir: Path) -> dict[str, str]:
    """Environment for a largessl child process: its MLflow store and run directories live in `workdir`."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    return env


def run_largessl(args: list[str], workdir: Path, *, nproc: int = 1, timeout: int = 600,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m largessl ARGS` (or under torchrun with `nproc` processes on the gloo backend)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "largessl", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "largessl", *args]
    return subprocess.run(cmd, cwd=workdir, env=env or child_env(workdir), capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl of a run: step -> every metric logged at it (the latest value of each)."""
    import json

    records: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.setdefault(record["step"], {}).update(record)
    return records


@contextmanager
def serve_mlflow(root: Path, backend_uri: str) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 over `backend_uri` (artifacts under `root`); yields its URL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend_uri, "--artifacts-destination", str(root / "art")],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("mlflow server did not start")
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def _proc_text(pid: int | str, name: str) -> str:
    try:
        return (Path("/proc") / str(pid) / name).read_bytes().replace(b"\0", b"\n").decode(errors="replace")
    except OSError:
        return ""


def command_line(pid: int) -> str:
    return _proc_text(pid, "cmdline").replace("\n", " ")


def job_processes(marker: str) -> list[int]:
    """Pids of the live processes (not zombies) whose command line holds `marker` (a job's ranks, workers,
    launcher), not this one."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) != os.getpid()]
    return [pid for pid in pids if marker in command_line(pid)
            and _proc_text(pid, "stat").rsplit(") ", 1)[-1].split()[:1] not in ([], ["Z"])]


def rank_process(marker: str, rank: int) -> int | None:
    """The pid of training rank `rank` of the job whose command line holds `marker` (RANK or SLURM_PROCID in its
    environment), not one of its DataLoader workers (forked: their parent has their command line) nor a launcher."""
    for pid in job_processes(marker):
        cmdline, env = _proc_text(pid, "cmdline"), _proc_text(pid, "environ").split("\n")
        parent = _proc_text(pid, "stat").rsplit(")", 1)[-1].split()[1:2]
        program = Path(cmdline.split("\n", 1)[0]).name
        if not program.startswith("python") or "-m\nlargessl\n" not in cmdline or not parent:
            continue  # srun, torchrun (python -m torch.distributed.run ...) and the batch shell are not ranks
        if _proc_text(parent[0], "cmdline") != cmdline and (f"RANK={rank}" in env or f"SLURM_PROCID={rank}" in env):
            return pid
    return None


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (its SigCgt mask in /proc): a signal sent before that kills
    it by the default action, the interpreter's first milliseconds, which no program can cover."""
    for line in _proc_text(pid, "status").splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False

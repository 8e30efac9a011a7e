"""MAE ViT-Tiny on the demo shards with torch's default thread count against largessl's choice (largessl/cpus.py),
side by side on a machine kept busy by other processes, as a shared node is.

    python benchmarks/threads_under_load.py [--data demo/shards] [--steps 60] [--rounds 2] [--load 1]

Each round runs both, one after the other, while `--load` busy-looping processes hold CPUs; the speed of a run is
the median images/s of its progress lines after the first (the first holds the start-up). Torch's default is
what `torch.get_num_threads()` gives with OMP_NUM_THREADS unset, passed explicitly; largessl's choice is what the
command takes with it unset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEED = re.compile(r"^step \d+/\d+ \| .*? \| ([\d.]+) img/s", re.M)


def torch_default_threads() -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                           capture_output=True, text=True, check=True)
    return int(probe.stdout.strip())


def run_once(data: str, steps: int, threads: int | None, workdir: Path) -> tuple[float, str]:
    """(median images/s after the first progress line, the start-up's CPU threads line)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "largessl", "pretrain", "--config", "debug/mae_vit_tiny", f"data.train={data}",
               f"trainer.max_steps={steps}", "trainer.log_every=10", "tracking.enabled=false",
               f"run.output_dir={workdir}", f"run.name=t{threads}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(f"run failed ({done.returncode}): {done.stderr[-2000:]}")
    speeds = [float(v) for v in SPEED.findall(done.stdout)]
    said = next(line for line in done.stdout.splitlines() if line.startswith("CPU threads"))
    return statistics.median(speeds[1:] if len(speeds) > 1 else speeds), said


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "demo" / "shards"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--load", type=int, default=1, help="busy-looping processes beside the runs")
    args = parser.parse_args()
    default = torch_default_threads()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    results: dict[str, list[float]] = {f"torch default ({default} threads)": [], "largessl's choice": []}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for round_ in range(args.rounds):
                for (name, threads) in ((f"torch default ({default} threads)", default), ("largessl's choice", None)):
                    speed, said = run_once(args.data, args.steps, threads, Path(scratch) / f"r{round_}")
                    results[name].append(speed)
                    print(f"round {round_ + 1}, {name}: {speed:.1f} img/s ({said})", flush=True)
    finally:
        for hog in hogs:
            hog.kill()
    summary = {name: statistics.median(values) for name, values in results.items()}
    print(json.dumps({"load": args.load, "steps": args.steps, "median_images_per_sec": summary}))


if __name__ == "__main__":
    main()

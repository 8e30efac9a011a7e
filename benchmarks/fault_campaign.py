"""A fault campaign: a two-rank job (torchrun, gloo, CPU) is hit, round after round, by a SIGKILL of one rank or a
SIGTERM/SIGUSR1 to one rank, at a random step and phase (reading data, forward/backward, optimizer step, EMA update,
checkpoint write, MLflow delivery), and resumed by rerunning the same command. At the end the run is finished
without faults and its metrics.jsonl must hold every step once, with losses equal step for step to an uninterrupted
run's; and no process of the job may be left after any round.

    python benchmarks/fault_campaign.py --method dino --zero 3 --rounds 30 --data demo/shards --workdir /tmp/fc

A round survives when its job ended within the bound (no hang), as the fault says (a stop signal: both ranks
exit 128 + the signal after a checkpoint of the step they stopped at; SIGKILL: a non-zero exit), with no traceback
of ours and no process left, and the next job resumed from the newest complete checkpoint. Prints one line per
round and `rounds survived: N/M`, then the final check; exit 0 only when every round survived and the final check
passed. The data: any shard dataset, e.g. `make demo`'s demo/shards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CKPT_EVERY = 3
SMALL = ["model.image_size=32", "data.micro_batch_size=8", "optim.global_batch_size=16", "data.num_workers=1",
         "trainer.log_every=1", f"trainer.ckpt_every={CKPT_EVERY}", "trainer.ckpt_every_minutes=0",
         "tracking.experiment=faults"]
METHODS = {
    "mae": ["--config", "debug/mae_vit_tiny"],
    "dino": ["--config", "debug/dino_vit_tiny", "objective.local_crop_size=16", "objective.local_crops=2",
             "objective.out_dim=1024", "objective.freeze_last_layer_steps=1"],
}
PHASES = ("reading data", "forward/backward", "optimizer step", "EMA update", "checkpoint write", "MLflow delivery")
SIGNALS = ("SIGKILL", "SIGTERM", "SIGUSR1")
BOUND_S = 240  # one job, start to end, on 2 busy cores


def command(args: argparse.Namespace, name: str, max_steps: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "largessl", "pretrain", *METHODS[args.method], *SMALL,
            f"distributed.zero_stage={args.zero}", f"data.train={args.data}", f"run.name={name}",
            f"trainer.max_steps={max_steps}", f"tracking.uri=sqlite:///{args.workdir}/mlflow.db"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(args: argparse.Namespace, name: str, max_steps: int, fault: str = "") -> tuple[int, str, float]:
    """(exit code, output, seconds) of one job; a job past BOUND_S is killed (exit code -9: a hang)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("LARGESSL_FAULT", None)
    if fault:
        env["LARGESSL_FAULT"] = fault
    started = time.monotonic()
    job = subprocess.Popen(command(args, name, max_steps), cwd=args.workdir, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = job.communicate(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        out, _ = job.communicate()
        return -9, out, time.monotonic() - started
    return job.returncode, out, time.monotonic() - started


def survivors(marker: str) -> list[int]:
    """Live processes (not zombies) whose command line holds `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(") ", 1)[-1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def newest_complete(run: Path) -> int:
    steps = [int(p.parent.name[5:]) for p in (run / "checkpoints").glob("step_*/complete.json")]
    return max(steps, default=0)


def resumed_from(out: str) -> int:
    found = re.search(r"resumed from .* \(step (\d+)\)", out)
    return int(found[1]) if found else 0


def pick_fault(rng: random.Random, args: argparse.Namespace, start: int) -> dict[str, str]:
    phases = [p for p in PHASES if p != "EMA update" or args.method == "dino"]
    phase = rng.choice(phases)
    rank = "0" if phase == "MLflow delivery" else rng.choice("01")
    step = start + rng.randint(1, 5)
    if phase == "checkpoint write":  # the next step that writes one (trainer.ckpt_every=3)
        step = start + CKPT_EVERY - start % CKPT_EVERY
    return {"rank": rank, "step": str(step), "phase": phase, "signal": rng.choice(SIGNALS),
            "delay": f"{rng.uniform(0, 0.3):.2f}"}


def judge_round(fault: dict[str, str], code: int, out: str, before: int, after: int) -> str:
    """'' when the job ended as the fault says, else what went wrong."""
    if code == -9:
        return f"still running after {BOUND_S} s (a hang)"
    if re.search(r'File ".*/largessl/', out):  # torchrun prints a traceback of its own when a rank fails
        return "a traceback from largessl"
    if fault["signal"] == "SIGKILL":
        return "" if code != 0 else "exit 0 after a SIGKILL"
    signum = int(signal.Signals[fault["signal"]])
    stopped = re.search(rf"stopped by {fault['signal']} at step (\d+)", out)
    if code == 0 and not stopped:
        return ""  # the fault came after the last step or did not fire: nothing to check
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", out)  # torchrun's report of each failed rank
    if not stopped or set(codes) != {str(128 + signum)} or len(codes) < 2:
        return f"rank exit codes {codes}, {'a' if stopped else 'no'} 'stopped by {fault['signal']} at step' line"
    return "" if after == int(stopped[1]) else f"stopped at step {stopped[1]} but the newest checkpoint is {after}"


def campaign(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    max_steps = 6 + 5 * args.rounds
    name = f"faults-{args.method}-z{args.zero}"
    reference = f"{name}-reference"
    code, out, seconds = run_job(args, reference, max_steps)
    if code:
        print(out[-3000:])
        print(f"the uninterrupted reference run failed (exit {code})")
        return 2
    print(f"reference: {max_steps} steps in {seconds:.0f} s", flush=True)
    run = Path(args.workdir) / "runs" / name
    survived = 0
    for index in range(1, args.rounds + 1):
        before = newest_complete(run)
        fault = pick_fault(rng, args, before)
        code, out, seconds = run_job(args, name, max_steps, " ".join(f"{k}={v}" for k, v in fault.items()))
        left = survivors(f"run.name={name} ")
        problem = judge_round(fault, code, out, before, newest_complete(run))
        if not problem and resumed_from(out) != before:
            problem = f"resumed from step {resumed_from(out)}, the newest complete checkpoint was {before}"
        problem = problem or (f"processes left: {left}" if left else "")
        survived += not problem
        print(f"round {index}: {fault['signal']} to rank {fault['rank']} in {fault['phase']} of step {fault['step']} "
              f"(+{fault['delay']} s): exit {code} after {seconds:.0f} s, checkpoint {newest_complete(run)}: "
              f"{'survived' if not problem else 'FAILED: ' + problem}", flush=True)
        if problem:
            print("    " + "\n    ".join(out.splitlines()[-25:]), flush=True)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    print(f"rounds survived: {survived}/{args.rounds}", flush=True)
    return final_check(args, name, reference, max_steps) and survived == args.rounds


def final_check(args: argparse.Namespace, name: str, reference: str, max_steps: int) -> bool:
    """Finish the run without faults; its losses must equal the reference's, each step once."""
    code, out, _ = run_job(args, name, max_steps)
    runs = Path(args.workdir) / "runs"
    losses, ref = read_losses(runs / name), read_losses(runs / reference)
    ok = code == 0 and losses == ref
    steps = sorted({step for step, _ in losses})
    print(f"final: exit {code}; {len(losses)} loss records for steps {steps[0] if steps else '-'}-"
          f"{steps[-1] if steps else '-'} (each once: {len(steps) == len(losses) == max_steps}); equal to the "
          f"uninterrupted run step for step: {losses == ref}", flush=True)
    if not ok:
        mismatch = [(a, b) for a, b in zip(losses, ref, strict=False) if a != b][:3]
        print(f"first differences (run, reference): {mismatch}\n{out[-2000:] if code else ''}")
    return ok


def read_losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=sorted(METHODS), default="dino")
    parser.add_argument("--zero", type=int, choices=(2, 3), default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--data", required=True, help="a shard dataset (python -m data_tools imagefolder ...)")
    parser.add_argument("--workdir", required=True, help="where the runs, logs and MLflow store go (created)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.data = str(Path(args.data).resolve())
    args.workdir = str(Path(args.workdir).resolve())
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if not (Path(args.data) / "dataset.json").is_file():
        parser.error(f"--data {args.data}: no dataset.json (write shards with python -m data_tools first)")
    return 0 if campaign(args) else 1


if __name__ == "__main__":
    sys.exit(main())

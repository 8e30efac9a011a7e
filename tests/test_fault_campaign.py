"""benchmarks/fault_campaign.py, a few rounds: random SIGKILL / SIGTERM / SIGUSR1 of one of two ranks at a random
step and phase, resumed each time; every round survives and the finished run equals the uninterrupted one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, child_env


@pytest.mark.slow  # 3-4 min: six jobs of two ranks; the default suite covers each fault on its own (test_stopping,
# test_failures, test_slurm_train, test_checksums, test_tracking_store)
@pytest.mark.parametrize(("method", "zero"), [("dino", 3), ("mae", 2)])
def test_a_few_rounds_of_the_fault_campaign_all_survive(method: str, zero: int, mini_shards: Path,
                                                          tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fault_campaign.py"), "--method", method,
                           "--zero", str(zero), "--rounds", "3", "--seed", "7", "--data", str(mini_shards),
                           "--workdir", str(tmp_path)], env=child_env(tmp_path), capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "rounds survived: 3/3" in done.stdout and "step for step: True" in done.stdout, done.stdout[-4000:]

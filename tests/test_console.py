"""Lines written by several processes into one stderr pipe stay whole (the case of DataLoader workers' warnings
next to a rank's error line, with PYTHONUNBUFFERED set as in SLURM jobs)."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WRITER = """
import sys
from largessl.console import err_line
for i in range(3000):
    err_line(f"warning: process {sys.argv[1]} line {i} " + "x" * 150)
"""


def test_concurrent_lines_are_never_split() -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    read, write = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(n)], stderr=write, env=env) for n in range(4)]
    os.close(write)
    with os.fdopen(read, "r") as pipe:
        out = pipe.read()
    assert all(proc.wait() == 0 for proc in procs)
    lines = out.splitlines()
    assert len(lines) == 4 * 3000
    pattern = re.compile(r"warning: process [0-3] line \d+ x{150}")
    bad = [line for line in lines if not pattern.fullmatch(line)]
    assert not bad, bad[:3]

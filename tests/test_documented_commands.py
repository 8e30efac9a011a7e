"""Every command in the README and docs/ works as printed, or its block says what it needs.

A command is a line (with its backslash continuations) of a ```bash block. A `# needs: WHAT` line marks the
commands below it in its block (a trailing `# ... needs: WHAT` comment, one command) as needing what this machine
does not have: a GPU cluster, ImageNet, an hour. Every other command is run here, as printed, in a workspace laid
out as `make demo` leaves the checkout (demo/shards, runs/demo, mlflow.db), and must exit 0. The commands that run
longer than a minute on 2 cores (the probes and fine-tuning, 1-4 minutes each) are marked slow.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MINI_IMAGES, REPO, child_env, write_shards

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SLOW = ("largessl eval linear", "largessl eval attentive", "largessl eval finetune")


@dataclass(frozen=True)
class Command:
    where: str
    text: str
    needs: str

    @property
    def slow(self) -> bool:
        return self.text.startswith(SLOW)


def block_commands(text: str, first_line: int, where: str) -> list[Command]:
    """The commands of one bash block; `first_line` is the block's first line in its file."""
    found, needs, pending = [], "", ""
    for offset, line in enumerate(text.splitlines()):
        stripped = line.strip()
        if stripped.startswith("# needs:"):
            needs = stripped.removeprefix("# needs:").strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        inline = re.search(r"\s#\s.*?needs:\s*(.*)$", pending)
        found.append(Command(f"{where}:{first_line + offset}", pending.strip(), inline.group(1) if inline else needs))
        pending = ""
    return found


def documented_commands() -> list[Command]:
    commands = []
    for path in DOCS:
        text = path.read_text()
        for block in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
            first = text[: block.start()].count("\n") + 2
            commands += block_commands(block.group(1), first, str(path.relative_to(REPO)))
    return commands


COMMANDS = documented_commands()
RUN_HERE = [c for c in COMMANDS if not c.needs]


def test_the_documents_hold_commands_and_every_one_is_run_here_or_says_what_it_needs() -> None:
    assert len(COMMANDS) > 40 and len(RUN_HERE) >= 8  # the parser finds the blocks
    for command in COMMANDS:
        assert command.needs or not re.search(r"/shards/|/data/|\bsbatch\b|\bsrun\b|--nproc_per_node [2-9]|\.\.\.",
                                             command.text), f"{command.where}: needs a '# needs:' line: {command.text}"


@pytest.fixture(scope="module")
def demo_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `make demo` leaves in a checkout (its shard commands; a shorter pretraining run of its recipe)."""
    root = tmp_path_factory.mktemp("checkout")
    (root / "demo").mkdir()
    (root / "demo" / "imagenette-mini").symlink_to(MINI_IMAGES)
    write_shards(MINI_IMAGES / "train", root / "demo" / "shards", "train", 128)
    write_shards(MINI_IMAGES / "val", root / "demo" / "shards", "val", 128)
    done = run_shell("largessl pretrain --config debug/mae_vit_tiny run.name=demo trainer.max_steps=30", root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


def run_shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """`command` through bash, with this venv's largessl, python and mlflow first on PATH."""
    env = {k: v for k, v in child_env(cwd).items() if k != "OMP_NUM_THREADS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("command", [pytest.param(c, id=c.where, marks=[pytest.mark.slow] if c.slow else [])
                                     for c in RUN_HERE])
def test_a_documented_command_works_as_printed(command: Command, demo_workspace: Path) -> None:
    done = run_shell(command.text, demo_workspace)
    assert done.returncode == 0, f"{command.where}: {command.text}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr

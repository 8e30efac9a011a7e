"""The `python -m data_tools` command line as a newcomer meets it: one-line argument errors that come before any
heavy import, --help that shows every default, and --samples-per-shard N meaning N samples per shard. Every test
runs the real command in a subprocess on real files (the bundled Imagenette JPEGs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import CLASSES, MINI_IMAGES, REPO

PREFIX = "python -m data_tools: error: "
HEAVY = ("torch", "torchvision", "webdataset", "numpy", "PIL")  # none is needed to reject an argument


def run_tool(*args: str | Path, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "data_tools", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The whole stderr of a command that failed on its arguments: exactly one `python -m data_tools: error:` line,
    exit code 2, nothing on stdout."""
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), result.stderr
    assert result.stdout == "" and "usage:" not in result.stderr and "Traceback" not in result.stderr
    return lines[0]


def image_subset(root: Path, per_class: int) -> Path:
    """A class-folder copy of the first `per_class` bundled train images of every class."""
    for wnid in CLASSES:
        (root / wnid).mkdir(parents=True)
        for path in sorted((MINI_IMAGES / "train" / wnid).iterdir())[:per_class]:
            shutil.copyfile(path, root / wnid / path.name)
    return root


def shard_counts(out: Path, split: str = "train") -> tuple[list[int], list[int]]:
    """(per-shard counts dataset.json lists, per-shard counts of samples actually in the tars)."""
    shards = json.loads((out / "dataset.json").read_text())["splits"][split]["shards"]
    in_tars = []
    for shard in shards:
        with tarfile.open(out / shard["file"]) as tar:
            names = tar.getnames()
        keys = {name.partition(".")[0] for name in names}
        assert len(names) == 3 * len(keys)  # every sample: .jpg, .cls and .json
        in_tars.append(len(keys))
    return [s["num_samples"] for s in shards], in_tars


# --- argument errors -----------------------------------------------------------------------------------------

def test_bad_subcommand_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(run_tool("imagefoldr", "src", "out", cwd=tmp_path))
    assert "invalid choice: 'imagefoldr'" in line and "'imagefolder'" in line
    assert line.endswith("(see python -m data_tools --help)")


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--samples-per-shard", "0"], "argument --samples-per-shard: must be positive, got 0"),
    (["--samples-per-shard", "many"], "argument --samples-per-shard: must be a positive integer, got 'many'"),
    (["--shard-bytes", "1XB"], "argument --shard-bytes: must be a size such as 500MB"),
    (["--quality", "0"], "argument --quality: must be an integer from 1 to 100, got '0'"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["--shard-bytes", "1GB", "--samples-per-shard", "10"], "not allowed with argument"),
])
def test_bad_option_is_one_line_pointing_to_the_subcommand_help(args: list[str], message: str,
                                                                 tmp_path: Path) -> None:
    line = one_line_error(run_tool("imagefolder", MINI_IMAGES / "train", tmp_path / "out", *args))
    assert message in line and line.endswith("(see python -m data_tools imagefolder --help)"), line
    assert not (tmp_path / "out").exists()


def test_missing_arguments_are_one_line(tmp_path: Path) -> None:
    line = one_line_error(run_tool("imagefolder", cwd=tmp_path))
    assert "the following arguments are required: SRC, OUT" in line
    assert "required: command" in one_line_error(run_tool(cwd=tmp_path))


def test_input_errors_share_the_prefix(tmp_path: Path) -> None:
    assert one_line_error(run_tool("imagefolder", "/nonexistent/src", tmp_path / "out")) == (
        f"{PREFIX}SRC '/nonexistent/src' does not exist")
    assert one_line_error(run_tool("verify", tmp_path)) == f"{PREFIX}{tmp_path} has no dataset.json"


ARGUMENT_ERRORS = [
    ["imagefoldr", "src", "out"],
    ["imagefolder"],
    ["imagefolder", "/nonexistent/src", "OUT"],
    ["imagefolder", str(MINI_IMAGES / "train"), "OUT", "--split", "../up"],
    ["imagefolder", str(MINI_IMAGES / "train"), "OUT", "--samples-per-shard", "0"],
    ["imagenet22k", "/nonexistent/release.tar", "OUT"],
    ["verify", "/nonexistent/dataset"],
    ["inspect", "/nonexistent/dataset"],
]
SCAN_ERRORS = [  # wrong SRCs found only by the scan, which imports the converter (PIL) but starts no image pool
    ["imagefolder", "EMPTY", "OUT"],
    ["imagenet22k", "NOT_A_TAR", "OUT"],
]

PROBE = """
import json, runpy, sys
errors, conversion = json.loads(sys.argv[1]), json.loads(sys.argv[2])
def heavy():
    return sorted(name for name in {heavy!r} if name in sys.modules)
def run(argv):
    sys.argv = ["data_tools", *argv]
    try:
        runpy.run_module("data_tools", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code
report = []
for argv in errors:
    code = run(argv)
    report.append([code, heavy()])
code = run(conversion)  # a real conversion last: the probe must see what it imports
report.append([code, heavy()])
print(json.dumps(report))
"""


def test_argument_errors_import_nothing_heavy(tmp_path: Path) -> None:
    """Every argument error runs in one process, in turn, and none may have imported torch (or PIL, numpy,
    webdataset) by the time it exits; a real conversion at the end shows the probe does see torch when it is."""
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "NOT_A_TAR").write_bytes(b"not a tar at all" * 64)
    src = image_subset(tmp_path / "src", 1)
    conversion = ["imagefolder", str(src), str(tmp_path / "ds"), "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(ARGUMENT_ERRORS + SCAN_ERRORS),
                             json.dumps(conversion)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    *errors, converted = json.loads(result.stdout.splitlines()[-1])
    argument_errors, scan_errors = errors[:len(ARGUMENT_ERRORS)], errors[len(ARGUMENT_ERRORS):]
    assert argument_errors == [[2, []]] * len(ARGUMENT_ERRORS), list(zip(ARGUMENT_ERRORS, errors, strict=False))
    assert scan_errors == [[2, ["PIL"]]] * len(SCAN_ERRORS), list(zip(SCAN_ERRORS, scan_errors, strict=True))
    assert converted[0] == 0 and "torch" in converted[1]
    lines = result.stderr.splitlines()
    assert sum(line.startswith(PREFIX) for line in lines) == len(errors), result.stderr


# --- help ----------------------------------------------------------------------------------------------------

def option_help(text: str) -> dict[str, str]:
    """--option -> its help text, from the `options:` section of --help output."""
    section = text.split("\noptions:\n", 1)[1]
    blocks: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            blocks[name] = line
        elif name and line.startswith("    "):
            blocks[name] += " " + line.strip()
        else:
            name = None
    return {name: " ".join(block.split()) for name, block in blocks.items()}


def test_imagefolder_help_shows_the_defaults() -> None:
    result = run_tool("imagefolder", "--help")
    assert result.returncode == 0 and result.stderr == ""
    options = option_help(result.stdout)
    assert options["--seed"].endswith("(default: 0)")
    assert options["--quality"].endswith("(default: 90)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert options["--workers"].endswith(f"(default: all cores, {cores} here)")
    assert options["--shard-bytes"].endswith("(default: 1GiB)")
    assert "exactly N samples per shard" in options["--samples-per-shard"]


@pytest.mark.parametrize("command", ["imagefolder", "imagenet22k", "verify", "inspect"])
def test_every_option_states_its_default_once(command: str) -> None:
    result = run_tool(command, "--help")
    assert result.returncode == 0
    options = option_help(result.stdout)
    assert len(options) >= 3
    for name, text in options.items():
        if name == "-h":
            continue
        assert text.count("(default") == 1 and "(default: None)" not in text, (name, text)


def test_top_level_help_lists_the_commands() -> None:
    result = run_tool("--help")
    assert result.returncode == 0
    for command in ("imagefolder", "imagenet22k", "verify", "inspect"):
        assert f"    {command} " in result.stdout
    assert "python -m data_tools COMMAND --help" in result.stdout


# --- shard sizes ---------------------------------------------------------------------------------------------

def test_samples_per_shard_is_exact_with_the_remainder_last(tmp_path: Path) -> None:
    src = image_subset(tmp_path / "src", 30)  # 300 real JPEGs
    out = tmp_path / "ds"
    result = run_tool("imagefolder", src, out, "--samples-per-shard", "128", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert shard_counts(out) == ([128, 128, 44], [128, 128, 44])
    assert "[train]: 300 samples in 3 shards" in result.stdout
    assert run_tool("verify", out, "--workers", "2").returncode == 0


def test_shard_bytes_plans_equal_counts(tmp_path: Path) -> None:
    """--shard-bytes sized for 128 samples a shard (the mean copied JPEG plus the tar overhead): still 3 shards,
    but of 100 each."""
    from data_tools.plan import TAR_OVERHEAD

    src = image_subset(tmp_path / "src", 30)
    files = [p for p in src.rglob("*") if p.is_file()]
    mean = sum(p.stat().st_size for p in files) / len(files)
    out = tmp_path / "ds"
    result = run_tool("imagefolder", src, out, "--shard-bytes", str(int(128.5 * (mean + TAR_OVERHEAD))),
                      "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert shard_counts(out) == ([100, 100, 100], [100, 100, 100])


def test_a_conversion_planned_before_exact_counts_resumes_with_its_own_plan(tmp_path: Path) -> None:
    """An unfinished conversion whose plan.json predates the "layout" field (written when --samples-per-shard
    still meant equal counts) finishes with the equal cut its first shards were written with, not a mix."""
    from dataclasses import replace

    from data_tools.conversion import Conversion, Options, write_json

    src = image_subset(tmp_path / "src", 30)
    out = tmp_path / "ds"
    conv = Conversion("imagefolder", src, out, "train", replace(Options(), samples_per_shard=128), workers=2)
    conv.work.mkdir(parents=True)
    write_json(conv.work / "plan.json", {"record": conv.record(), "created": "2024-01-01T00:00:00Z",
                                         "per_shard": 128})
    result = run_tool("imagefolder", src, out, "--samples-per-shard", "128", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr
    assert shard_counts(out) == ([100, 100, 100], [100, 100, 100])

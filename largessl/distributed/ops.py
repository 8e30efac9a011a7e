"""DeepSpeed's JIT-compiled C++ ops: built once per installation, and never built without saying so.

Where. torch.utils.cpp_extension builds JIT extensions under $TORCH_EXTENSIONS_DIR/<op>, by default under
~/.cache/torch_extensions/<python tag>_<cuda tag>/<op>: one directory shared by every Python installation of the
user, so another virtual environment with the same tags overwrites our build and the next start rebuilds it, in
silence, behind torch's lock. `use_installation_dir()` (run by `prepare()`, before deepspeed is imported) sets
TORCH_EXTENSIONS_DIR, unless the user has set it to something non-empty, to `<sys.prefix>/torch_extensions` for
an environment of its own: a virtual environment (sys.prefix != sys.base_prefix) or a conda environment (a
conda-meta/ folder in sys.prefix), if that prefix is writable. Any other installation (a system, pyenv or
read-only Python) keeps torch's default, which it shares with whatever else runs that interpreter.
torch reads the variable whenever it computes a build directory (cpp_extension._get_build_directory, called by
every load()), not at import, so setting it before DeepSpeed's first load is enough.

Which ops our code paths build.
- deepspeed_shm_comm (ShareMemCommBuilder): DeepSpeed's CPU accelerator loads it in TorchBackend.__init__, i.e.
  in every deepspeed.init_distributed, and prints "... built successfully" every time, built or not.
  The CUDA accelerator has no such op.
- cpu_adam (CPUAdamBuilder): DeepSpeedCPUAdam, which the engine uses when optimizer states are offloaded
  (distributed.offload=true), on either accelerator.
Nothing else: the engine hands DeepSpeed a torch AdamW (no FusedAdam; our config owns the `optimizer` key), and
async_io, quantizer and pin_memory are only loaded for NVMe offload, ZeRO++ and DS_PIN_MEMORY_BACKEND=native.

Deciding whether a load will build (`why_build`). Certain: the op's .so is missing (torch's first load in a
process builds <op>.so). Stale: torch rewrites build.ninja and runs ninja on every load, and ninja rebuilds what
is older than its inputs (sources and, through .ninja_deps, the headers they included) or was built with another
command. We run `ninja -C DIR -n` on the build.ninja that is there, which catches changed sources and headers
and missing objects, and we check that that build.ninja names this installation's sources, include directories
and each flag DeepSpeed passes now (e.g. -march=native's -D__AVX512__ on another CPU), which catches a build by
another installation or machine. Not detected: a flag removed from DeepSpeed's list or a change in the flags
torch adds itself; then ninja builds after no line was printed. When several processes race, the line may say
"building" while another process wins torch's lock and builds (the line then still times the wait); other local
ranks give local rank 0 a few seconds' head start before a first build to make that rare.

Ranks. Ranks on one machine share the directory; whichever takes torch's lock first builds, the others wait on it.
Only local rank 0 prints: the build line, or "waiting for another process that is building ..." (with the reason
when one is seen) when torch's lock is held for over a second, as when another local rank or another job took it
first (a load that builds nothing holds it for well under a second); then one line with the time taken.
The directory lives and goes with the environment: removing a venv removes its builds.

Prebuild from the command line (make install): `DS_ACCELERATOR=cpu python -m largessl.distributed.ops [OP ...]`,
OP one of comm (the default) and cpu_adam.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from largessl.distributed.env import read_env
from largessl.progress import say

EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"
NOT_BUILT = "not built for this installation yet"
STALE = "its sources, headers or compiler flags changed"
RANK0_HEAD_START_S = 3.0  # only who builds depends on it; torch's lock keeps builds one at a time regardless
# DeepSpeed's build_shm_op prints this after every load, cached or built.
BUILT_NOTICE = re.compile(r"DeepSpeed deepspeed\.ops\.comm\.\w+_op built successfully")


@dataclass(frozen=True)
class Op:
    builder: str  # DeepSpeed's op builder class, as get_accelerator().create_op_builder names it
    what: str
    estimate: str  # a fresh build, measured on 2 CPU cores


OPS = {
    "comm": Op("ShareMemCommBuilder", "DeepSpeed's CPU communication op", "about a minute on 2 cores"),
    "cpu_adam": Op("CPUAdamBuilder", "DeepSpeed's CPU Adam optimizer op", "about 2 minutes on 2 cores"),
}


class _NoCudaRuntimeNotice(logging.Filter):
    """torch.utils.cpp_extension's 'No CUDA runtime is found, using CUDA_HOME=...' at import, noise on CPU."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


_NO_CUDA_RUNTIME_NOTICE = _NoCudaRuntimeNotice()


def installation_dir() -> Path | None:
    """<sys.prefix>/torch_extensions for a writable virtual or conda environment; None for any other Python."""
    prefix = Path(sys.prefix)
    own_environment = sys.prefix != sys.base_prefix or (prefix / "conda-meta").is_dir()
    return prefix / "torch_extensions" if own_environment and os.access(prefix, os.W_OK) else None


def use_installation_dir() -> str | None:
    """Set TORCH_EXTENSIONS_DIR to this installation's directory unless the user set it; returns the directory
    now in effect (None: torch's default)."""
    chosen = installation_dir()
    if not os.environ.get(EXTENSIONS_ENV) and chosen is not None:
        os.environ[EXTENSIONS_ENV] = str(chosen)
    return os.environ.get(EXTENSIONS_ENV) or None


def prepare() -> None:
    """Before importing deepspeed: its accelerator, where ops are built, and no CUDA_HOME notice on CPU."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    use_installation_dir()
    venv_bin = Path(sys.executable).parent
    if shutil.which("ninja") is None and (venv_bin / "ninja").is_file():  # pip's ninja, venv not activated
        os.environ["PATH"] = os.pathsep.join([str(venv_bin), os.environ.get("PATH", "")])
    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").addFilter(_NO_CUDA_RUNTIME_NOTICE)  # adds it once


def op_builder(op: Op) -> Any | None:
    """DeepSpeed's builder of `op`, or None where DeepSpeed will not JIT-build it: no such op on this accelerator,
    not compatible (DeepSpeed then skips it or raises its own error), or prebuilt into the DeepSpeed install."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    builder = get_accelerator().create_op_builder(op.builder)
    if builder is None or installed_ops.get(builder.name, False) or not builder.is_compatible(False):
        return None
    return builder


def build_dir(name: str) -> Path:
    """Where torch.utils.cpp_extension.load builds op `name` (its own function, reading TORCH_EXTENSIONS_DIR)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def why_build(builder: Any, directory: Path) -> str | None:
    """Why loading `builder` will compile it, or None when (as far as can be told, see above) it will not."""
    if not (directory / f"{builder.name}.so").is_file():
        return NOT_BUILT
    if not _ninja_file_matches(builder, directory / "build.ninja") or not _ninja_up_to_date(directory):
        return STALE
    return None


def _expected_words(builder: Any) -> list[str]:
    """What the build.ninja torch writes for `builder` now contains, word for word (a subset of it)."""
    from torch.utils.cpp_extension import include_paths

    sources = [os.path.abspath(builder.deepspeed_src_path(path)) for path in builder.sources()]
    includes = [f"-I{os.path.abspath(builder.deepspeed_src_path(path))}" for path in builder.include_paths()]
    return [*sources, *includes, *include_paths(), *builder.strip_empty_entries(builder.cxx_args())]


def _ninja_file_matches(builder: Any, ninja_file: Path) -> bool:
    try:
        words = set(ninja_file.read_text().split())
    except OSError:
        return False
    return all(word in words for word in _expected_words(builder))


def _ninja_up_to_date(directory: Path) -> bool:
    """`ninja -n` finds nothing to do (without ninja, torch cannot build and says so itself)."""
    ninja = shutil.which("ninja")  # what torch runs
    if ninja is None:
        return True
    result = subprocess.run([ninja, "-C", str(directory), "-n"], capture_output=True, text=True, timeout=120)
    return result.returncode == 0 and "no work to do" in result.stdout


def lock_held(directory: Path, patience: float = 1.0) -> bool:
    """Whether another process holds torch's build lock on `directory` for longer than `patience` seconds."""
    from filelock import FileLock, Timeout  # what torch's lock is made of

    lock = FileLock(str(directory / "lock"))
    try:
        lock.acquire(timeout=patience)
    except Timeout:
        return True
    lock.release()
    return False


def announcement(op: Op, builder: Any, directory: Path) -> str | None:
    """The line to print before loading `builder`, or None when the load builds nothing."""
    where = f"{op.what} ({builder.name}) in {directory.parent}"
    reason = why_build(builder, directory)
    if lock_held(directory):  # another job, or another local rank that took the lock first
        because = f": {reason}" if reason else ""
        return f"waiting for another process that is building {where}{because} (lock file {directory / 'lock'})"
    if reason is None:
        return None
    return f"building {where}: {reason} ({'once, ' if reason == NOT_BUILT else ''}{op.estimate})"


def ensure(key: str) -> None:
    """Load DeepSpeed's op `key` (see OPS), first saying why if that builds it; silent when nothing is built.
    DeepSpeed's own load of it later in this process is then a cached no-op."""
    prepare()
    op = OPS[key]
    builder = op_builder(op)
    if builder is None:
        return
    line = announce_or_defer(op, builder, build_dir(builder.name))
    start = time.perf_counter()
    builder.load(verbose=False)
    if line:
        say(f"{op.what} ({builder.name}) ready after {time.perf_counter() - start:.0f} s")


def announce_or_defer(op: Op, builder: Any, directory: Path) -> str | None:
    """Local rank 0 prints its announcement (and returns it); the other local ranks print nothing and, before a
    first build, give rank 0 a head start on torch's lock so that the rank that said "building" builds."""
    if read_env()[2] != 0:
        if not (directory / f"{builder.name}.so").is_file():
            time.sleep(RANK0_HEAD_START_S)
        return None
    line = announcement(op, builder, directory)
    if line:
        say(line)
    return line


@contextlib.contextmanager
def without_built_notice() -> Iterator[None]:
    """Around deepspeed.init_distributed: drop DeepSpeed's 'deepspeed_shm_comm_op built successfully' line (printed
    whether or not anything was built; `ensure` reports real builds); its other prints pass through at the end."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        kept = [line for line in captured.getvalue().splitlines(keepends=True) if not BUILT_NOTICE.fullmatch(
            line.rstrip("\n"))]
        sys.stdout.write("".join(kept))
        sys.stdout.flush()


def main(argv: list[str]) -> int:
    unknown = [key for key in argv if key not in OPS]
    if unknown:
        print(f"usage: python -m largessl.distributed.ops [{' '.join(OPS)}] (unknown: {' '.join(unknown)})",
              file=sys.stderr)
        return 2
    for key in argv or ["comm"]:
        ensure(key)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

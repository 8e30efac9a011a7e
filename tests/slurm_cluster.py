"""A real one-node SLURM cluster for the tests: the session fixture `slurm_cluster`.

It starts a private munged (its own key and socket), slurmctld and slurmd (Debian's slurm-wlm, installed by
`.ci/slurm_setup.sh`) on free ports with a slurm.conf in a temporary directory, and stops them at the end of the
session. The node is this host with the cores `slurmd -C` reports and 8 GPUs that are only a count (gres.conf
points them at /dev/null): `--gpus-per-node=8` is accepted and srun sets CUDA_VISIBLE_DEVICES=0,...,7, which a
CPU-only torch ignores; `--gpus-per-node=0` removes the request. A requeued job is eligible again `cred_expire` + 1
= 6 s after the requeue; `SlurmCluster.wait` and `requeue` release it after 2 s (slurmd refuses a relaunch within the
second of the kill: "Job credential revoked").

Without the binaries the fixture skips (run `.ci/slurm_setup.sh` once, as root); with `CI` set it fails instead.
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
FINISHED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                      "DEADLINE", "PREEMPTED"})
GPUS = 8
KILL_WAIT = 5  # seconds from SLURM's SIGTERM of a job's processes to its SIGKILL (SLURM's default: 30)
CRED_EXPIRE = 5  # seconds; a requeued job's BeginTime is the requeue + CRED_EXPIRE + 1
PR_SET_PDEATHSIG = 1
ROOT_PREFIX = "largessl-slurm-"
KEY_RE = re.compile(r" (?=[A-Za-z][A-Za-z0-9_:/]*=)")
SLURMD_TIMEOUT = 300  # seconds without an answer before slurmctld sets a node DOWN (SLURM's default)

SLURM_CONF = """\
ClusterName=largessl-test
FirstJobId={first_job_id}
SlurmctldHost={controller}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool{per_node}
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd{per_node}.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd{per_node}.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait={kill_wait}
SlurmdTimeout={slurmd_timeout}
MinJobAge=60
InactiveLimit=0
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
NODE_LINE = "NodeName={name} NodeAddr={address} {hardware} RealMemory={memory} Gres=gpu:{gpus} State=UNKNOWN"


def binary(name: str) -> str | None:
    """The program's path: on PATH, or in the sbin folders where Debian puts the daemons (absent from some PATHs)."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def unavailable(reason: str) -> None:
    """Skip, or fail when CI is set: a SLURM check that did not run must never count as passed in CI."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_name() -> str:
    """This host's short name when it resolves (the rendezvous uses it as MASTER_ADDR), else localhost."""
    name = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(name)
    except OSError:
        return "localhost"
    return name


def hardware() -> tuple[str, int]:
    """`slurmd -C`'s CPUs/Boards/Sockets/Cores/Threads fields, and a RealMemory (MB) somewhat below the real."""
    line = subprocess.run([binary("slurmd"), "-C"], capture_output=True, text=True, check=True, timeout=30).stdout
    fields = dict(item.split("=", 1) for item in line.split("\n")[0].split())
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    return " ".join(f"{key}={fields[key]}" for key in keys if key in fields), int(fields["RealMemory"]) * 9 // 10


def clean_env(base: Mapping[str, str], conf: Path) -> dict[str, str]:
    """`base` without the variables of an enclosing SLURM job (a developer's pytest may run in one), + SLURM_CONF."""
    prefixes = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_")
    env = {key: value for key, value in base.items() if not key.startswith(prefixes)}
    env["SLURM_CONF"] = str(conf)
    return env


def parse_job(line: str) -> dict[str, str]:
    """`scontrol show job -o` line -> {field: value}; values may hold spaces (Command, WorkDir, Reason)."""
    return dict(part.split("=", 1) for part in KEY_RE.split(line.strip()) if "=" in part)


class SlurmCluster:
    """Client side of the running cluster; every command runs against its slurm.conf (SLURM_CONF)."""

    def __init__(self, root: Path, node: str, cpus: int) -> None:
        self.root, self.node, self.cpus = root, node, cpus
        self.conf = root / "slurm.conf"
        self.log_dir = root / "log"
        self.processes: dict[str, subprocess.Popen] = {}

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for a SLURM client command or a job: `base` (default os.environ) with SLURM_CONF."""
        return clean_env(os.environ if base is None else base, self.conf)

    def command(self, *args: str, env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
                check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        done = subprocess.run(list(args), capture_output=True, text=True, env=env or self.env(), cwd=cwd,
                              timeout=timeout)
        if check and done.returncode:
            raise RuntimeError(f"`{' '.join(args)}` exited {done.returncode}: {done.stderr.strip()}")
        return done

    def sbatch(self, script: Path | str, *args: str, options: Sequence[str] = (), env: Mapping[str, str] | None = None,
               cwd: Path | str | None = None) -> str:
        """Submit `script` (a file, or a script's text starting with #!) with sbatch `options` before it and `args`
        after it (the script's arguments); `env` is the job's whole environment (default os.environ), SLURM_CONF
        added. Returns the job id."""
        if isinstance(script, str) and script.startswith("#!"):
            path = Path(tempfile.mkstemp(suffix=".sh", dir=self.root / "scripts")[1])
            path.write_text(script)
            script = path
        done = self.command("sbatch", "--parsable", *options, str(script), *args, env=self.env(env), cwd=cwd)
        return done.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, StdOut, Reason, ...); {} once the job
        has left the controller (MinJobAge after it finished)."""
        done = self.command("scontrol", "show", "job", "-o", job_id, check=False)
        if done.returncode or not done.stdout.strip():
            return {}
        return parse_job(done.stdout.splitlines()[0])

    def wait(self, job_id: str, states: Sequence[str] | frozenset[str] = FINISHED, timeout: float = 60,
             release: bool = True) -> dict[str, str]:
        """Poll until the job's JobState is one of `states`; returns its job_info. Raises when it finishes in
        another state, disappears or times out. With `release`, a requeued job waiting for its BeginTime starts
        2 s after the requeue (instead of 6 s)."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state in states:
                return info
            if not info or state in FINISHED:
                raise AssertionError(f"job {job_id} is {state or 'gone'}, not {sorted(states)}: {info}"
                                     f"\n{self.output(job_id, info)}")
            if release and state == "PENDING" and info.get("Reason") == "BeginTime" and info.get("Restarts") != "0":
                self.release_requeued(job_id, info)
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout} s: {info}")

    def output(self, job_id: str, info: Mapping[str, str] | None = None) -> str:
        """The job's stdout file (its text, or '' when there is none yet)."""
        path = Path((info or self.job_info(job_id)).get("StdOut", "/nonexistent"))
        return path.read_text(errors="replace") if path.is_file() else ""

    def signal(self, job_id: str, sig: str = "USR1", batch_shell: bool = False) -> None:
        """Send `sig` to every task of the job's steps (srun's processes: the training ranks), as
        `--signal=USR1@600` does; `batch_shell` also signals the batch script and its children (`--full`)."""
        self.command("scancel", f"--signal={sig}", *(["--full"] if batch_shell else []), job_id)

    def requeue(self, job_id: str, release: bool = True) -> None:
        """`scontrol requeue`: the job is killed and pending again with Restarts + 1; with `release` it starts again
        2 s later (else after 6 s)."""
        self.command("scontrol", "requeue", job_id)
        if release:
            self.release_requeued(job_id, self.wait(job_id, states={"PENDING"}, timeout=30, release=False))

    def release_requeued(self, job_id: str, info: Mapping[str, str]) -> None:
        """Start a requeued pending job 2 s after its requeue: the relaunch must come in a later second than the
        kill, whose credential slurmd revokes; the requeue's time is its EligibleTime - CRED_EXPIRE - 1."""
        try:
            requeued = datetime.fromisoformat(info["EligibleTime"]).timestamp() - CRED_EXPIRE - 1
        except (KeyError, ValueError):
            return
        time.sleep(max(0.0, requeued + 2 - time.time()))
        self.release(job_id)

    def release(self, job_id: str) -> None:
        """Make a pending job eligible now (for a requeued one, see release_requeued)."""
        self.command("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)

    def cancel(self, job_id: str) -> None:
        self.command("scancel", job_id, check=False)

    def logs(self, lines: int = 30) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for path in sorted(self.log_dir.iterdir()):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)


def make_root(prefix: str) -> Path:
    """A fresh cluster folder in the temp dir: owned by this process (see remove_stale_roots), with the state,
    spool, log, munge and scripts folders and the GPU device files of gres.conf."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)  # munged insists that its socket's folders are searchable by everyone
    (root / "owner").write_text(f"{os.getpid()}\n")
    for sub in ("state", "spool", "log", "munge", "scripts", "dev"):
        (root / sub).mkdir(mode=0o755)
    for index in range(GPUS):  # gres/gpu keeps only GPUs with a device file; any character device will do
        (root / "dev" / f"gpu{index}").symlink_to("/dev/null")
    (root / "gres.conf").write_text(f"Name=gpu File={root}/dev/gpu[0-{GPUS - 1}]\n")
    return root


def node_lines(addresses: Mapping[str, str]) -> tuple[str, int]:
    """slurm.conf's NodeName lines, one per {name: address}, each node with this host's cores, memory and
    GPUS; and the CPU count of one node."""
    cores, memory = hardware()
    lines = [NODE_LINE.format(name=name, address=address, hardware=cores, memory=memory, gpus=GPUS)
             for name, address in addresses.items()]
    return "\n".join(lines), int(re.search(r"CPUs=(\d+)", cores)[1])


def write_slurm_conf(root: Path, controller: str, nodes: str, per_node: str = "",
                     slurmd_timeout: int = SLURMD_TIMEOUT) -> None:
    """`root`/slurm.conf: the controller `name(address)`, the NodeName `nodes` lines, free ports; `per_node`
    ("-%n" where several slurmd share the folder) goes into the names of slurmd's spool, pid and log files."""
    # Random job ids: largessl's MASTER_PORT is 20000 + job id % 20000, so two sessions on one host (both at job 1
    # otherwise) would collide.
    text = SLURM_CONF.format(root=root, controller=controller, ctld_port=free_port(), slurmd_port=free_port(),
                             nodes=nodes, per_node=per_node, slurmd_timeout=slurmd_timeout, kill_wait=KILL_WAIT,
                             cred_expire=CRED_EXPIRE, first_job_id=random.randrange(100_000, 10_000_000))
    (root / "slurm.conf").write_text(text)


def write_config(root: Path, node: str) -> int:
    """slurm.conf for one node, this host on 127.0.0.1; returns the node's CPU count."""
    nodes, cpus = node_lines({node: "127.0.0.1"})
    write_slurm_conf(root, f"{node}(127.0.0.1)", nodes)
    return cpus


def die_with_parent() -> None:
    """In a daemon, before exec: SIGTERM when the pytest process goes, even by SIGKILL or a timeout's SIGTERM
    (whose teardown then never runs), so no daemons outlive the session."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def daemon(args: list[str], cluster: SlurmCluster, name: str, **kwargs: object) -> None:
    """Start a daemon in the foreground, in a session of its own (Ctrl-C reaches only pytest, whose teardown
    stops the daemons in order)."""
    with open(cluster.log_dir / f"{name}.stderr", "wb") as stderr:  # messages from before the log file opens
        cluster.processes[name] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, cwd=cluster.root,
                                                   start_new_session=True, preexec_fn=die_with_parent, **kwargs)


def start_munge(cluster: SlurmCluster) -> None:
    """A munged of our own: a fresh key and a socket in the cluster folder (which must be o+x all the way up)."""
    munge = cluster.root / "munge"
    key = munge / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    daemon([binary("munged"), "--foreground", f"--socket={munge}/munge.socket", f"--key-file={key}",
             f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/munged.seed",
             f"--log-file={cluster.log_dir}/munged.log"], cluster, "munged")
    wait_for(lambda: (munge / "munge.socket").exists(), cluster, "munged's socket", 10)


def start_slurm(cluster: SlurmCluster) -> None:
    start_controller(cluster)
    daemon([binary("slurmd"), "-D", "-N", cluster.node, "-f", str(cluster.conf)], cluster, "slurmd",
           env=cluster.env())
    wait_for(lambda: node_state(cluster) == "idle", cluster, "the node to be idle", 30)


def start_controller(cluster: SlurmCluster) -> None:
    """slurmctld, ready once its port answers (on 127.0.0.1: it listens on every address of this host)."""
    daemon([binary("slurmctld"), "-D", "-i", "-f", str(cluster.conf)], cluster, "slurmctld", env=cluster.env())
    port = int(re.search(r"SlurmctldPort=(\d+)", cluster.conf.read_text())[1])
    wait_for(lambda: port_open(port), cluster, "slurmctld's port", 20)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def node_state(cluster: SlurmCluster) -> str:
    done = cluster.command("sinfo", "-h", "-n", cluster.node, "-o", "%T", check=False, timeout=15)
    return done.stdout.strip()


def wait_for(ready: Callable[[], bool], cluster: SlurmCluster, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [name for name, proc in cluster.processes.items() if proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            problem = f"{', '.join(dead)} exited" if dead else f"no {what} after {timeout} s"
            raise RuntimeError(f"SLURM test cluster did not start: {problem}\n{cluster.logs()}")
        time.sleep(0.1)


def stop(cluster: SlurmCluster) -> None:
    """Cancel what still runs, then stop slurmd, slurmctld and munged (in that order)."""
    if cluster.processes.get("slurmctld") and cluster.processes["slurmctld"].poll() is None:
        cluster.command("scancel", "--user", str(os.getuid()), check=False, timeout=15)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and cluster.command("squeue", "-h", check=False, timeout=15).stdout.strip():
            time.sleep(0.2)
    for name in reversed(list(cluster.processes)):
        proc = cluster.processes[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def abandoned(root: Path) -> bool:
    """Whether a cluster folder belongs to a session killed before its teardown: its owner (the pytest process)
    and every daemon of its pid files are gone."""
    pid_files = [root / "owner", *root.glob("*.pid"), root / "munge" / "munged.pid"]
    return (root / "owner").is_file() and not any(alive(path) for path in pid_files)


def remove_stale_roots(prefix: str = ROOT_PREFIX) -> None:
    """Remove the folders of earlier sessions that were killed before their teardown: owner and daemons gone."""
    for root in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        if abandoned(root):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running one-node SLURM cluster (see the module docstring); stopped and removed after the session."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if binary(name) is None]
    if missing:
        unavailable(f"SLURM is not installed (no {', '.join(missing)}): run .ci/slurm_setup.sh once, as root")
    if os.geteuid() != 0:
        unavailable("the SLURM test cluster runs slurmd, which needs root")
    remove_stale_roots()
    root = make_root(ROOT_PREFIX)
    node = node_name()
    cluster = SlurmCluster(root, node, write_config(root, node))
    try:
        start_munge(cluster)
        start_slurm(cluster)
        yield cluster
    finally:
        stop(cluster)
        shutil.rmtree(root, ignore_errors=True)

"""The multi-node SLURM test cluster (tests/slurm_nodes.py): two nodes, each its own network namespace, host name
and slurmd, on a private bridge.

Checked here: the nodes come up idle within seconds; a job step spans both nodes, each task with its node's name
and address and every node's name resolving; a task on the second node reaches a listener of the first at
largessl's MASTER_ADDR:MASTER_PORT, and torch.distributed's gloo rendezvous and all_reduce work across them; a cut
link stops that traffic and its repair restores it; a killed node comes back; a killed pytest leaves nothing
behind that the next session does not remove.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from conftest import REPO
from slurm_cluster import alive
from slurm_nodes import (
    ROOT_PREFIX,
    SlurmNodes,
    check_prerequisites,
    ip,
    make_network,
    namespace_pids,
    namespaces,
    pick_network,
    remove_stale_networks,
    roots,
)

# What a task sees: its node index, host name, address (ip -4 -o: "2: eth0 inet ADDRESS/24 ...") and the nodes' names;
# it leaves a file in the job's folder on the shared filesystem
TASK = """\
#!/bin/bash
echo $SLURM_NODEID $(hostname) $(ip -4 -o addr show dev eth0 | cut -d" " -f7) $(getent hosts lss1 lss2)
touch "written-on-$(hostname)"
"""

RENDEZVOUS = """\
import os, socket, sys, time
from largessl.launch.slurm import rank_env

env = rank_env(os.environ)
address, port, host = env["MASTER_ADDR"], int(env["MASTER_PORT"]), socket.gethostname()
if env["RANK"] == "0":
    with socket.create_server((address, port)) as server:
        server.settimeout(60)
        connection, peer = server.accept()
        print(f"rank 0 on {host} at {address}:{port} heard '{connection.recv(64).decode()}' from {peer[0]}")
else:
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection((address, port), timeout=5) as connection:
                connection.sendall(f"rank {env['RANK']} on {host}".encode())
                break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
"""

ALL_REDUCE = """\
import socket
from datetime import timedelta

from largessl.launch.slurm import apply_rank_env

apply_rank_env()
import torch
import torch.distributed as dist

dist.init_process_group("gloo", timeout=timedelta(seconds=60))
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
print(f"rank {dist.get_rank()} of {dist.get_world_size()} on {socket.gethostname()}: {total.item():g}")
dist.destroy_process_group()
"""

LISTENER = """\
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
while True:
    connection, _ = server.accept()
    connection.sendall(socket.gethostname().encode())
    connection.close()
"""

CONNECT = ("import socket, sys; print(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)"
           ".recv(64).decode())")


def job_env() -> dict[str, str]:
    """A job's environment: this checkout on PYTHONPATH, one thread per task (the CPUs are shared)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_job(cluster: SlurmNodes, workdir: Path, srun_args: str, timeout: float = 60) -> list[str]:
    """A batch job on both nodes (one task each) whose script is `srun SRUN_ARGS`; the sorted lines of its output,
    which the batch shell on lss1 writes into `workdir` on the shared filesystem."""
    script = f"#!/bin/bash\nsrun --kill-on-bad-exit=1 {srun_args}\n"
    options = ["--nodes=2", "--ntasks-per-node=1", f"--output={workdir}/%j.out"]
    job = cluster.sbatch(script, options=options, env=job_env(), cwd=workdir)
    info = cluster.wait(job, timeout=timeout)
    output = cluster.output(job, info)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{output}\n{cluster.logs()}"
    assert info["NodeList"] == "lss[1-2]" and info["BatchHost"] == "lss1", info
    return sorted(output.splitlines())


def test_nodes_come_up_idle_within_seconds(slurm_nodes: SlurmNodes) -> None:
    """Both nodes idle, each slurmd with its own spool and log, in its own namespace; the start took seconds."""
    states = slurm_nodes.command("sinfo", "-N", "-h", "-o", "%N %T").stdout.split()
    assert states == ["lss1", "idle", "lss2", "idle"]
    print(f"cluster of {len(slurm_nodes.names)} nodes up in {slurm_nodes.start_seconds:.2f} s")
    assert slurm_nodes.start_seconds < 15
    for name in slurm_nodes.names:
        assert (slurm_nodes.root / f"spool-{name}").is_dir() and (slurm_nodes.log_dir / f"slurmd-{name}.log").is_file()
        assert slurm_nodes.pids(name), f"no process in {name}'s namespace"


def test_a_step_spans_both_nodes_with_their_names_and_addresses(slurm_nodes: SlurmNodes, tmp_path: Path) -> None:
    """Each task sees its node's host name and address; every node's name resolves to its address everywhere."""
    (tmp_path / "task.sh").write_text(TASK)
    lines = run_job(slurm_nodes, tmp_path, "bash task.sh")
    one, two = slurm_nodes.node_address("lss1"), slurm_nodes.node_address("lss2")
    peers = f"{one} lss1 {two} lss2"
    assert lines == [f"0 lss1 {one}/24 {peers}", f"1 lss2 {two}/24 {peers}"]
    assert sorted(path.name for path in tmp_path.glob("written-on-*")) == ["written-on-lss1", "written-on-lss2"]


def test_srun_from_the_host_reaches_both_nodes(slurm_nodes: SlurmNodes) -> None:
    """srun outside a job (on the host, at the bridge address) gets both nodes' output back."""
    done = slurm_nodes.command("srun", "-N2", "--ntasks-per-node=1", "hostname", timeout=60)
    assert sorted(done.stdout.split()) == ["lss1", "lss2"]


def test_task_on_node_two_reaches_rank_zero_at_master_addr(slurm_nodes: SlurmNodes, tmp_path: Path) -> None:
    """largessl's MASTER_ADDR (lss1) and MASTER_PORT: rank 0 listens there, rank 1 on lss2 connects, as
    torch.distributed's rendezvous does."""
    (tmp_path / "rendezvous.py").write_text(RENDEZVOUS)
    lines = run_job(slurm_nodes, tmp_path, f"{sys.executable} rendezvous.py")
    assert len(lines) == 1 and lines[0].startswith("rank 0 on lss1 at lss1:"), lines
    assert lines[0].endswith(f"heard 'rank 1 on lss2' from {slurm_nodes.node_address('lss2')}"), lines


def test_gloo_all_reduce_across_the_nodes(slurm_nodes: SlurmNodes, tmp_path: Path) -> None:
    """torch.distributed's env:// rendezvous and a gloo all_reduce between the two nodes' ranks."""
    (tmp_path / "all_reduce.py").write_text(ALL_REDUCE)
    lines = run_job(slurm_nodes, tmp_path, f"{sys.executable} all_reduce.py", timeout=180)
    # c10d may warn that "the hostname of the client socket cannot be retrieved": the reverse lookup of a peer's
    # IPv4-mapped IPv6 address is not in the hosts file and goes to DNS, which no node reaches
    assert [line for line in lines if line.startswith("rank ")] == ["rank 0 of 2 on lss1: 3", "rank 1 of 2 on lss2: 3"]


def test_a_cut_link_stops_traffic_until_it_is_back(slurm_nodes: SlurmNodes) -> None:
    """`link(lss2, False)`: lss2 can no longer reach a listener on lss1; `link(lss2, True)` restores it."""
    listener = slurm_nodes.popen_on("lss1", sys.executable, "-c", LISTENER, "7777")
    try:
        assert listener.stdout.readline() == "listening\n"
        connect = (sys.executable, "-c", CONNECT, "lss1", "7777")
        assert slurm_nodes.run_on("lss2", *connect).stdout == "lss1\n"
        slurm_nodes.link("lss2", False)
        try:
            cut = slurm_nodes.run_on("lss2", *connect, check=False)
        finally:
            slurm_nodes.link("lss2", True)
        assert cut.returncode != 0 and ("TimeoutError" in cut.stderr or "unreachable" in cut.stderr), cut.stderr
        assert slurm_nodes.run_on("lss2", *connect).stdout == "lss1\n"
    finally:
        listener.kill()
        listener.wait()
    slurm_nodes.wait_node("lss2")


def test_a_killed_node_leaves_no_process_and_comes_back(slurm_nodes: SlurmNodes) -> None:
    """kill_node empties the node's namespace; start_node's slurmd registers again and the node takes work."""
    slurm_nodes.kill_node("lss2")
    assert slurm_nodes.pids("lss2") == [] and "slurmd-lss2" not in slurm_nodes.processes
    slurm_nodes.start_node("lss2")
    assert sorted(slurm_nodes.command("srun", "-N2", "hostname", timeout=60).stdout.split()) == ["lss1", "lss2"]


def test_a_killed_session_is_cleaned_up_by_the_next(slurm_nodes: SlurmNodes, tmp_path: Path) -> None:
    """A pytest killed by SIGKILL: its daemons die with it (PR_SET_PDEATHSIG); the namespaces, bridge and folder it
    left, and a process still inside (as a stray task would be), go with the next session's
    remove_stale_networks, which leaves this live session alone."""
    with open(tmp_path / "stderr", "w") as stderr:
        session = subprocess.Popen([sys.executable, "-c", KILLED_SESSION], cwd=REPO / "tests", stdout=subprocess.PIPE,
                                   stderr=stderr, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    try:
        line = session.stdout.readline()
        assert line, f"the session to kill did not start:\n{(tmp_path / 'stderr').read_text()}"
        tag, root, stray = line.split()
        daemons = [Path(root) / name for name in ("slurmctld.pid", "slurmd-lss1.pid", "munge/munged.pid")]
        assert all(alive(path) for path in daemons) and int(stray) in namespace_pids(f"lss-{tag}-n1")
    finally:
        session.send_signal(signal.SIGKILL)
        session.wait()
    wait_until(lambda: not any(alive(path) for path in daemons), 20)
    assert namespaces(tag) and Path(root).is_dir() and Path(f"/proc/{stray}").exists()
    remove_stale_networks()
    assert namespaces(tag) == [] and not Path(root).exists()
    wait_until(lambda: not Path(f"/proc/{stray}").exists(), 10)  # killed, and reaped by init
    assert ip("link", "show", f"lssbr{tag}", check=False).returncode != 0
    assert namespaces(slurm_nodes.network.tag) and slurm_nodes.root.is_dir() and slurm_nodes.pids("lss1")


# The killed session: a cluster of this module and a stray `sleep` on lss1; it prints the cluster's tag and folder
# and the sleep's pid, then waits for SIGKILL
KILLED_SESSION = """\
import subprocess, sys, time
import slurm_nodes

session = slurm_nodes.slurm_nodes.__wrapped__()  # kept: a generator that goes is closed, tearing the cluster down
cluster = next(session)
stray = subprocess.Popen(cluster.on_node("lss1", ["sleep", "300"]), start_new_session=True)
while stray.pid not in cluster.pids("lss1"):  # nsenter, then unshare, sh and sleep: one pid
    time.sleep(0.01)
print(cluster.network.tag, cluster.root, stray.pid, flush=True)
time.sleep(300)
"""


def wait_until(ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.1)


def test_stale_network_without_a_folder_is_removed() -> None:
    """A namespace of this module whose folder is gone (a /tmp cleaned after a crash) and which holds no process."""
    check_prerequisites()
    network = pick_network(1)
    make_network(network)
    assert namespaces(network.tag)
    remove_stale_networks()
    assert namespaces(network.tag) == []
    assert not any(root.name.startswith(f"{ROOT_PREFIX}{network.tag}") for root in roots())


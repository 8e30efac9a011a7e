"""A real multi-node SLURM cluster on one machine for the tests: the session fixture `slurm_nodes`.

Each node is a network namespace `lss-TAG-nK` (TAG: 4 random hex digits per session) whose `eth0` is one end of a
veth pair; the other end, `lss-TAG-hK`, is a port of the bridge `lssbrTAG` that this module creates with a private
/24 of its own, 10.213.N.0/24 with N random and unused here: the host side is 10.213.N.1 (slurmctld listens there,
as on every address of the host), node K (named lssK) is 10.213.N.(10+K). Node K's slurmd runs in its network
namespace, in a UTS namespace whose host name is lssK and in a mount namespace where the cluster's hosts file is
bound over /etc/hosts (`SlurmNodes.on_node`), so its jobs see what they would see on a cluster node: their own host
name and address, and every node and the controller by name, which is how MASTER_ADDR=lss1
(largessl.launch.slurm) resolves and how gloo finds its interface. One munged (its socket is a file, which every
namespace reaches) and one slurmctld serve all nodes. The filesystem is the host's everywhere: the run directory,
shards and MLflow store of a test (its tmp_path) are shared by all nodes, as on a cluster's shared filesystem; each
slurmd has its own spool, pid and log file (slurm.conf's "%n"). Every node has the host's cores and memory and the
8 count-only GPUs of slurm_cluster.py (oversubscribed: jobs on two nodes share the host's CPUs). slurmctld sets a
node DOWN after NODE_TIMEOUT s without an answer (a killed node, a cut link). srun works from the host too: the
nodes reach it at 10.213.N.1.

Helpers for node loss and network cuts: `kill_node` (SIGKILL everything in the namespace), `start_node`, `link`
(the node's veth down or up), `wait_node`, and `run_on` / `popen_on` (a command on a node, outside SLURM).

The nodes have no default route: they reach the host and each other only, and a name outside the hosts file fails
at once (no DNS). Where br_netfilter is loaded with bridge-nf-call-iptables=1 and iptables drops forwarded packets
(Docker hosts), the traffic between nodes would be dropped: the rendezvous tests would fail on it.

Teardown stops the daemons, kills what is left in the namespaces and removes them and the bridge (nothing but the
namespaces' /run/netns entries is written outside the cluster folder). The daemons die with pytest
(PR_SET_PDEATHSIG survives the execs of nsenter, unshare and sh); the next session removes what a killed one left
(`remove_stale_networks`). Needs root, iproute2 and util-linux besides SLURM; without them the fixture skips, or
fails with CI set.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from slurm_cluster import (
    CLIENTS,
    DAEMONS,
    SlurmCluster,
    abandoned,
    binary,
    daemon,
    make_root,
    node_lines,
    node_name,
    node_state,
    parse_job,
    remove_stale_roots,
    start_controller,
    start_munge,
    stop,
    unavailable,
    wait_for,
    write_slurm_conf,
)

NODES = 2
NODE_TIMEOUT = 10  # slurmctld's SlurmdTimeout here: a node that does not answer for this long is set DOWN
ROOT_PREFIX = "largessl-nodes-"  # + TAG + "-" + random: the cluster folder (not slurm_cluster.py's prefix)
NETNS_RUN = Path("/run/netns")  # where `ip netns add` mounts the namespaces
TOOLS = ("ip", "nsenter", "unshare", "mount", "hostname")
# sh -c, run in a new UTS and mount namespace: $0 is the node's name, $1 the hosts file; then the command
NODE_EXEC = 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"'


@dataclass(frozen=True)
class Network:
    """The names and addresses of one session's private network (see the module docstring)."""

    tag: str
    subnet: int  # N of 10.213.N.0/24
    nodes: int

    @property
    def bridge(self) -> str:
        return f"lssbr{self.tag}"

    @property
    def gateway(self) -> str:
        """The host's address on the bridge, where the nodes reach slurmctld."""
        return self.address(0)

    def address(self, index: int) -> str:
        """Node `index`'s address (1-based); 0 is the host's."""
        return f"10.213.{self.subnet}.{10 + index if index else 1}"

    def name(self, index: int) -> str:
        return f"lss{index}"

    def namespace(self, index: int) -> str:
        return f"lss-{self.tag}-n{index}"

    def veth(self, index: int) -> str:
        """The host end of node `index`'s veth pair (its other end is eth0 in the namespace)."""
        return f"lss-{self.tag}-h{index}"

    @property
    def indices(self) -> range:
        return range(1, self.nodes + 1)


class SlurmNodes(SlurmCluster):
    """Client side of the multi-node cluster, with the helpers that lose nodes and cut links."""

    def __init__(self, root: Path, network: Network, cpus: int) -> None:
        super().__init__(root, f"lss[1-{network.nodes}]", cpus)
        self.network = network
        self.names = [network.name(index) for index in network.indices]
        self.start_seconds = 0.0  # how long the fixture took to start the cluster

    def index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"no node {name!r} in this cluster (nodes: {', '.join(self.names)})")
        return self.names.index(name) + 1

    def node_address(self, name: str) -> str:
        return self.network.address(self.index(name))

    def namespace(self, name: str) -> str:
        return self.network.namespace(self.index(name))

    def on_node(self, name: str, args: Sequence[str]) -> list[str]:
        """`args` as a command on node `name`: in its network namespace, with its host name (a UTS namespace) and
        the cluster's /etc/hosts (bound in a mount namespace). Not `ip netns exec`, which would also mount a sysfs
        of the namespace's own, without the /sys/fs/cgroup that slurmd needs."""
        return [tool("nsenter"), f"--net={NETNS_RUN / self.namespace(name)}", "--", tool("unshare"), "--uts",
                "--mount", "--propagation", "slave", "--", "sh", "-c", NODE_EXEC, name, str(self.root / "hosts"), *args]

    def run_on(self, name: str, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command on node `name` outside SLURM (environment: this process's, with SLURM_CONF)."""
        return self.command(*self.on_node(name, args), timeout=timeout, check=check)

    def popen_on(self, name: str, *args: str) -> subprocess.Popen:
        """Start a command on node `name` outside SLURM; the caller ends it (text stdout and stderr are pipes)."""
        return subprocess.Popen(self.on_node(name, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env())

    def pids(self, name: str) -> list[int]:
        """Every process in node `name`'s network namespace: its slurmd, slurmstepds and job tasks."""
        return namespace_pids(self.namespace(name))

    def kill_node(self, name: str) -> None:
        """Node loss: SIGKILL its slurmd and every process on it, as a power cut would (its link stays up)."""
        kill_namespace(self.namespace(name))
        proc = self.processes.pop(f"slurmd-{name}", None)
        if proc is not None:
            proc.wait(timeout=15)

    def start_node(self, name: str, timeout: float = 30) -> None:
        """Start node `name`'s slurmd (again, after kill_node) and wait until slurmctld has its registration."""
        before = self.node_info(name).get("SlurmdStartTime")
        start_slurmd(self, name)
        wait_for(lambda: registered(self.node_info(name), before), self, f"{name} to register", timeout)

    def wait_node(self, name: str, timeout: float = 30, resume: bool = True) -> None:
        """Wait until slurmctld hears from node `name` and has it in service (after a cut link is back, say). A node
        set DOWN (no answer for NODE_TIMEOUT s) is pinged rarely: on its own slurmctld takes about 50 s to see it
        back, so with `resume` this does what an admin would, `scontrol update State=RESUME`, which asks now."""
        if resume and self.node_info(name).get("State", "").startswith("DOWN"):
            self.command("scontrol", "update", f"NodeName={name}", "State=RESUME", check=False)
        wait_for(lambda: answering(self.node_info(name)), self, f"{name} to answer", timeout)

    def link(self, name: str, up: bool) -> None:
        """Network cut (`up` False) or repair of node `name`: its veth on the bridge goes down or up. The node's
        processes keep running; nothing reaches it, nor leaves it, while it is down."""
        ip("link", "set", self.network.veth(self.index(name)), "up" if up else "down")

    def node_info(self, name: str) -> dict[str, str]:
        """`scontrol show node -o NAME` as a dict (State, SlurmdStartTime, Reason, ...)."""
        done = self.command("scontrol", "show", "node", "-o", name, check=False)
        return parse_job(done.stdout.splitlines()[0]) if done.stdout.strip() else {}


def registered(info: Mapping[str, str], before: str | None) -> bool:
    """Whether a node's slurmd (its node_info) has registered since `before` (its earlier SlurmdStartTime) and
    answers."""
    return info.get("SlurmdStartTime") not in (before, None, "None") and answering(info)


def answering(info: Mapping[str, str]) -> bool:
    """Whether a node (its node_info) answers slurmctld and is in service: not DOWN, not NOT_RESPONDING."""
    state = info.get("State", "")
    return bool(state) and "NOT_RESPONDING" not in state and not state.startswith("DOWN")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """An `ip` (iproute2) command; raises with its message when it fails and `check` is set."""
    done = subprocess.run([tool("ip"), *args], capture_output=True, text=True, timeout=15)
    if check and done.returncode:
        raise RuntimeError(f"`ip {' '.join(args)}` exited {done.returncode}: {done.stderr.strip()}")
    return done


def tool(name: str) -> str:
    """A program's path, also where PATH lacks the sbin folders (Debian's `ip` is /usr/sbin/ip)."""
    return binary(name) or name


def pick_network(nodes: int) -> Network:
    """A tag and a 10.213.N.0/24 that no interface, route or earlier session on this host uses."""
    used = ip("-4", "-o", "addr", "show").stdout + ip("-4", "route", "show", "table", "all").stdout
    taken = set(namespaces())
    subnets = [n for n in range(256) if f"10.213.{n}." not in used]
    while True:  # secrets, not random: pytest-xdist workers may share random's seed
        tag = secrets.token_hex(2)
        if not any(tag in name for name in taken) and not ip("link", "show", f"lssbr{tag}", check=False).stdout:
            return Network(tag, subnets[secrets.randbelow(len(subnets))], nodes)


def make_network(network: Network) -> None:
    """The bridge with the host's address, and each node's namespace, veth pair, address and loopback."""
    bridge = network.bridge
    ip("link", "add", bridge, "type", "bridge")
    ip("addr", "add", f"{network.gateway}/24", "dev", bridge)
    ip("link", "set", bridge, "up")
    for index in network.indices:
        make_node_network(network, index)


def make_node_network(network: Network, index: int) -> None:
    """Node `index`'s namespace, with eth0 (its address, up) paired to a bridge port, and lo up (for 127.0.0.1)."""
    namespace, veth = network.namespace(index), network.veth(index)
    ip("netns", "add", namespace)
    ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
    ip("link", "set", veth, "master", network.bridge, "up")
    ip("-n", namespace, "addr", "add", f"{network.address(index)}/24", "dev", "eth0")
    ip("-n", namespace, "link", "set", "eth0", "up")
    ip("-n", namespace, "link", "set", "lo", "up")


def write_hosts(root: Path, network: Network, controller: str) -> None:
    """`root`/hosts, every node's /etc/hosts (SlurmNodes.on_node): localhost, the controller's name at the
    bridge address, every node's name and address."""
    lines = ["127.0.0.1 localhost", *([f"{network.gateway} {controller}"] if controller != "localhost" else []),
             *(f"{network.address(index)} {network.name(index)}" for index in network.indices)]
    (root / "hosts").write_text("\n".join(lines) + "\n")


def namespace_pids(namespace: str) -> list[int]:
    return [int(pid) for pid in ip("netns", "pids", namespace, check=False).stdout.split()]


def kill_namespace(namespace: str, timeout: float = 15) -> None:
    """SIGKILL every process in the namespace until none is left (a dying slurmstepd may still fork)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = namespace_pids(namespace)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def remove_network(tag: str) -> None:
    """Remove every namespace, veth and the bridge of session `tag`, killing what still runs in its namespaces;
    missing pieces are skipped."""
    for namespace in namespaces(tag):
        kill_namespace(namespace)
        ip("netns", "delete", namespace, check=False)  # its eth0 goes, and with it the host's end of the pair
    ip("link", "delete", f"lssbr{tag}", check=False)


def namespaces(tag: str = "*") -> list[str]:
    """The names of this module's network namespaces (of session `tag`, or all)."""
    return sorted(path.name for path in NETNS_RUN.glob(f"lss-{tag}-n*"))


def remove_stale_networks() -> None:
    """Remove what killed sessions left: the network of each abandoned cluster folder, then the namespaces with
    no folder and no process (a folder lost with /tmp)."""
    for root in roots():
        if abandoned(root):
            remove_network(root_tag(root))
    remove_stale_roots(ROOT_PREFIX)
    live = {root_tag(root) for root in roots()}
    for namespace in namespaces():
        tag = namespace.split("-")[1]
        if tag not in live and not namespace_pids(namespace):
            remove_network(tag)


def roots() -> list[Path]:
    """The cluster folders of this module's sessions on this host, live or not."""
    return sorted(Path(tempfile.gettempdir()).glob(f"{ROOT_PREFIX}*"))


def root_tag(root: Path) -> str:
    return root.name.removeprefix(ROOT_PREFIX).split("-")[0]


def start_slurmd(cluster: SlurmNodes, name: str) -> None:
    """slurmd of node `name`, in its namespaces (see SlurmNodes.on_node), as a child that dies with pytest."""
    args = [binary("slurmd"), "-D", "-N", name, "-f", str(cluster.conf)]
    daemon(cluster.on_node(name, args), cluster, f"slurmd-{name}", env=cluster.env())


def configure(root: Path, network: Network) -> SlurmNodes:
    """slurm.conf (controller at the bridge address, one NodeName per node), the hosts file, per-node spools."""
    controller = node_name()
    nodes, cpus = node_lines({network.name(k): network.address(k) for k in network.indices})
    write_slurm_conf(root, f"{controller}({network.gateway})", nodes, per_node="-%n", slurmd_timeout=NODE_TIMEOUT)
    write_hosts(root, network, controller)
    for index in network.indices:
        (root / f"spool-{network.name(index)}").mkdir(mode=0o755)
    return SlurmNodes(root, network, cpus)


def start_cluster(cluster: SlurmNodes) -> None:
    """munged, slurmctld, then every node's slurmd; ready once sinfo shows every node idle (all registered)."""
    start_munge(cluster)
    start_controller(cluster)
    for name in cluster.names:
        start_slurmd(cluster, name)
    wait_for(lambda: node_state(cluster) == "idle", cluster, "every node to be idle", 30)


def check_prerequisites() -> None:
    """Skip (or fail, in CI) without SLURM, munge, the namespace tools (TOOLS) or root."""
    missing = [name for name in (*DAEMONS, *CLIENTS, *TOOLS) if binary(name) is None]
    if missing:
        unavailable(f"no {', '.join(missing)}: run .ci/slurm_setup.sh once, as root (SLURM, munge, iproute2)")
    if os.geteuid() != 0:
        unavailable("the multi-node SLURM test cluster makes network namespaces and runs slurmd: it needs root")


def build_network(network: Network) -> None:
    """make_network, or skip (fail in CI) where this machine cannot make namespaces, veths or bridges."""
    try:
        make_network(network)
    except RuntimeError as exc:
        remove_network(network.tag)
        unavailable(f"cannot make the test cluster's network here: {exc}")


@pytest.fixture(scope="session")
def slurm_nodes() -> Iterator[SlurmNodes]:
    """A running SLURM cluster of NODES nodes, each in its own network namespace (see the module docstring);
    stopped and removed after the session."""
    check_prerequisites()
    started = time.monotonic()
    remove_stale_networks()
    network = pick_network(NODES)
    root = make_root(f"{ROOT_PREFIX}{network.tag}-")  # before the network: remove_stale_networks goes by it
    try:
        build_network(network)
        cluster = configure(root, network)
        try:
            start_cluster(cluster)
            cluster.start_seconds = time.monotonic() - started
            yield cluster
        finally:
            stop(cluster)
    finally:
        remove_network(network.tag)
        shutil.rmtree(root, ignore_errors=True)

"""A real Slurm cluster for the launch tests: one node on loopback, or two nodes made of network
namespaces on this one machine (../shared/notes/slurm-two-node-sim.md).

Everything lives in a temporary directory and on ports picked free at start-up: its own munged
(own key and socket), slurmctld and slurmd(s), with ``SLURM_CONF`` pointing clients at its
slurm.conf. Nothing under /etc is touched: each namespace node sees its own /etc/hosts through
a bind mount in a private mount namespace, as a cluster node resolves its peers' names. Needs
root and Debian's ``slurmctld slurmd slurm-client munge`` (``.ci/run`` installs them).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue")
# Two namespace "nodes" on a bridge; the controller listens on the bridge's address.
SUBNET = "10.77.0"
BRIDGE = "wmssbr0"


def unavailable_reason() -> Optional[str]:
    """Why a cluster cannot be brought up here, or None."""
    if os.geteuid() != 0:
        return "needs root (munged, slurmd and network namespaces)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing): apt-get install "
                "slurmctld slurmd slurm-client munge (as .ci/run does)")
    return None


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


class SlurmCluster:
    """``with SlurmCluster(tmp, nodes=2) as cluster: cluster.sbatch(...)``.

    ``nodes=1``: one node on 127.0.0.1. ``nodes=2``: nodes ``n1``/``n2`` at SUBNET.1 / SUBNET.2
    in their own network namespaces; jobs started there run inside them, so rendezvous and
    gloo traffic really cross the bridge. ``cpus`` per node (declared, not enforced).
    """

    def __init__(self, root: Path, nodes: int = 1, cpus: int = 2) -> None:
        if nodes not in (1, 2):
            raise ValueError(f"nodes must be 1 or 2, got {nodes}")
        self.root, self.nodes, self.cpus = Path(root), nodes, cpus
        self.conf = self.root / "slurm.conf"
        self.names = ["n0"] if nodes == 1 else ["n1", "n2"]
        self._procs: list[subprocess.Popen] = []
        self._netns: list[str] = []
        self._bridge = False

    # -- life cycle ---------------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def env(self) -> dict[str, str]:
        """The environment of a client (sbatch, scontrol) of this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = self.root / "munge.socket"
        self._spawn(["munged", "-F", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={key}", f"--pid-file={self.root / 'munged.pid'}",
                     f"--log-file={self.root / 'log' / 'munged.log'}",
                     f"--seed-file={self.root / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), "munged's socket")
        if self.nodes == 2:
            self._make_namespaces()
        ctld_addr = "127.0.0.1" if self.nodes == 1 else f"{SUBNET}.254"
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text(self._config(ctld_addr, ctld_port, slurmd_port))
        self._spawn(["slurmctld", "-D", "-f", str(self.conf)])
        for i, name in enumerate(self.names):
            cmd = ["slurmd", "-D", "-f", str(self.conf), "-N", name]
            if self.nodes == 2:
                hosts = self.root / f"hosts-{name}"
                hosts.write_text("127.0.0.1 localhost\n" + "".join(
                    f"{SUBNET}.{j + 1} {other}\n" for j, other in enumerate(self.names)))
                inner = (f"mount --bind {hosts} /etc/hosts && hostname {name} && "
                         f"exec {' '.join(cmd)}")
                cmd = ["nsenter", f"--net=/run/netns/{self._netns[i]}", "unshare", "--uts",
                       "--mount", "sh", "-c", inner]
            self._spawn(cmd)
        self._wait(self._all_idle, "every node idle in sinfo", timeout=60)

    def _config(self, ctld_addr: str, ctld_port: int, slurmd_port: int) -> str:
        host = socket.gethostname().split(".")[0]
        root = self.root
        lines = [
            "ClusterName=wmsstest",
            f"SlurmctldHost={host}({ctld_addr})",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # A requeued job waits cred_expire seconds before it may start (default 120).
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}/%n",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root}/slurmd-%n.pid",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log'}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerParameters=sched_interval=2",
            # sbatch --wait polls every 2 s, growing 4x up to 32 s while the interval is under
            # MinJobAge / 2: 4 keeps it at 2 s. Finished jobs stay visible to scontrol for at
            # least 4 s (purged in a 60 s cycle), long enough for the checks that follow.
            "MinJobAge=4",
            "KillWait=10",
        ]
        for i, name in enumerate(self.names):
            addr = "127.0.0.1" if self.nodes == 1 else f"{SUBNET}.{i + 1}"
            lines.append(f"NodeName={name} NodeAddr={addr} CPUs={self.cpus} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _make_namespaces(self) -> None:
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        self._bridge = True
        _sh("ip", "addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")
        for i, name in enumerate(self.names):
            ns, host_end = f"wmss-{name}", f"wmssv{i + 1}"
            _sh("ip", "netns", "add", ns)
            self._netns.append(ns)
            _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _sh("ip", "link", "set", host_end, "master", BRIDGE, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _spawn(self, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{Path(cmd[0]).name}-{len(self._procs)}.out", "wb")
        self._procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True))
        log.close()

    def _all_idle(self) -> bool:
        for proc in self._procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: "
                                   f"{self.logs()}")
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env,
                             capture_output=True, text=True)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return out.returncode == 0 and all(states.get(n) == "idle" for n in self.names)

    def _wait(self, ready, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}: {self.logs()}")
            time.sleep(0.3)

    def logs(self, tail: int = 3000) -> str:
        """The daemons' logs (last characters of each), for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def close(self) -> None:
        if self._procs:  # end this cluster's jobs (SLURM_CONF points at it) while ctld lives
            subprocess.run(["scancel", "--user=root", "--full"], env=self.env,
                           capture_output=True, timeout=30)
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        for ns in self._netns:  # whatever still runs on a namespace node
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._netns.clear()
        if self._bridge:
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
            self._bridge = False

    # -- clients ------------------------------------------------------------------------------
    def run(self, *args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=kwargs.pop("env", self.env), capture_output=True,
                              text=True, timeout=timeout, **kwargs)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        result = self.run("scontrol", "-o", "show", "job", job_id)
        if result.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id}: {result.stderr.strip()}")
        out, fields = result.stdout, {}
        for token in out.split():
            key, _, value = token.partition("=")
            fields[key] = value
        return fields

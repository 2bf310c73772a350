"""A real SLURM cluster of several nodes on this one machine for the launch tests (Debian's
packages): one slurmctld and one ``slurmd -N <node>`` per node, each node with its own name, port
and ``NodeAddr=127.0.0.1``. The node names resolve nowhere, as on a cluster whose DNS this host
does not share: a launcher that needs the head node's address must ask SLURM for it.

Everything but munge's key lives in a temporary folder and is reached through SLURM_CONF, so an
existing SLURM setup is left alone; only the daemons started here are stopped, by PID.
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmd", "slurmctld", "slurm-client", "munge"]


class Unavailable(Exception):
    """SLURM cannot be brought up here; the message says why."""


def _run(cmd, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def _install() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("SLURM is not installed and cannot be (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    if _run(install, env=env, timeout=900).returncode != 0:
        _run(["apt-get", "update", "-qq"], env=env, timeout=600)
        out = _run(install, env=env, timeout=900)
        if out.returncode != 0:
            raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {out.stderr[-500:]}")


def _munge_works() -> bool:
    if not shutil.which("munge"):
        return False
    encoded = _run(["munge", "-n"], timeout=10)
    return encoded.returncode == 0 and _run(["unmunge"], input=encoded.stdout,
                                            timeout=10).returncode == 0


def _start_munge() -> int | None:
    """Start munged as user munge unless one already answers; returns the PID we started."""
    if _munge_works():
        return None
    key = Path("/etc/munge/munge.key")
    munge_user = pwd.getpwnam("munge")
    if not key.is_file():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
    for path in (key.parent, key):
        os.chown(path, munge_user.pw_uid, munge_user.pw_gid)
    key.chmod(0o400)
    for folder in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        os.chown(folder, munge_user.pw_uid, munge_user.pw_gid)
    out = _run(["runuser", "-u", "munge", "--", "munged"], timeout=30)
    if out.returncode != 0:
        raise Unavailable(f"munged did not start: {out.stderr[-500:]}")
    for _ in range(50):
        if _munge_works():
            return int(Path("/run/munge/munged.pid").read_text().split()[0])
        time.sleep(0.2)
    raise Unavailable("munged started but does not answer")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


NODES = ("node1", "node2")
CPUS_PER_NODE = 8     # declared (config_overrides): the emulated nodes share this host's cores


def _write_conf(folder: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=twolevel-test",
        f"SlurmctldHost={host}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "MpiDefault=none",
        "ReturnToService=2",
        f"SlurmctldPort={_free_port()}",
        "SlurmdParameters=config_overrides",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}/%n",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd'}-%n.pid",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd'}-%n.log",
        *(f"NodeName={node} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={CPUS_PER_NODE} "
          f"State=UNKNOWN" for node in NODES),
        "PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ""]))
    return conf


class SlurmCluster:
    def __init__(self, folder: Path):
        self.folder = folder
        self.pids: list[int] = []

    def start(self) -> dict:
        _install()
        munge_pid = _start_munge()
        if munge_pid:
            self.pids.append(munge_pid)
        conf = _write_conf(self.folder)
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        for node in NODES:
            (self.folder / "spool" / node).mkdir(parents=True, exist_ok=True)
        for daemon, pid_name in [(["slurmctld"], "slurmctld"),
                                 *((["slurmd", "-N", n], f"slurmd-{n}") for n in NODES)]:
            out = _run(daemon, env=self.env, timeout=60)
            pid_file = self.folder / f"{pid_name}.pid"
            for _ in range(50):
                if pid_file.is_file() and pid_file.read_text().strip():
                    break
                time.sleep(0.2)
            if out.returncode != 0 or not pid_file.is_file():
                raise Unavailable(f"{' '.join(daemon)} did not start: {out.stderr[-500:]} "
                                  f"{self.log(pid_name)[-1000:]}")
            self.pids.append(int(pid_file.read_text().split()[0]))
        deadline = time.time() + 90
        while time.time() < deadline:
            state = _run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, timeout=30).stdout.split()
            if len(state) == len(NODES) and all(s in ("idle", "mix", "alloc") for s in state):
                return self.env
            time.sleep(1)
        raise Unavailable(f"the node never became idle: {self.log('slurmctld')[-1000:]}")

    def log(self, daemon: str) -> str:
        path = self.folder / f"{daemon}.log"
        return path.read_text() if path.is_file() else ""

    def stop(self) -> None:
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.pids.clear()

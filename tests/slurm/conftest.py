"""A one-node Slurm cluster on localhost (munged, slurmctld, slurmd) for the job-script tests."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SBIN = Path("/usr/sbin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "sinfo")
# Job states after which a job never runs again by itself (a requeued job passes through none of them).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                "OUT_OF_MEMORY", "PREEMPTED"}
# More CPUs than this machine has (SlurmdParameters=config_overrides lets the node claim them), so
# that a 5-task job fits on a 2-core CI machine; the ranks then share the real cores.
NODE_CPUS = 8


def _installed() -> bool:
    return all((SBIN / d).exists() for d in DAEMONS) and all(shutil.which(c) for c in CLIENTS)


def _install() -> str | None:
    """Install slurm-wlm and munge if missing; the reason the cluster cannot run here, or None."""
    if os.geteuid() != 0:  # slurmd and munged run as root here, and apt-get needs it too
        return "a local Slurm cluster needs root (slurmd, munged, apt-get)"
    if _installed():
        return None
    if not shutil.which("apt-get"):
        return "slurm-wlm and munge are not installed and there is no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    try:
        proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=300)
        if proc.returncode != 0:  # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=200)
            proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=300)
    except subprocess.TimeoutExpired:
        return "apt-get install slurm-wlm munge timed out"
    if proc.returncode != 0 or not _installed():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"apt-get install slurm-wlm munge failed: {tail[0]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(d: Path, host: str) -> str:
    return f"""\
ClusterName=hpdltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={d}/munge/munge.socket,cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
# No cgroups in containers: track job processes by parent pid, bind nothing (mpirun binds).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
# Look at pending jobs every 2 s instead of 30-60 s, so a requeued job starts soon after its hold.
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
# scontrol remembers finished jobs (state, exit code, restarts) for an hour: there is no sacct here.
MinJobAge=3600
KillWait=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    """The running cluster: its config, the environment its clients need, and job helpers."""

    root: Path
    env: dict[str, str]
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, script: Path, *options: str, args: tuple[str, ...] = (), env: dict[str, str] | None = None,
               cwd: Path) -> int:
        """Submit `script` (from `cwd`, as a user would) with sbatch options and script arguments; the job id."""
        cmd = ["sbatch", "--parsable", *options, str(script), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **(env or {})}, cwd=cwd,
                              timeout=30)
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr.strip()}"
        return int(proc.stdout.strip().split(";")[0])

    def jobs(self, job_id: int) -> list[dict[str, str]]:
        """scontrol's record of the job: one dict per job (per task of an array job)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def wait(self, job_id: int, timeout: float, until=None) -> list[dict[str, str]]:
        """Poll until `until(records)` holds (default: every record of the job is final); fail at `timeout`,
        or as soon as the job has ended without `until` holding."""
        deadline = time.monotonic() + timeout
        records: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            records = self.jobs(job_id)
            final = bool(records) and all(r["JobState"] in FINAL_STATES for r in records)
            if records and (until(records) if until else final):
                return records
            if final:
                raise AssertionError(f"job {job_id} ended first: {self._states(records)}\n{self.log_tail()}")
            time.sleep(0.2)
        self.run("scancel", str(job_id), check=False)
        raise AssertionError(f"job {job_id} not done after {timeout:.0f} s: {self._states(records)}\n"
                             f"{self.log_tail()}")

    @staticmethod
    def _states(records: list[dict[str, str]]) -> list[tuple[str, ...]]:
        return [(r.get("JobId", "?"), r.get("JobState", "?"), r.get("Reason", "?")) for r in records]

    def log_tail(self, lines: int = 20) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, wait for them to leave the node, then stop the daemons, newest first."""
        if self.daemons and self.daemons[-1].poll() is None:
            self.run("scancel", "--full", "--user", "root", check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                queue = self.run("squeue", "-h", "-t", "all", "-o", "%T", check=False).stdout.split()
                if not set(queue) & {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED"}:
                    break
                time.sleep(0.5)
        for proc in reversed(self.daemons):
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _start(root: Path) -> SlurmCluster:
    host = socket.gethostname().split(".")[0]
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(mode=0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host))
    # The jobs must talk to this cluster only, whatever Slurm job or settings pytest runs inside.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
    env["SLURM_CONF"] = str(conf)
    cluster = SlurmCluster(root, env)
    m = root / "munge"

    def launch(*cmd: str) -> None:
        with open(root / "log" / f"{Path(cmd[0]).name}.out", "w") as out:  # the daemon keeps its own copy
            cluster.daemons.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))

    launch(str(SBIN / "munged"), "--foreground", "--force", f"--socket={m}/munge.socket", f"--key-file={key}",
           f"--log-file={m}/munged.log", f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed")
    deadline = time.monotonic() + 15
    while not (m / "munge.socket").exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # slurmctld authenticates through munged from its first message on
    launch(str(SBIN / "slurmctld"), "-D", "-i")
    launch(str(SBIN / "slurmd"), "-D", "-N", host)
    state = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = cluster.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
        if state == "idle":
            return cluster
        if any(p.poll() is not None for p in cluster.daemons):
            break
        time.sleep(0.5)
    cluster.stop()
    raise RuntimeError(f"the local Slurm cluster did not come up (node state {state!r})\n{cluster.log_tail()}")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> SlurmCluster:
    """A running one-node cluster, installed with apt-get where missing; every test using it is skipped,
    with the reason, without root, apt-get or a working install. The daemons are pytest's children, with
    their configuration, state and logs in a temporary directory, stopped after the session."""
    reason = _install()
    if reason:
        pytest.skip(reason)
    cluster = _start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()

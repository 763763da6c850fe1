"""`mpirun -n 4 python -m hpdl.guard python -m hpdl.train ...`: each rank's command under a parent that names it if it dies.

When a rank dies (SIGKILL, the OOM killer, a segfault), MPICH's hydra mpiexec SIGKILLs
every other rank at once and ends the job, but its banner (`PID 5090 RUNNING AT node7`)
is no witness: it names the first process in its own list that ended abnormally, often
one it killed itself, and never a rank number. The guard runs the rank's command as its
child and is the first to know how it ended: killed by a signal, it prints

    hpdl.guard: rank 2 (worker stage 1 replica 0, pid 5090 on node7) was killed by SIGKILL; ending the job

and exits 128 + the signal, which makes hydra end the job. Any other exit status passes
through unchanged (the rank has said what went wrong itself). The child dies with its
guard (PR_SET_PDEATHSIG), so hydra's clean-up still reaches it; SIGINT and SIGTERM are
passed on to it. The role comes from the rank table hpdl.train's rank 0 writes to the
file HPDL_RANK_TABLE names, when that is set.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

TABLE_ENV = "HPDL_RANK_TABLE"
HOST_BYTES = 256
PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# How long a rank whose MPI call failed (most often: a peer died) waits before its abort ends the job, so that
# the dead rank's guard names it first.
PEER_DEATH_GRACE_S = 2.0


def publish_rank_table(comm, layout) -> None:
    """Collective: with HPDL_RANK_TABLE set, rank 0 writes every rank's host, pid and role there (JSON)."""
    import numpy as np  # here, not at the top: a guard per rank stays a bare interpreter
    from mpi4py import MPI

    from .comm.topology import node_ids, place
    path = os.environ.get(TABLE_ENV)
    if not path:
        return
    roles = place(layout, node_ids(comm))
    host = np.zeros(HOST_BYTES, np.uint8)
    name = MPI.Get_processor_name().encode()[:HOST_BYTES]
    host[:len(name)] = np.frombuffer(name, np.uint8)
    root = comm.Get_rank() == 0
    pids = np.empty(comm.Get_size(), np.int64) if root else None
    hosts = np.empty((comm.Get_size(), HOST_BYTES), np.uint8) if root else None
    comm.Gather(np.array([os.getpid()], np.int64), pids, root=0)
    comm.Gather(host, hosts, root=0)
    if root:
        table = [{"rank": r, "pid": int(pid), "host": bytes(h).rstrip(b"\0").decode(errors="replace"),
                  "role": describe_role(roles[r])} for r, (pid, h) in enumerate(zip(pids, hosts))]
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(table))
        os.replace(tmp, path)


def describe_role(role) -> str:
    return f"worker stage {role.stage} replica {role.replica}" if role.kind == "worker" else f"ps {role.ps_index}"


def role_of(pid: int) -> str:
    """The rank's role from the rank table, or '' without one."""
    try:
        rows = json.loads(Path(os.environ[TABLE_ENV]).read_text())
    except (KeyError, OSError, ValueError):
        return ""
    return next((f"{row['role']}, " for row in rows if row.get("pid") == pid), "")


def death_line(rank: str, pid: int, host: str, sig: int, role: str = "") -> str:
    return (f"hpdl.guard: rank {rank} ({role}pid {pid} on {host}) was killed by {signal.Signals(sig).name}; "
            "ending the job")


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0])
        return 0 if argv else 2
    try:
        # close_fds=False: the rank needs the PMI socket hydra handed to this process (PMI_FD).
        # preexec_fn is safe here: the guard starts no threads.
        child = subprocess.Popen(argv, close_fds=False, preexec_fn=_die_with_parent)
    except OSError as e:
        print(f"hpdl.guard: error: cannot start {argv[0]}: {e.strerror}", file=sys.stderr)
        return 2
    for sig in FORWARDED:
        signal.signal(sig, lambda s, _: child.send_signal(s))
    code = child.wait()
    if code >= 0:
        return code
    host = os.environ.get("PMI_HOSTNAME") or socket.gethostname()
    # One write: guards of several ranks reporting at once must not splice their lines.
    sys.stderr.write(death_line(os.environ.get("PMI_RANK", "?"), child.pid, host, -code, role_of(child.pid)) + "\n")
    sys.stderr.flush()
    return 128 - code


if __name__ == "__main__":
    sys.exit(main())

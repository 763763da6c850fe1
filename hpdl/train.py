"""The command line: `python -m hpdl.train [--config FILE] [flags]`, ending in a RESULT line."""
from __future__ import annotations

import os
import sys
import time
import traceback

import numpy as np
from threadpoolctl import threadpool_limits

from .backend import Backend, BackendError
from .checkpoint import CheckpointError
from .config import ConfigError, make_config
from .data import DataError
from .guard import PEER_DEATH_GRACE_S, publish_rank_table
from .hostmem import keep_freed_memory
from .metrics import print_result
from .nonfinite import NonFiniteError
from .precision import parse_precision, use
from .threads import default_threads
from .trainer import train_local

# MemoryError: numpy's message names the size asked for (an oversized model or batch).
USER_ERRORS = (ConfigError, DataError, CheckpointError, BackendError, NonFiniteError, MemoryError)


# Overflow on the way to a NaN is reported once, as the optimizer's one-line non-finite error,
# instead of as NumPy warnings before it.
def quiet_fp() -> np.errstate:
    return np.errstate(over="ignore", invalid="ignore")


OUTPUT_GRACE_S = 0.5


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    keep_freed_memory()
    try:
        cfg = make_config(argv)
        backend = Backend(cfg.device, cfg.dtype)
    except USER_ERRORS as e:
        return user_error(e)
    if world_size() == 1:
        if cfg.algorithm != "sync":  # the others combine replicas: there is none here
            return user_error(ConfigError(f"--algorithm {cfg.algorithm} combines replicas over MPI ranks: "
                                          "run it under mpirun -np N"))
        try:
            with threadpool_limits(cfg.threads or default_threads()), quiet_fp(), \
                    use(parse_precision(cfg.precision), backend.is_gpu):
                result = train_local(cfg, backend)
        except USER_ERRORS as e:
            return user_error(e)
        except KeyboardInterrupt:
            print("hpdl.train: interrupted", file=sys.stderr)
            return 130
    else:
        result = run_mpi(cfg, backend)
        if isinstance(result, int):
            return result
    if result is not None:
        result["wall_s"] = time.perf_counter() - t0
        print_result(result)
    return 0


def world_size() -> int:
    """Ranks launched by mpirun, read from the environment so a plain run never starts MPI."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def run_mpi(cfg, backend) -> dict | None | int:
    """Train over MPI; any error on any rank ends the whole job, naming the rank."""
    from mpi4py import MPI

    from .dataparallel import train_dataparallel
    from .distributed import plan_run, train_distributed
    train = train_distributed if cfg.algorithm == "sync" else train_dataparallel
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    try:  # no communication yet: every rank reaches the same verdict, rank 0 says it once
        if cfg.thread_split == "rows":
            raise ConfigError("--thread-split rows splits one process's batch; the ranks of an MPI job "
                              "give their --threads to BLAS")
        plan = plan_run(cfg, comm.Get_size())
    except USER_ERRORS as e:
        return user_error(e) if rank == 0 else 2
    try:
        publish_rank_table(comm, plan.layout)  # lets hpdl.guard name a rank that dies
        with threadpool_limits(cfg.threads or default_threads(local_ranks(comm))), quiet_fp(), \
                use(parse_precision(cfg.precision), backend.is_gpu):
            return train(cfg, backend, plan, comm)
    except USER_ERRORS as e:
        abort(comm, 2, f"hpdl.train: rank {rank}: error: {e}")
    except MPI.Exception as e:
        # Most often a peer died mid-transfer: give its hpdl.guard time to name it before this abort ends the job.
        abort(comm, 1, f"hpdl.train: rank {rank}: MPI error ({' '.join(str(e).split())[:300]}); a peer rank "
              "probably died", PEER_DEATH_GRACE_S)
    except BaseException:
        abort(comm, 1, f"hpdl.train: rank {rank}: {traceback.format_exc()}")
    return 1


def abort(comm, code: int, message: str, grace_s: float = OUTPUT_GRACE_S) -> None:
    """Print `message`, then end the whole job with `code` after `grace_s`: mpirun forwards a
    rank's stderr asynchronously, and an immediate MPI_Abort can kill that before the line is out."""
    print(message, file=sys.stderr, flush=True)
    time.sleep(grace_s)
    comm.Abort(code)


def local_ranks(comm) -> int:
    """Ranks sharing this node, which share its cores."""
    from mpi4py import MPI
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    n = node.Get_size()
    node.Free()
    return n


def user_error(e: Exception) -> int:
    print(f"hpdl.train: error: {e}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())

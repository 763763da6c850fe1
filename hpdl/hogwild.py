"""Hogwild! (ALGORITHMS.md §6) across processes: one parameter vector in an MPI shared-memory window."""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .comm.wait import wait
from .config import ConfigError


class SharedVector:
    """A vector every rank of `comm` maps into its own memory: writes by one are seen by all.

    Rank 0 of `comm` allocates it and fills it with `init`; the ranks must share a node.
    """

    def __init__(self, comm: MPI.Comm, init: np.ndarray, poll: str = "sleep"):
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        together = node.Get_size() == comm.Get_size()
        node.Free()
        if not together:
            raise ConfigError("hogwild needs every replica of a stage on one node (one shared-memory "
                              "window per stage); use fewer --replicas")
        self.comm, self.poll = comm, poll
        itemsize = init.dtype.itemsize
        self.win = MPI.Win.Allocate_shared(init.nbytes if comm.Get_rank() == 0 else 0, itemsize, comm=comm)
        buf, _ = self.win.Shared_query(0)
        self.vector = np.ndarray(init.shape, init.dtype, buffer=buf)
        self.win.Lock_all(MPI.MODE_NOCHECK)  # one passive epoch for the whole run: no locks, as Hogwild! wants
        if comm.Get_rank() == 0:
            self.vector[...] = init
        self.barrier()

    def barrier(self) -> None:
        """Every rank's writes so far are visible to all (the window's only synchronisation)."""
        self.win.Sync()
        wait(self.comm.Ibarrier(), self.poll, peer="hogwild replicas")
        self.win.Sync()

    def free(self) -> None:
        self.win.Unlock_all()
        self.win.Free()

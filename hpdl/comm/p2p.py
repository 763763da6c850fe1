"""Activations forward and their gradients backward between adjacent pipeline stages."""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

from ..backend import array_module, to_host
from .wait import wait, waitall

ACT, GRAD = 0, 1
KINDS = {ACT: "act", GRAD: "grad"}
# Tags: 2 * (mb mod TAG_PERIOD) + kind, at most 32767, the smallest tag bound MPI allows.
# Activations take even tags and gradients odd ones, so a receive of one kind can never
# match a message of the other. Messages of one kind and tag between two ranks arrive in
# the order sent (MPI's non-overtaking rule), so wrapping mb around is safe as long as
# fewer than TAG_PERIOD micro-batches are in flight.
TAG_PERIOD = 16384

# Set to 1 where the MPI library reads device memory itself (CUDA-aware MPI); mpi4py has
# no portable query for it, so device arrays are staged through host memory by default.
CUDA_AWARE_ENV = "HPDL_CUDA_AWARE_MPI"


def tag(kind: int, mb: int) -> int:
    return 2 * (mb % TAG_PERIOD) + kind


def _host_view(array) -> Any:
    """The buffer MPI reads to send `array`: itself when MPI can read it, else a host copy.

    The one place that decides how device memory reaches MPI.
    """
    if isinstance(array, np.ndarray):
        return np.ascontiguousarray(array)
    # A device array: MPI must not read it before the kernels that write it have finished.
    xp = array_module(array)
    xp.cuda.get_current_stream().synchronize()
    if os.environ.get(CUDA_AWARE_ENV) == "1":
        return xp.ascontiguousarray(array)
    return to_host(array)


class BufferPool:
    """Receive buffers by (shape, dtype), reused: it allocates only while more are in use than ever before."""

    def __init__(self):
        self._free: dict[tuple, list[np.ndarray]] = defaultdict(list)
        self._lent: set[int] = set()
        self.allocated = 0

    def take(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        free = self._free[(tuple(shape), np.dtype(dtype))]
        if free:
            buf = free.pop()
        else:
            buf = np.empty(shape, dtype=dtype)
            self.allocated += 1
        self._lent.add(id(buf))
        return buf

    def give(self, buf: np.ndarray) -> None:
        if id(buf) not in self._lent:
            raise ValueError("release: this buffer did not come from this channel's pool (or was released twice)")
        self._lent.remove(id(buf))
        self._free[(buf.shape, buf.dtype)].append(buf)


@dataclass
class RecvHandle:
    """A posted receive: what wait_recv needs to complete and check it."""

    kind: int
    mb: int
    source: int
    request: MPI.Request
    buffer: np.ndarray


class PipeChannel:
    """This stage's links to the previous and next stage of its pipeline (pipe rank == stage).

    Receives land in pooled host buffers: wait_recv lends one out, release gives it back.
    Sends are nonblocking; the channel holds each send buffer until its send completes
    (reaped lazily on the next send, or by flush), so the caller must not write to an array
    it has sent.
    """

    def __init__(self, pipe_comm: MPI.Comm, stage: int, n_stages: int, poll: str = "sleep",
                 timeout: float | None = None):
        if pipe_comm.Get_size() != n_stages or pipe_comm.Get_rank() != stage:
            raise ValueError(f"pipe communicator has rank {pipe_comm.Get_rank()} of {pipe_comm.Get_size()}, "
                             f"expected stage {stage} of {n_stages}")
        self.comm, self.stage, self.n_stages = pipe_comm, stage, n_stages
        self.poll, self.timeout = poll, timeout
        self.pool = BufferPool()
        self._sends: list[tuple[MPI.Request, Any]] = []
        self.counters = {f"{KINDS[k]}_{c}": 0 for k in KINDS
                         for c in ("bytes_sent", "bytes_received", "messages_sent", "messages_received")}

    # -- receiving -------------------------------------------------------------------------
    def post_recv_act(self, mb: int, shape: tuple[int, ...], dtype) -> RecvHandle:
        """Post the receive of micro-batch mb's activations from the previous stage."""
        return self._post(ACT, mb, self.stage - 1, shape, dtype)

    def post_recv_grad(self, mb: int, shape: tuple[int, ...], dtype) -> RecvHandle:
        """Post the receive of micro-batch mb's output gradient from the next stage."""
        return self._post(GRAD, mb, self.stage + 1, shape, dtype)

    def _post(self, kind: int, mb: int, source: int, shape, dtype) -> RecvHandle:
        self._check_peer(kind, source)
        buf = self.pool.take(shape, dtype)
        return RecvHandle(kind, mb, source, self.comm.Irecv(buf, source=source, tag=tag(kind, mb)), buf)

    def wait_recv(self, handle: RecvHandle) -> np.ndarray:
        """The received array (a pooled buffer: release it once its contents are copied or used)."""
        status = MPI.Status()
        wait(handle.request, self.poll, timeout=self.timeout, status=status,
             peer=f"{KINDS[handle.kind]} of micro-batch {handle.mb} from stage {handle.source}",
             tag=tag(handle.kind, handle.mb))
        got = status.Get_count(MPI.BYTE)
        if got != handle.buffer.nbytes:
            raise ValueError(f"stage {self.stage}: {KINDS[handle.kind]} of micro-batch {handle.mb} from stage "
                             f"{handle.source} has {got} bytes, expected {handle.buffer.nbytes}")
        self.counters[f"{KINDS[handle.kind]}_bytes_received"] += got
        self.counters[f"{KINDS[handle.kind]}_messages_received"] += 1
        return handle.buffer

    def release(self, buf: np.ndarray) -> None:
        """Return a buffer from wait_recv to the pool."""
        self.pool.give(buf)

    # -- sending ---------------------------------------------------------------------------
    def send_act(self, mb: int, array) -> None:
        """Send micro-batch mb's activations to the next stage."""
        self._send(ACT, mb, self.stage + 1, array)

    def send_grad(self, mb: int, array) -> None:
        """Send micro-batch mb's input gradient to the previous stage."""
        self._send(GRAD, mb, self.stage - 1, array)

    def _send(self, kind: int, mb: int, dest: int, array) -> None:
        self._check_peer(kind, dest)
        self._sends = [(r, b) for r, b in self._sends if not r.Test()]
        buf = _host_view(array)
        self._sends.append((self.comm.Isend(buf, dest=dest, tag=tag(kind, mb)), buf))
        self.counters[f"{KINDS[kind]}_bytes_sent"] += buf.nbytes
        self.counters[f"{KINDS[kind]}_messages_sent"] += 1

    def flush(self) -> None:
        """Wait until every send has completed (its buffer may then be reused)."""
        waitall([r for r, _ in self._sends], self.poll, timeout=self.timeout,
                       peer=f"sends of stage {self.stage}")
        self._sends.clear()

    def _check_peer(self, kind: int, peer: int) -> None:
        if not 0 <= peer < self.n_stages:
            raise ValueError(f"stage {self.stage} of {self.n_stages} has no stage {peer} to exchange "
                             f"{KINDS[kind]} with")

    # -- counters --------------------------------------------------------------------------
    @property
    def bytes_sent(self) -> int:
        return self.counters["act_bytes_sent"] + self.counters["grad_bytes_sent"]

    @property
    def bytes_received(self) -> int:
        return self.counters["act_bytes_received"] + self.counters["grad_bytes_received"]

    @property
    def messages(self) -> int:
        """Messages sent and received, both kinds."""
        return sum(self.counters[f"{k}_messages_{d}"] for k in KINDS.values() for d in ("sent", "received"))

    def stats(self) -> dict[str, int]:
        """Per-direction counters (act: forward, grad: backward) and totals, for benchmarks."""
        return {**self.counters, "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "messages": self.messages, "pool_buffers": self.pool.allocated}

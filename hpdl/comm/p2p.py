"""Activations forward and their gradients backward between adjacent pipeline stages."""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

from ..backend import on_device
from .device import Outgoing, Stager, default_stager
from .wait import wait, waitall

ACT, GRAD = 0, 1
KINDS = {ACT: "act", GRAD: "grad"}
# Tags: 2 * (mb mod TAG_PERIOD) + kind, at most 32767, the smallest tag bound MPI allows.
# Activations take even tags and gradients odd ones, so a receive of one kind can never
# match a message of the other. Messages of one kind and tag between two ranks arrive in
# the order sent (MPI's non-overtaking rule), so wrapping mb around is safe as long as
# fewer than TAG_PERIOD micro-batches are in flight.
TAG_PERIOD = 16384


def tag(kind: int, mb: int) -> int:
    return 2 * (mb % TAG_PERIOD) + kind


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
    buffer: Any  # a pooled NumPy array, or the stager's (pinned host or device) buffer


class PipeChannel:
    """This stage's links to the previous and next stage of its pipeline (pipe rank == stage).

    Receives land in pooled host buffers: wait_recv lends one out, release gives it back;
    `take` returns the received array as the caller's own. Sends are nonblocking; the
    channel holds each send buffer until its send completes (reaped lazily on the next
    send, or by flush), so the caller must not write to an array it has sent.

    Device arrays go through `stager` (comm/device.py): with a stager, receives land in its
    buffers and `take` gives device arrays. A device send whose staging copy is still
    running is held back (compute goes on meanwhile) and posted, in order, once the copy is
    done: at the next send, and in any case before this channel waits for anything, so a
    peer never waits on a message held here while this rank waits on it.
    """

    def __init__(self, pipe_comm: MPI.Comm, stage: int, n_stages: int, poll: str = "sleep",
                 timeout: float | None = None, stager: Stager | None = None):
        if pipe_comm.Get_size() != n_stages or pipe_comm.Get_rank() != stage:
            raise ValueError(f"pipe communicator has rank {pipe_comm.Get_rank()} of {pipe_comm.Get_size()}, "
                             f"expected stage {stage} of {n_stages}")
        self.comm, self.stage, self.n_stages = pipe_comm, stage, n_stages
        self.poll, self.timeout = poll, timeout
        self.pool = BufferPool()
        self.stager = stager
        self._sends: list[tuple[MPI.Request, Any]] = []   # (request, the buffer or Outgoing it reads)
        self._held: deque[tuple[Outgoing, int, int, int]] = deque()  # (staged array, dest, tag, kind)
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
        buf = self.pool.take(shape, dtype) if self.stager is None else self.stager.incoming(shape, dtype)
        return RecvHandle(kind, mb, source, self.comm.Irecv(buf, source=source, tag=tag(kind, mb)), buf)

    def wait_recv(self, handle: RecvHandle) -> np.ndarray:
        """The received array (a pooled buffer: release it once its contents are copied or used)."""
        self.post_held()
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

    def take(self, handle: RecvHandle, xp: Any = np):
        """The received array as the caller's own: an `xp` copy of the pooled buffer, or with a
        stager the device array it makes of its buffer."""
        buf = self.wait_recv(handle)
        if self.stager is not None:
            return self.stager.to_device(buf)
        x = xp.array(buf, copy=True)  # copy out before the pool reuses the buffer
        self.release(buf)
        return x

    # -- sending ---------------------------------------------------------------------------
    def send_act(self, mb: int, array) -> None:
        """Send micro-batch mb's activations to the next stage."""
        self._send(ACT, mb, self.stage + 1, array)

    def send_grad(self, mb: int, array) -> None:
        """Send micro-batch mb's input gradient to the previous stage."""
        self._send(GRAD, mb, self.stage - 1, array)

    def _send(self, kind: int, mb: int, dest: int, array) -> None:
        self._check_peer(kind, dest)
        self._reap()
        if not on_device(array):
            self._isend(np.ascontiguousarray(array), dest, tag(kind, mb), kind)
            return
        self._held.append(((self.stager or default_stager()).outgoing(array), dest, tag(kind, mb), kind))
        self.post_held(everything=False)

    def _isend(self, buf, dest: int, tag_: int, kind: int, keep: Any = None) -> None:
        self._sends.append((self.comm.Isend(buf, dest=dest, tag=tag_), buf if keep is None else keep))
        self.counters[f"{KINDS[kind]}_bytes_sent"] += buf.nbytes
        self.counters[f"{KINDS[kind]}_messages_sent"] += 1

    def post_held(self, everything: bool = True) -> None:
        """Post the held device sends, in the order they were made: all of them, each once its copy is
        done, or (not `everything`) those whose copies are already done."""
        while self._held and (everything or self._held[0][0].ready()):
            staged, dest, tag_, kind = self._held.popleft()
            self._isend(staged.wait(), dest, tag_, kind, keep=staged)

    def _reap(self) -> None:
        """Forget completed sends; their staging buffers go back to the pool."""
        pending = []
        for request, kept in self._sends:
            if not request.Test():
                pending.append((request, kept))
            elif isinstance(kept, Outgoing):
                kept.release()
        self._sends = pending

    def flush(self) -> None:
        """Wait until every send has completed (its buffer may then be reused)."""
        self.post_held()
        waitall([r for r, _ in self._sends], self.poll, timeout=self.timeout,
                       peer=f"sends of stage {self.stage}")
        for _, kept in self._sends:
            if isinstance(kept, Outgoing):
                kept.release()
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

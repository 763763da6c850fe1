"""Waiting on MPI requests without starving oversubscribed ranks, with an optional deadline."""
from __future__ import annotations

import time
from typing import Callable, Sequence

from mpi4py import MPI

from ..backend import on_device
from .device import Stager, default_stager

# poll="sleep": test the request, then sleep, doubling the pause from FIRST_PAUSE up to
# MAX_PAUSE. A blocking MPI wait busy-spins a core; with more ranks than cores (32 ranks
# on 2 cores) the spinning ranks take the cores from the ranks that have work to do.
# poll="spin": plain MPI Wait, the lowest latency when every rank has its own core.
POLLS = ("sleep", "spin")
FIRST_PAUSE = 20e-6
MAX_PAUSE = 1e-3


class CommTimeout(TimeoutError):
    """A request did not complete before its deadline: the peer is probably dead or stuck."""

    def __init__(self, seconds: float, peer: object = None, tag: int | None = None):
        self.seconds, self.peer, self.tag = seconds, peer, tag
        what = "" if peer is None else f" on {peer}"
        what += "" if tag is None else f" (tag {tag})"
        super().__init__(f"no completion after {seconds:g} s waiting{what}; is that rank alive?")


def _poll(done: Callable[[], bool], poll: str, timeout: float | None, peer: object, tag: int | None) -> None:
    """Call done() until it returns True, pausing between calls if poll == "sleep"."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = FIRST_PAUSE
    while not done():
        if deadline is not None and time.monotonic() >= deadline:
            raise CommTimeout(timeout, peer, tag)
        if poll == "sleep":
            time.sleep(pause)
            pause = min(2 * pause, MAX_PAUSE)


def _check(poll: str) -> None:
    if poll not in POLLS:
        raise ValueError(f"poll must be one of {', '.join(POLLS)}, got {poll!r}")


def wait(request: MPI.Request, poll: str = "sleep", *, timeout: float | None = None,
         status: MPI.Status | None = None, peer: object = None, tag: int | None = None) -> None:
    """Wait for one request; after `timeout` seconds raise CommTimeout naming `peer` and `tag`.

    On CommTimeout the request is still active: the caller cancels it (Cancel, then Wait).
    """
    _check(poll)
    if poll == "spin" and timeout is None:
        request.Wait(status)
    else:
        _poll(lambda: request.Test(status), poll, timeout, peer, tag)


def waitall(requests: Sequence[MPI.Request], poll: str = "sleep", *, timeout: float | None = None,
            statuses: list[MPI.Status] | None = None, peer: object = None) -> None:
    """Wait for every request; after `timeout` seconds raise CommTimeout."""
    _check(poll)
    if poll == "spin" and timeout is None:
        MPI.Request.Waitall(requests, statuses)
    else:
        _poll(lambda: MPI.Request.Testall(requests, statuses), poll, timeout, peer, None)


def waitany(requests: list[MPI.Request], status: MPI.Status, poll: str = "sleep", *,
            timeout: float | None = None, peer: object = None) -> int:
    """Index of a completed request (at least one must be active); after `timeout` seconds raise CommTimeout."""
    _check(poll)
    found: list[int] = []

    def done() -> bool:
        index, flag = MPI.Request.Testany(requests, status)
        if flag:
            found.append(index)
        return flag

    _poll(done, poll, timeout, peer, None)
    return found[0]


def allreduce(comm: MPI.Comm, sendbuf, recvbuf=None, op: MPI.Op = MPI.SUM, poll: str = "sleep",
              timeout: float | None = None, stager: Stager | None = None):
    """Reduce over comm with Iallreduce and `wait`; in place when recvbuf is None. Returns the result.

    A device array goes through `stager` (the process's by default): reduced in place by
    CUDA-aware MPI, else on a pinned host copy whose result is uploaded back, ordered
    before the work queued next on the current stream.
    """
    out = sendbuf if recvbuf is None else recvbuf
    if on_device(sendbuf):
        stager = stager or default_stager()
        if out is not sendbuf:
            out[...] = sendbuf  # a device copy; then one in-place path for both forms
        buf = stager.outgoing(out).wait()
        wait(comm.Iallreduce(MPI.IN_PLACE, buf, op), poll, timeout=timeout, peer="allreduce")
        stager.to_device(buf, out)
        return out
    request = comm.Iallreduce(MPI.IN_PLACE if recvbuf is None else sendbuf, out, op)
    wait(request, poll, timeout=timeout, peer="allreduce")
    return out

"""Gradient allreduce in buckets, started during backward as soon as a bucket's layers are done."""
from __future__ import annotations

from collections import deque

import numpy as np
from mpi4py import MPI

from ..backend import on_device
from ..flat import Flat
from .device import Outgoing, Stager, default_stager
from .wait import waitall

# Buckets of about this many bytes: large enough to amortize MPI latency, small enough
# that the first ones are on the wire while backward still computes the earlier layers.
BUCKET_BYTES = 1 << 20


class BucketAllreduce:
    """Sums a Flat gradient vector over `comm`, bucket by bucket, overlapped with backward.

    Backward produces the last layer's gradients first, so buckets are groups of
    consecutive layers taken from the end; `layer_done(i)` starts a bucket's nonblocking
    Iallreduce once its first layer is done, and `wait()` finishes them all before the
    optimizer step. The buckets are disjoint slices of one vector, so the result is the
    same as one Allreduce of the whole vector.

    A device vector goes through `stager` (the process's by default): a bucket's staging
    copy starts when the bucket does, its Iallreduce once the copy is done (checked at the
    next layer_done, at the latest in wait()), always in bucket order, which every rank
    shares; wait() then uploads the sums back into the vector.
    """

    def __init__(self, comm: MPI.Comm, flat: Flat, bucket_bytes: int = BUCKET_BYTES, poll: str = "sleep",
                 stager: Stager | None = None):
        self.comm, self.flat, self.poll = comm, flat, poll
        device = on_device(flat.vector)
        self.stager = (stager or default_stager()) if device else None
        self.buckets: list[tuple[int, slice]] = []   # (first layer, slice of the vector), last layer first
        self.bytes_reduced = 0
        sizes = [sum(v.size for v in views.values()) for views in flat.views]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int) + flat.stats.size
        offsets[0] = 0  # the leading statistics go with layer 0's bucket, the last to start
        itemsize = flat.vector.dtype.itemsize
        hi = len(sizes)
        for i in reversed(range(len(sizes))):
            if (offsets[hi] - offsets[i]) * itemsize >= bucket_bytes or i == 0:
                # Start at the bucket's lowest layer with parameters: backward may stop there.
                first = next((j for j in range(i, hi) if sizes[j]), None)
                if first is not None:
                    self.buckets.append((first, slice(offsets[i], offsets[hi])))
                elif offsets[hi] > offsets[i]:  # statistics alone: they join the bucket above
                    first, above = self.buckets.pop()
                    self.buckets.append((first, slice(offsets[i], above.stop)))
                hi = i
        self.starts = {first: k for k, (first, _) in enumerate(self.buckets)}
        self.requests: list[MPI.Request] = []
        # Device buckets as (slice of the vector, its staged copy): copying, then being reduced.
        self._held: deque[tuple[object, Outgoing]] = deque()
        self._reducing: list[tuple[object, Outgoing]] = []

    def layer_done(self, i: int) -> None:
        """Layer i's gradients are final: start its bucket if i is the bucket's first layer."""
        k = self.starts.get(i)
        if k is not None:
            part = self.flat.vector[self.buckets[k][1]]
            if self.stager is None:
                self.requests.append(self.comm.Iallreduce(MPI.IN_PLACE, part, MPI.SUM))
            else:
                self._held.append((part, self.stager.outgoing(part)))
            self.bytes_reduced += part.nbytes
        if self._held:
            self._start_held(everything=False)

    def _start_held(self, everything: bool) -> None:
        while self._held and (everything or self._held[0][1].ready()):
            part, staged = self._held.popleft()
            self.requests.append(self.comm.Iallreduce(MPI.IN_PLACE, staged.wait(), MPI.SUM))
            self._reducing.append((part, staged))

    def wait(self) -> None:
        self._start_held(everything=True)
        waitall(self.requests, self.poll, peer="allreduce")
        for part, staged in self._reducing:
            self.stager.to_device(staged.buffer, part)
        self.requests, self._reducing = [], []

    def __len__(self) -> int:
        return len(self.buckets)


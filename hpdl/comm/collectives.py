"""Gradient allreduce in buckets, started during backward as soon as a bucket's layers are done."""
from __future__ import annotations


import numpy as np
from mpi4py import MPI

from ..flat import Flat
from .wait import allreduce, waitall

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
    """

    def __init__(self, comm: MPI.Comm, flat: Flat, bucket_bytes: int = BUCKET_BYTES, poll: str = "sleep"):
        self.comm, self.flat, self.poll = comm, flat, poll
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

    def layer_done(self, i: int) -> None:
        """Layer i's gradients are final: start its bucket if i is the bucket's first layer."""
        k = self.starts.get(i)
        # Device vectors are reduced whole, through host memory, in wait().
        if k is not None and isinstance(self.flat.vector, np.ndarray):
            part = self.flat.vector[self.buckets[k][1]]
            self.requests.append(self.comm.Iallreduce(MPI.IN_PLACE, part, MPI.SUM))
            self.bytes_reduced += part.nbytes

    def wait(self) -> None:
        if not isinstance(self.flat.vector, np.ndarray):
            allreduce(self.comm, self.flat.vector, poll=self.poll)
            self.bytes_reduced += self.flat.vector.nbytes
        waitall(self.requests, self.poll, peer="allreduce")
        self.requests = []

    def __len__(self) -> int:
        return len(self.buckets)


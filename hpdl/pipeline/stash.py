"""Per-stage store of what each in-flight micro-batch's backward needs: caches and weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..layers.base import Params


def nbytes(tree: Any) -> int:
    """Bytes of every array inside nested lists, tuples and dicts (a cache's footprint)."""
    if hasattr(tree, "nbytes") and hasattr(tree, "dtype"):
        return int(tree.nbytes)
    if isinstance(tree, dict):
        return sum(nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(nbytes(v) for v in tree)
    return 0


@dataclass
class Entry:
    caches: list
    params: list[Params]   # the weight version the forward pass used
    slot: int              # its version buffer, -1 when it is the live parameters


class Stash:
    """Bounded store keyed by micro-batch, `capacity` entries at most.

    With weight stashing every forward copies the live parameters into one of `versions`
    preallocated buffers (PipeDream: stage s keeps P - s versions), so the
    backward pass of that micro-batch uses exactly the weights its forward pass used,
    whatever updates landed in between. Without it the backward pass sees the live
    parameters (pipelined backprop), or the store only holds caches (flushed schedules,
    where no update happens between a micro-batch's forward and backward).
    """

    def __init__(self, params: list[Params], capacity: int, versions: int):
        self.capacity = capacity
        self.live = params
        self.entries: dict[int, Entry] = {}
        self.versions = [[{k: v.copy() for k, v in p.items()} for p in params] for _ in range(versions)]
        self.free = list(range(len(self.versions)))
        self.peak_cache_bytes = 0

    def push(self, mb: int, caches: list) -> None:
        """Keep a forward pass's caches, with a copy of the weights it used when stashing."""
        if len(self.entries) >= self.capacity:
            raise RuntimeError(f"stash full: {self.capacity} micro-batches in flight, cannot add {mb}")
        if self.versions:
            slot = self.free.pop()
            for dst, src in zip(self.versions[slot], self.live):
                for k, v in src.items():
                    dst[k][...] = v
            self.entries[mb] = Entry(caches, self.versions[slot], slot)
        else:
            self.entries[mb] = Entry(caches, self.live, -1)
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())

    def pop(self, mb: int) -> Entry:
        """The entry of micro-batch mb; the next push reuses its buffer, so finish backward first."""
        entry = self.entries.pop(mb)
        if entry.slot >= 0:
            self.free.append(entry.slot)
        return entry

    def cache_bytes(self) -> int:
        return sum(nbytes(e.caches) for e in self.entries.values())

    def weight_bytes(self) -> int:
        return nbytes(self.versions)

    def report(self) -> dict[str, int]:
        return {"capacity": self.capacity, "weight_versions": len(self.versions),
                "weight_bytes": self.weight_bytes(), "peak_cache_bytes": self.peak_cache_bytes}

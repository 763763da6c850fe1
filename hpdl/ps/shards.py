"""Which parameter-server ranks hold which stage's parameters, and the slice each one holds."""
from __future__ import annotations

from typing import NamedTuple


class Shard(NamedTuple):
    """Elements [lo, hi) of stage `stage`'s flat parameter vector, kept by parameter server `ps_index`."""

    stage: int
    index: int      # shard number within the stage
    lo: int
    hi: int
    ps_index: int

    @property
    def size(self) -> int:
        return self.hi - self.lo


def stage_servers(stage: int, n_stages: int, n_ps: int) -> list[int]:
    """The parameter servers holding `stage`, in shard order.

    With at least as many servers as stages, server i holds a shard of stage i mod P, so
    every stage gets K // P or K // P + 1 servers of its own; with fewer, server s mod K
    holds all of stage s (one server then serves several stages).
    """
    if n_ps < 1:
        raise ValueError(f"need at least one parameter server, got {n_ps}")
    if n_ps >= n_stages:
        return list(range(stage, n_ps, n_stages))
    return [stage % n_ps]


def stage_shards(stage: int, n_stages: int, n_ps: int, size: int) -> list[Shard]:
    """Stage `stage`'s vector of `size` elements cut into near-equal contiguous shards, one per server."""
    servers = stage_servers(stage, n_stages, n_ps)
    n = len(servers)
    q, r = divmod(size, n)
    shards, lo = [], 0
    for j, ps in enumerate(servers):
        hi = lo + q + (j < r)
        shards.append(Shard(stage, j, lo, hi, ps))
        lo = hi
    return shards

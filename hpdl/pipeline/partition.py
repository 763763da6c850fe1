"""Cutting a model's layer list into pipeline stages: by hand, by FLOPs, or by measured time."""
from __future__ import annotations

import math
import time
from itertools import accumulate
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..layers.base import Mode

if TYPE_CHECKING:
    from ..models import Model

# FLOP-equivalents charged per activation element a layer reads or writes: it keeps
# FLOP-free layers (Flatten) from looking free and barely moves the others.
_TOUCH = 1.0


def parse_partition(spec: str, n_layers: int) -> list[int]:
    """Layer counts per stage from "--partition 4,3,3"; positive and summing to n_layers."""
    counts = []
    for i, item in enumerate(spec.split(",")):
        try:
            counts.append(int(item))
        except ValueError:
            raise ValueError(f"--partition {spec!r}: entry {i} ({item.strip()!r}) "
                             "is not an integer") from None
        if counts[-1] < 1:
            raise ValueError(f"--partition {spec!r}: stage {i} has {counts[-1]} layers; "
                             "each needs at least 1")
    if sum(counts) != n_layers:
        raise ValueError(f"--partition {spec!r}: counts sum to {sum(counts)}, "
                         f"but the model has {n_layers} layers")
    return counts


def balance(costs: Sequence[float], n_stages: int) -> list[int]:
    """Layer counts per stage of the contiguous cut whose costliest stage is cheapest.

    Exact, by dynamic programming over suffixes. Among equally good cuts it gives the
    earliest stages the fewest layers: under 1F1B stage s keeps P - s micro-batches of
    activations, so the first stages are the ones short of memory.
    """
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot cut {n} layers into {n_stages} stages; use 1 to {n} stages")
    if min(costs) < 0:
        raise ValueError(f"layer costs must be non-negative, got {min(costs)}")
    # math.fsum rounds each slice's sum correctly, so a stage's cost never depends on how
    # it was computed, and ties compare equal.
    cost = [[math.fsum(costs[i:j]) for j in range(n + 1)] for i in range(n + 1)]
    # worst[k][i]: the least possible cost of the costliest stage when layers i.. form k stages.
    worst = [[math.inf] * (n + 1) for _ in range(n_stages + 1)]
    worst[0][n] = 0.0
    for k in range(1, n_stages + 1):
        for i in range(n - k + 1):
            worst[k][i] = min(max(cost[i][j], worst[k - 1][j]) for j in range(i + 1, n - k + 2))
    bottleneck = worst[n_stages][0]
    counts, start = [], 0
    for k in range(n_stages, 0, -1):
        stop = next(j for j in range(start + 1, n - k + 2)
                    if cost[start][j] <= bottleneck and worst[k - 1][j] <= bottleneck)
        counts.append(stop - start)
        start = stop
    return counts


def stage_bounds(counts: Sequence[int]) -> list[tuple[int, int]]:
    """(start, stop) layer indices of every stage."""
    stops = list(accumulate(counts))
    return [(stop - count, stop) for count, stop in zip(counts, stops)]


def flop_costs(model: Model) -> list[float]:
    """Per-layer cost of forward plus backward, taken as three times the forward FLOPs."""
    shapes = model.shapes()
    return [3.0 * flops + _TOUCH * 2 * (math.prod(shapes[i]) + math.prod(shapes[i + 1]))
            for i, flops in enumerate(model.flops())]


def _synchronize(xp) -> None:
    # CuPy returns before its kernels finish; a timing must wait for them.
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def profile_costs(model: Model, batch_size: int, xp=np, dtype=np.float32,
                  repeats: int = 3, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of forward plus backward per layer on a random batch, the minimum over repeats.

    `clock` = time.thread_time counts this thread's CPU time only: on a shared machine wall
    time also counts other processes' turns on the core, and favours short timings (they
    fit between preemptions). NumPy only, then: a GPU's kernels run off that clock.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    params = model.init(0, xp, dtype)
    shapes = model.shapes()
    rng = np.random.default_rng(0)

    def batch(i: int):
        return xp.asarray(rng.standard_normal((batch_size, *shapes[i])), dtype=dtype)

    best = [math.inf] * len(model.layers)
    for _ in range(repeats):
        # Each layer gets the previous layer's output, so data-dependent layers (ReLU,
        # max-pool) see realistic inputs.
        x = batch(0)
        for i, (layer, p) in enumerate(zip(model.layers, params)):
            dy = batch(i + 1)
            _synchronize(xp)
            start = clock()
            y, cache = layer.forward(p, x, Mode(train=True, key=(0, i)))
            layer.backward(p, cache, dy)
            _synchronize(xp)
            best[i] = min(best[i], clock() - start)
            x = y
    return best


def describe(counts: Sequence[int], model: Model, costs: Sequence[float]) -> str:
    """A table of stage -> layer range, cost share and layer names, for printing at start-up."""
    if sum(counts) != len(model.layers):
        raise ValueError(f"the partition covers {sum(counts)} layers, but the model has {len(model.layers)}")
    total = math.fsum(costs) or 1.0
    lines = ["stage  layers   cost  names"]
    for s, (start, stop) in enumerate(stage_bounds(counts)):
        names = " ".join(type(layer).__name__ for layer in model.layers[start:stop])
        share = math.fsum(costs[start:stop]) / total
        lines.append(f"{s:>5}  {start:>2}-{stop - 1:<3}  {share:>5.1%}  {names}")
    return "\n".join(lines)

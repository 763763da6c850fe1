"""Stage partitions: parsing, exact balancing against brute force, FLOP and measured layer costs."""
from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest

from hpdl.layers import Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU
from hpdl.models import Model
from hpdl.pipeline.partition import (balance, describe, flop_costs, parse_partition,
                                     profile_costs, stage_bounds)

TINY = Model("tiny", [Flatten(), Linear(12, 8), ReLU(), Dropout(0.5), Linear(8, 3)], in_shape=(3, 4))
CONV = Model("conv", [Conv2d(1, 2, 3, pad=1), ReLU(), MaxPool2d(2), Flatten(), Linear(32, 3)],
             in_shape=(1, 8, 8))


def all_partitions(n: int, n_stages: int):
    for cuts in combinations(range(1, n), n_stages - 1):
        bounds = (0, *cuts, n)
        yield [b - a for a, b in zip(bounds, bounds[1:])]


def bottleneck(costs, counts) -> float:
    return max(math.fsum(costs[a:b]) for a, b in stage_bounds(counts))


def test_parse_partition_reads_counts_per_stage():
    assert parse_partition("4,3,3", 10) == [4, 3, 3]
    assert parse_partition(" 2, 1 ", 3) == [2, 1]
    assert parse_partition("5", 5) == [5]


@pytest.mark.parametrize("spec, n_layers, message", [
    ("4,x,3", 10, r"entry 1 \('x'\) is not an integer"),
    ("4,,6", 10, r"entry 1 \(''\) is not an integer"),
    ("", 10, r"entry 0 \(''\) is not an integer"),
    ("4,0,6", 10, "stage 1 has 0 layers; each needs at least 1"),
    ("-1,11", 10, "stage 0 has -1 layers"),
    ("4,3", 10, "counts sum to 7, but the model has 10 layers"),
])
def test_parse_partition_names_what_is_wrong(spec, n_layers, message):
    with pytest.raises(ValueError, match=message):
        parse_partition(spec, n_layers)


def test_balance_is_optimal_and_breaks_ties_like_brute_force():
    """On random small cases the bottleneck equals brute force's, and the counts are the
    lexicographically smallest optimal ones; integer costs make ties common."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 9))
        n_stages = int(rng.integers(1, n + 1))
        costs = (rng.integers(0, 4, n).astype(float) if trial % 2 else rng.random(n)).tolist()
        best = min(bottleneck(costs, c) for c in all_partitions(n, n_stages))
        expected = min(c for c in all_partitions(n, n_stages) if bottleneck(costs, c) == best)
        assert balance(costs, n_stages) == expected, (costs, n_stages)


def test_balance_ties_give_the_first_stages_the_fewest_layers():
    """Equal optima resolve toward light early stages, which hold the most activations under 1F1B."""
    assert balance([4.0, 0.0, 0.0, 4.0], 2) == [1, 3]
    assert balance([1.0] * 6, 3) == [2, 2, 2]
    assert balance([1.0] * 7, 3) == [1, 3, 3]
    assert balance([0.0] * 4, 2) == [1, 3]


def test_balance_one_layer_per_stage_and_one_stage():
    assert balance([3.0, 1.0, 2.0], 3) == [1, 1, 1]
    assert balance([3.0, 1.0, 2.0], 1) == [3]


@pytest.mark.parametrize("n_stages", [0, 4])
def test_balance_rejects_impossible_stage_counts(n_stages):
    with pytest.raises(ValueError, match="cannot cut 3 layers into .* stages; use 1 to 3 stages"):
        balance([1.0, 2.0, 3.0], n_stages)


def test_balance_rejects_negative_costs():
    with pytest.raises(ValueError, match="non-negative"):
        balance([1.0, -2.0], 1)


def test_stage_bounds_are_contiguous_ranges():
    assert stage_bounds([2, 3, 1]) == [(0, 2), (2, 5), (5, 6)]


def test_flop_costs_charge_backward_and_keep_free_layers_cheap_but_positive():
    """Linear costs 3x its forward FLOPs plus its activation traffic; Flatten is small but not free."""
    model = Model("wide", [Flatten(), Linear(784, 256), ReLU(), Linear(256, 10)], in_shape=(1, 28, 28))
    costs = flop_costs(model)
    flops = model.flops()
    assert flops[0] == 0 and 0 < costs[0] < 0.01 * costs[1]
    assert costs[1] == 3 * flops[1] + 2 * (784 + 256)
    assert costs[3] < costs[1]


@pytest.mark.parametrize("model", [TINY, CONV], ids=lambda m: m.name)
def test_profile_costs_times_every_layer(model):
    """One positive time per layer, found through the layer API on inputs of the model's shapes."""
    costs = profile_costs(model, batch_size=4, repeats=2)
    assert len(costs) == len(model.layers)
    assert all(c > 0 and math.isfinite(c) for c in costs)


def test_profile_costs_needs_a_repeat():
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        profile_costs(TINY, batch_size=4, repeats=0)


def test_describe_lists_every_stage_with_its_share():
    costs = [0.0, 6.0, 1.0, 1.0, 2.0]
    table = describe([2, 3], TINY, costs).splitlines()
    assert len(table) == 3
    assert table[1].split() == ["0", "0-1", "60.0%", "Flatten", "Linear"]
    assert table[2].split() == ["1", "2-4", "40.0%", "ReLU", "Dropout", "Linear"]
    with pytest.raises(ValueError, match="covers 4 layers, but the model has 5"):
        describe([2, 2], TINY, costs)

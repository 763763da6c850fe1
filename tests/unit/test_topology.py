"""Layout choice and node-aware placement, without MPI."""
from __future__ import annotations

import re

import pytest

from hpdl.comm.topology import Layout, Role, TopologyError, choose_layout, place


def test_layout_str_and_world():
    layout = Layout(4, 8, 0)
    assert layout.world == 32
    assert str(layout) == "4 stages x 8 replicas + 0 PS = 32 ranks"
    assert Layout(2, 3, 2).world == 8


@pytest.mark.parametrize("world, n_layers, expected", [
    (1, 5, Layout(1, 1)),
    (8, 10, Layout(4, 2)),      # capped at 4 stages
    (32, 10, Layout(4, 8)),
    (6, 10, Layout(3, 2)),      # largest divisor <= 4
    (8, 2, Layout(2, 4)),       # capped by the model's depth
    (7, 10, Layout(1, 7)),      # a prime world: pure data parallelism
])
def test_default_layout(world, n_layers, expected):
    assert choose_layout(world, n_layers) == expected


def test_filled_in_counts():
    assert choose_layout(8, 10, stages=2) == Layout(2, 4)
    assert choose_layout(8, 10, replicas=8) == Layout(1, 8)
    assert choose_layout(8, 10, stages=2, replicas=3, ps=2) == Layout(2, 3, 2)
    assert choose_layout(9, 10, ps=1) == Layout(4, 2, 1)


def test_mismatch_names_fitting_layouts():
    with pytest.raises(TopologyError) as e:
        choose_layout(8, 10, stages=3, replicas=2)
    message = str(e.value)
    assert message == ("--stages 3 --replicas 2 needs 6 ranks, world has 8; "
                       "try --stages 4 --replicas 2 or --stages 2 --replicas 4")
    assert "\n" not in message


@pytest.mark.parametrize("kwargs, fragment", [
    ({"stages": 3}, "--stages 3 does not divide the 8 worker ranks; try --stages 4 --replicas 2"),
    ({"replicas": 3}, "try --stages 2 --replicas 4"),
    ({"replicas": 1}, "try --stages"),                     # 8 stages but only 5 layers
    ({"stages": 6}, "the model has 5 layers; --stages must be at most 5"),
    ({"stages": 0}, "--stages must be at least 1"),
    ({"replicas": 0}, "--replicas must be at least 1"),
    ({"ps": -1}, "--ps must be at least 0"),
    ({"ps": 8}, "--ps 8 leaves no worker ranks"),
    ({"stages": 2, "replicas": 2, "ps": 2}, "--stages 2 --replicas 2 --ps 2 needs 6 ranks, world has 8; "
                                             "try --stages 3 --replicas 2 --ps 2 or --stages 2 --replicas 3 --ps 2"),
])
def test_errors(kwargs, fragment):
    with pytest.raises(TopologyError, match=re.escape(fragment)):
        choose_layout(8, 5, **kwargs)


def test_topology_error_is_a_value_error():
    assert issubclass(TopologyError, ValueError)


def workers_by_stage(roles: list[Role], nodes: list[int]) -> dict[int, set[int]]:
    """stage -> the nodes its replicas sit on."""
    out: dict[int, set[int]] = {}
    for role, node in zip(roles, nodes):
        if role.kind == "worker":
            out.setdefault(role.stage, set()).add(node)
    return out


def assert_one_role_each(layout: Layout, roles: list[Role]) -> None:
    workers = sorted((r.stage, r.replica) for r in roles if r.kind == "worker")
    assert workers == [(s, r) for s in range(layout.stages) for r in range(layout.replicas)]
    assert sorted(r.ps_index for r in roles if r.kind == "ps") == list(range(layout.ps))


@pytest.mark.parametrize("stages, replicas", [(4, 8), (2, 4), (3, 2), (8, 1)])
def test_nodes_of_r_ranks_hold_one_stage_each(stages, replicas):
    layout = Layout(stages, replicas)
    nodes = [r - r % replicas for r in range(layout.world)]
    roles = place(layout, nodes)
    assert_one_role_each(layout, roles)
    on = workers_by_stage(roles, nodes)
    assert all(len(on[s]) == 1 for s in range(stages))
    assert all(on[s] != on[s + 1] for s in range(stages - 1))


def test_placement_follows_node_ids_not_rank_order():
    # Round-robin rank placement (rank r on node r % 2): a stage's replicas still share a node.
    layout = Layout(2, 4)
    nodes = [0 if r % 2 == 0 else 1 for r in range(8)]
    roles = place(layout, nodes)
    assert_one_role_each(layout, roles)
    on = workers_by_stage(roles, nodes)
    assert on == {0: {0}, 1: {1}}
    assert roles[0] == Role("worker", 0, 0, -1) and roles[2] == Role("worker", 0, 1, -1)


def test_single_node():
    layout = Layout(4, 2)
    roles = place(layout, [0] * 8)
    assert_one_role_each(layout, roles)
    assert roles == [Role("worker", r // 2, r % 2, -1) for r in range(8)]


def test_parameter_servers_take_the_last_positions():
    layout = Layout(2, 2, 2)
    nodes = [0, 0, 0, 3, 3, 3]
    roles = place(layout, nodes)
    assert_one_role_each(layout, roles)
    assert roles[4:] == [Role("ps", -1, -1, 0), Role("ps", -1, -1, 1)]
    assert workers_by_stage(roles, nodes) == {0: {0}, 1: {0, 3}}


def test_place_checks_the_rank_count():
    with pytest.raises(TopologyError, match="needs 4 ranks"):
        place(Layout(2, 2), [0, 0, 0])

"""The cost model's formulas on hand-computed cases, the planner's ranking, and its command line."""
from __future__ import annotations

import json

import pytest

from hpdl import plan
from hpdl.comm.topology import Layout
from hpdl.cost import (INTER, INTRA, AlgoCost, Cluster, Link, Profile, bubble_fraction, layouts, pipeline_cycle,
                       node_of, predict, ring_allreduce, workers_on_node)

SYNC = AlgoCost("sync", "allreduce")


def tiny(out: int = 10, layer_s: float = 1.0) -> Profile:
    """Two layers of 5 parameters each; the first outputs `out` values per sample and caches 8 bytes per sample."""
    return Profile(layer_seconds={b: [layer_s, layer_s] for b in (1, 2, 4)}, layer_params=[5, 5],
                   layer_out=[out, 3], layer_cache=[8.0, 4.0], update_s_per_value=0.01, optimizer_vectors=1.0)


def one_node(ranks: int, bandwidth: float = 80.0, latency: float = 0.0) -> Cluster:
    link = Link(bandwidth, latency)
    return Cluster(1, ranks, link, link)


def test_bubble_fraction_is_p_minus_1_over_m_plus_p_minus_1_with_a_flush():
    """§7: GPipe and 1F1B idle (P-1)/(M+P-1) of a step; the asynchronous schedules none in the steady state."""
    assert bubble_fraction("gpipe", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("1f1b", 2, 2) == pytest.approx(1 / 3)
    assert bubble_fraction("pipedream", 4, 8) == 0.0
    assert bubble_fraction("gpipe", 1, 1) == 0.0


def test_ring_allreduce_moves_2_n_minus_1_over_n_of_the_vector():
    """§1: each of n members sends 2(n-1)/n x the bytes, in 2(n-1) messages."""
    t, sent = ring_allreduce(1000, 4, Link(100.0, 0.01))
    assert sent == pytest.approx(1500)
    assert t == pytest.approx(6 * 0.01 + 1500 / 100)
    assert ring_allreduce(1000, 1, Link(100.0, 0.01)) == (0.0, 0.0)


def test_pipeline_cycle_charges_each_stage_half_of_each_neighbouring_boundary():
    """A stage's pace is its compute plus waiting for the activation from before and the gradient from after."""
    assert pipeline_cycle([1.0, 2.0, 1.0], [0.2, 0.4]) == pytest.approx(2.0 + 0.1 + 0.2)
    assert pipeline_cycle([3.0], []) == 3.0


def test_gpipe_two_stages_by_hand():
    """P=2, M=2, batch 4: cycle 1 s compute + 1 s of boundary (80 bytes at 80 B/s each way, halved per side),
    3 slots, one update of 5 values at 0.01 s each; memory: 2 micro-batches of 2 samples in flight on stage 0."""
    p = predict(tiny(), one_node(2), Layout(2, 1), SYNC, "gpipe", batch=4, micro=2)
    assert p.partition == [1, 1]
    assert p.compute_s == pytest.approx(3 * 2.0 + 0.05)
    assert p.step_s == pytest.approx(6.05)
    assert p.samples_per_s == pytest.approx(4 / 6.05)
    assert p.bubble == pytest.approx(1 / 3)
    assert p.comm_s == 0.0
    assert p.link_bytes == {f"pipeline {INTRA}": pytest.approx(2 * 10 * 4 * 4)}
    assert p.worker_memory == {"parameters": 20, "gradients": 20, "optimizer": 20, "algorithm": 0,
                               "activations": 2 * 2 * 8.0, "weight stash": 0}


def test_pipedream_has_no_flush_but_stashes_weights_and_updates_per_micro_batch():
    """Without a flush, M slots and M updates per mini-batch; stage 0 keeps P - 0 = 2 weight versions."""
    p = predict(tiny(), one_node(2), Layout(2, 1), SYNC, "pipedream", batch=4, micro=2)
    assert p.compute_s == pytest.approx(2 * 2.0 + 2 * 0.05)
    assert p.bubble == 0.0
    assert p.worker_memory["weight stash"] == 2 * 20


def test_allreduce_between_nodes_uses_the_slow_link():
    """1 stage x 2 replicas on two nodes of one rank: the ring crosses the inter-node link, once per step."""
    slow, fast = Link(10.0, 0.5), Link(1e9, 0.0)
    p = predict(tiny(), Cluster(2, 1, slow, fast), Layout(1, 2), SYNC, "gpipe", batch=4, micro=1)
    assert p.comm_s == pytest.approx(2 * 0.5 + 40 / 10)     # 2(N-1) = 2 messages, 2(N-1)/N x 40 bytes
    assert p.link_bytes == {f"allreduce {INTER}": pytest.approx(2 * 40)}
    periodic = predict(tiny(), Cluster(2, 1, slow, fast), Layout(1, 2), AlgoCost("avg", "allreduce", period=4),
                       "gpipe", batch=4, micro=1)
    assert periodic.comm_s == pytest.approx(p.comm_s / 4)


def test_parameter_server_costs_push_and_reply_and_its_memory():
    """1 x 2 workers + 1 server: each worker sends g and receives w (2 x 40 bytes) and waits for the apply;
    the server holds its weights plus one backup per worker (DC-ASGD's shape)."""
    algo = AlgoCost("dcasgd-c", "ps", server_vectors=1.0, server_per_worker=1.0, server_s_per_value=0.1)
    p = predict(tiny(), one_node(3, bandwidth=80.0), Layout(1, 2, 1), algo, "gpipe", batch=4, micro=1)
    assert p.comm_s == pytest.approx(2 * 40 / 80 + 10 * 0.1)
    assert p.link_bytes == {f"ps {INTRA}": pytest.approx(2 * 2 * 40)}
    assert p.ps_memory == pytest.approx(40 * (1 + 2))
    # the server serves both workers in turn: a step is no shorter than its work for both
    assert p.step_s >= 2 * (2 * 40 / 80 + 10 * 0.1)


def test_oversubscription_slows_compute_by_runnable_tasks_over_cores():
    """4 ranks on 2 cores compute half as fast; a device 2x faster cancels it; other tasks share the cores too."""
    link = Link(1e9, 0.0)
    assert Cluster(1, 4, link, link, cores_per_node=2).slowdown == 2.0
    assert Cluster(1, 4, link, link, cores_per_node=2, compute_scale=2.0).slowdown == 1.0
    assert Cluster(1, 4, link, link).slowdown == 1.0
    # two other runnable tasks on the node's 2 cores: 1 rank shares them with 2 others
    assert Cluster(1, 1, link, link, cores_per_node=2, background=2.0).slowdown == 1.5
    assert Cluster(1, 1, link, link, cores_per_node=2, background=0.5).slowdown == 1.0


def test_layouts_fit_the_world_and_the_model_depth():
    """Every stages x replicas + ps using exactly the world, never more stages than layers."""
    assert layouts(4, 3) == [Layout(1, 4), Layout(2, 2)]
    assert set(layouts(4, 6, [1])) == {Layout(1, 3, 1), Layout(3, 1, 1)}


def test_ranking_puts_the_pipeline_first_on_a_slow_link_and_replicas_first_on_a_fast_one():
    """Two nodes of one rank, 4-byte activations, 8 kB of weights: across 100 B/s the 2-stage pipeline (moving
    activations) beats the allreduce of the weights (80 s); across a free link, replicas beat the bubble."""
    prof = Profile({b: [1.0, 1.0] for b in (1, 2, 4)}, layer_params=[1000, 1000], layer_out=[1, 1],
                   layer_cache=[0.0, 0.0], update_s_per_value=0.0, optimizer_vectors=1.0)
    lays = layouts(2, 2)
    slow = Cluster(2, 1, Link(100.0, 0.0), Link(1e12, 0.0))
    fast = Cluster(2, 1, Link(1e12, 0.0), Link(1e12, 0.0))
    first_slow = plan.predict_all(prof, {"sync": SYNC}, slow, lays, ["gpipe"], batch=4)[0]
    first_fast = plan.predict_all(prof, {"sync": SYNC}, fast, lays, ["gpipe"], batch=4)[0]
    assert first_slow.layout == Layout(2, 1)
    assert first_fast.layout == Layout(1, 2)


@pytest.mark.parametrize("text, expected", [
    ("1Gbit", 125e6), ("100Gbit/s", 12.5e9), ("10Gbps", 1.25e9), ("1.25GB/s", 1.25e9), ("125MB", 125e6),
    ("1e9", 1e9), ("8 kbit", 1e3), ("1GiB/s", 2.0 ** 30)])
def test_bandwidth_units(text, expected):
    """Lower-case b is bits, upper-case B bytes, no unit bytes/s."""
    assert plan.parse_bandwidth(text) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [("50us", 5e-5), ("0.2ms", 2e-4), ("1e-5", 1e-5), ("2s", 2.0),
                                            ("100ns", 1e-7)])
def test_latency_units(text, expected):
    assert plan.parse_latency(text) == pytest.approx(expected)


@pytest.mark.parametrize("argv, says", [
    (["--bandwidth", "fast"], "bandwidth 'fast'"),
    (["--bandwidth", "0Gbit"], "must be positive"),
    (["--latency", "5 parsecs"], "latency '5 parsecs'"),
    (["--nodes", "0"], "--nodes must be at least 1"),
    (["--algorithms", "sync,nope"], "unknown 'nope'"),
    (["--microbatches", "500"], "exceeds --batch-size"),
    (["--model", "vgg"], "invalid choice"),
])
def test_cli_errors_are_one_line_and_exit_2(argv, says, capsys):
    """A user's mistake: exit code 2 and one line on stderr naming the problem, no traceback or usage block."""
    try:
        code = plan.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("hpdl.plan: error:")
    assert says in err


def test_help_names_the_units(capsys):
    with pytest.raises(SystemExit) as e:
        plan.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "1Gbit" in out and "bytes/s" in out and "50us" in out


def test_cli_measures_predicts_and_ranks(tmp_path, capsys):
    """On a small MLP: every fitting layout is printed, and the JSON's predictions are sorted fastest first."""
    out = tmp_path / "plan.json"
    code = plan.main(["--model", "mlp", "--nodes", "2", "--gpus-per-node", "1", "--algorithms", "sync,asgd",
                      "--schedules", "1f1b", "--ps", "1", "--repeats", "1", "--json", str(out), "--top", "0"])
    text = capsys.readouterr().out
    assert code == 0
    data = json.loads(out.read_text())
    shown = {(p["layout"], p["algorithm"]) for p in data["predictions"]}
    assert shown == {("1x2", "sync"), ("2x1", "sync"), ("1x1+1ps", "asgd")}
    speeds = [p["samples_per_s"] for p in data["predictions"]]
    assert speeds == sorted(speeds, reverse=True)
    assert all(v > 0 for v in data["profile"]["layer_seconds"]["128"])
    for row in ("1x2", "2x1", "1x1+1ps"):
        assert row in text


def test_a_given_partition_is_used_and_checked():
    """predict takes a hand cut as hpdl.train's --partition does, and refuses one that does not fit."""
    p = predict(tiny(), one_node(2), Layout(2, 1), SYNC, "gpipe", batch=4, micro=2, partition=[1, 1])
    assert p.partition == [1, 1]
    with pytest.raises(ValueError, match="does not cut 2 layers into 2 stages"):
        predict(tiny(), one_node(2), Layout(2, 1), SYNC, "gpipe", batch=4, micro=2, partition=[2])


def test_workers_on_node_counts_what_placement_puts_there():
    """The closed form agrees with placing every replica one by one (topology.place's order)."""
    for P, R, K, G in [(1, 5, 1, 2), (2, 3, 4, 4), (3, 2, 0, 1), (2, 8, 2, 4)]:
        lay = Layout(P, R, K)
        for s in range(P):
            for node in range(-(-lay.world // G)):
                assert workers_on_node(lay, G, s, node) == sum(node_of(lay, G, s, r) == node for r in range(R))

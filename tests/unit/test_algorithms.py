"""Update rules of hpdl.algorithms against hand-computed values, and the identities between them."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from hpdl.algorithms import (ALGORITHMS, AlgorithmError, AsgdServer, AsgdWorker, DcAsgdAdaptiveServer,
                             DcAsgdServer, EamsgdWorker, EasgdServer, EasgdWorker, GradientWorker,
                             LocalSgdWorker, add_arguments, avg_sync, bmuf_sync, easgd_sync_center,
                             easgd_sync_worker, hogwild_apply, hyper_from_args, sync_sgd)
from hpdl.algorithms.registry import get

W0 = np.array([1.0, 2.0])


def vec(*xs, dtype=np.float64):
    return np.array(xs, dtype=dtype)


def grads(n: int, size: int = 5, seed: int = 0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size).astype(dtype) for _ in range(n)]


# -- ASGD (§3) -------------------------------------------------------------------------

def test_asgd_server_adds_pushed_steps_and_counts_delay():
    """Two workers, three pushes: w <- w + Δ, the reply is w, staleness is versions since the last reply."""
    server = AsgdServer(W0, 2)
    assert server.staleness(0) == 0 and server.staleness(1) == 0
    np.testing.assert_allclose(server.apply(0, vec(-0.1, 0.2), 0.5), [0.9, 2.2])
    assert server.staleness(1) == 1  # worker 1 still holds w0
    np.testing.assert_allclose(server.apply(1, vec(0.3, 0.0), 0.5), [1.2, 2.2])
    assert server.staleness(0) == 1  # worker 0 holds version 1
    reply = server.apply(0, vec(0.0, -1.0), 0.5)
    np.testing.assert_allclose(reply, [1.2, 1.2])
    assert server.version == 3 and server.sent_version == [3, 2]
    np.testing.assert_array_equal(W0, [1.0, 2.0])  # the server works on a copy


def test_asgd_worker_pushes_minus_lr_g_and_downpour_accumulates():
    """n_push = 1 pushes -η g and leaves w alone; n_push = 2 applies -η g locally and pushes the sum."""
    w = vec(1.0, 1.0)
    plain = AsgdWorker(w)
    plain.local_step(w, vec(1.0, -2.0), 0.1)
    assert plain.should_push(0)
    np.testing.assert_allclose(plain.payload(w), [-0.1, 0.2])
    np.testing.assert_array_equal(w, [1.0, 1.0])

    downpour = AsgdWorker(w, n_push=2, n_fetch=2)
    downpour.local_step(w, vec(1.0, -2.0), 0.1)
    assert not downpour.should_push(0) and not downpour.should_fetch(0)
    downpour.local_step(w, vec(3.0, 0.0), 0.2)
    assert downpour.should_push(1) and downpour.should_fetch(1)
    np.testing.assert_allclose(downpour.payload(w), [-0.7, 0.2])
    np.testing.assert_allclose(w, [0.3, 1.2])
    downpour.on_reply(w, vec(5.0, 6.0))
    np.testing.assert_array_equal(w, [5.0, 6.0])


# -- DC-ASGD (§4) ----------------------------------------------------------------------

def test_dcasgd_constant_hand_computed():
    """w <- w - η (g + λ g⊙g⊙(w - w_bak(m))), then w_bak(m) <- w; λ = 0.5, η = 0.1."""
    server = DcAsgdServer(W0, 2, lambda_dc=0.5)
    np.testing.assert_allclose(server.apply(0, vec(1.0, -1.0), 0.1), [0.9, 2.1])  # no delay yet
    # Worker 1 computed at w0: w - w_bak(1) = (-0.1, 0.1); λ g² that = (-0.2, 0.05).
    np.testing.assert_allclose(server.apply(1, vec(2.0, 1.0), 0.1), [0.72, 1.995])
    # Worker 0 computed at (0.9, 2.1): the move is (-0.18, -0.105), times λ g² = 0.5.
    np.testing.assert_allclose(server.apply(0, vec(1.0, 1.0), 0.1), [0.629, 1.90025], rtol=1e-13)


def test_dcasgd_adaptive_hand_computed():
    """MS_m <- μ MS_m + (1-μ) g²; w <- w - η (g + λ0/sqrt(MS_m+ε) g²(w - w_bak(m))); MS kept per worker."""
    server = DcAsgdAdaptiveServer(W0, 2, lambda_dc=2.0, ms_decay=0.75, eps_dc=1e-300)
    np.testing.assert_allclose(server.apply(0, vec(2.0, -2.0), 0.1), [0.8, 2.2])  # MS_0 = (1, 1)
    # MS_1 = 0.25 (16, 4) = (4, 1); scale λ0/sqrt = (1, 2); move (-0.2, 0.2); g² = (16, 4).
    np.testing.assert_allclose(server.apply(1, vec(4.0, 2.0), 0.1), [0.72, 1.84])
    # MS_0 = 0.75 (1, 1) + 0.25 (4, 4) = 1.75 (worker 0's own history); move (-0.08, -0.36).
    scale = 2.0 / np.sqrt(1.75) * 4.0
    expected = [0.72 - 0.1 * (2.0 + scale * -0.08), 1.84 - 0.1 * (2.0 + scale * -0.36)]
    np.testing.assert_allclose(server.apply(0, vec(2.0, 2.0), 0.1), expected, rtol=1e-13)
    np.testing.assert_allclose(server.ms, [[1.75, 1.75], [4.0, 1.0]])


def test_dcasgd_backup_is_what_was_sent():
    """w_bak(m) is the reply to m (and a fetch by m), others' backups stay; a reply is stable until m's next push."""
    server = DcAsgdServer(W0, 3, lambda_dc=0.1)
    reply = server.apply(1, vec(1.0, 1.0), 0.1)
    np.testing.assert_array_equal(server.backup[1], server.w)
    np.testing.assert_array_equal(server.backup[0], W0)
    np.testing.assert_array_equal(server.backup[2], W0)
    sent = reply.copy()
    server.apply(0, vec(1.0, -1.0), 0.1)
    np.testing.assert_array_equal(reply, sent)  # worker 0's push did not touch worker 1's reply
    assert server.staleness(2) == 2
    np.testing.assert_array_equal(server.fetch(2), server.w)
    np.testing.assert_array_equal(server.backup[2], server.w)
    assert server.staleness(2) == 0


def test_dcasgd_with_lambda_zero_is_asgd():
    """DC-ASGD with λ = 0 (both variants) applies exactly ASGD's updates for any push order."""
    order = [0, 1, 1, 0, 2, 1, 0, 2]
    gs = grads(len(order), seed=1)
    asgd = AsgdServer(np.ones(5), 3)
    dc = [DcAsgdServer(np.ones(5), 3, lambda_dc=0.0), DcAsgdAdaptiveServer(np.ones(5), 3, lambda_dc=0.0)]
    for t, (m, g) in enumerate(zip(order, gs)):
        lr = 0.1 / (1 + t)
        worker = AsgdWorker(np.ones(5))
        worker.local_step(np.ones(5), g, lr)
        asgd.apply(m, worker.payload(None), lr)
        for server in dc:
            server.apply(m, g, lr)
    for server in dc:
        np.testing.assert_array_equal(server.w, asgd.w)


def test_gradient_worker_pushes_raw_gradient():
    """The DC-ASGD worker does nothing locally, pushes g as it is, and takes the reply's weights."""
    w = vec(1.0, 2.0)
    worker = GradientWorker(w)
    g = vec(3.0, 4.0)
    worker.local_step(w, g, 0.1)
    assert worker.should_push(0) and worker.payload(w) is g
    np.testing.assert_array_equal(w, [1.0, 2.0])
    worker.on_reply(w, vec(7.0, 8.0))
    np.testing.assert_array_equal(w, [7.0, 8.0])


# -- EASGD / EAMSGD (§5) ---------------------------------------------------------------

def test_easgd_server_hand_computed():
    """e = α (x_i - x̃); x̃ <- x̃ + e; reply e; α = 0.5, two workers, three exchanges."""
    server = EasgdServer(vec(0.0, 0.0), 2, alpha=0.5)
    np.testing.assert_allclose(server.apply(0, vec(2.0, 4.0), 0.1), [1.0, 2.0])
    np.testing.assert_allclose(server.apply(1, vec(-2.0, 0.0), 0.1), [-1.5, -1.0])
    np.testing.assert_allclose(server.apply(0, vec(1.0, 2.0), 0.1), [0.75, 0.5])
    np.testing.assert_allclose(server.w, [0.25, 1.5])
    assert EasgdServer(vec(0.0), 4).alpha == pytest.approx(0.9 / 4)  # default β / N


def test_easgd_exchange_conserves_centre_plus_workers():
    """Elastic symmetry: an exchange moves x̃ and x_i by +e and -e, so x̃ + Σ_i x_i is unchanged."""
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal(6) for _ in range(3)]
    server = EasgdServer(rng.standard_normal(6), 3)
    workers = [EasgdWorker(x, tau=1) for x in xs]
    total = server.w + sum(xs)
    for m in [0, 2, 1, 1, 0]:
        workers[m].on_reply(xs[m], server.apply(m, workers[m].payload(xs[m]), 0.1))
        np.testing.assert_allclose(server.w + sum(xs), total, rtol=1e-14, atol=1e-14)


def run_elastic_worker(worker, steps: int, seed: int = 3):
    """A worker's local steps with elastic exchanges every τ, against one server; returns x."""
    x = np.linspace(-1.0, 1.0, 5)
    rule = worker(x)
    server = EasgdServer(np.zeros(5), 2, alpha=0.3)
    for k, g in enumerate(grads(steps, seed=seed)):
        rule.lookahead(x)
        rule.local_step(x, g + 0.1 * x, 0.05)  # the gradient depends on x, as a loss's does
        if rule.should_push(k):
            rule.on_reply(x, server.apply(0, rule.payload(x), 0.05))
    return x


def test_eamsgd_with_zero_momentum_is_easgd():
    """EAMSGD with δ = 0 gives EASGD's iterates exactly."""
    easgd = run_elastic_worker(lambda x: EasgdWorker(x, tau=3), 10)
    eamsgd = run_elastic_worker(lambda x: EamsgdWorker(x, tau=3, delta=0.0), 10)
    np.testing.assert_array_equal(eamsgd, easgd)
    assert not np.array_equal(run_elastic_worker(lambda x: EamsgdWorker(x, tau=3, delta=0.9), 10), easgd)


def test_eamsgd_local_step_is_the_authors_nesterov_step():
    """v <- δv; x <- x + v; g = ∇f(x); x <- x - ηg; v <- v - ηg, checked over two steps."""
    x = vec(1.0)
    rule = EamsgdWorker(x, tau=10, delta=0.5)
    rule.lookahead(x)                   # v = 0
    rule.local_step(x, vec(2.0), 0.1)   # x = 0.8, v = -0.2
    rule.lookahead(x)                   # v = -0.1, x = 0.7
    np.testing.assert_allclose(x, [0.7])
    rule.local_step(x, vec(1.0), 0.1)   # x = 0.6, v = -0.2
    np.testing.assert_allclose(x, [0.6])
    np.testing.assert_allclose(rule.v, [-0.2])


def test_easgd_synchronous_form():
    """x_i <- x_i - η (g_i + ρ (x_i - x̃)); x̃ <- x̃ + η ρ Σ (x_i - x̃); with g = 0 the total is conserved."""
    xs, center = [vec(1.0, 2.0), vec(3.0, 0.0)], vec(0.0, 1.0)
    x_sum = xs[0] + xs[1]
    easgd_sync_worker(xs[0], center, vec(1.0, 1.0), 0.1, 2.0)
    np.testing.assert_allclose(xs[0], [1.0 - 0.1 * (1.0 + 2.0), 2.0 - 0.1 * (1.0 + 2.0)])
    easgd_sync_center(center, x_sum, 2, 0.1, 2.0)
    np.testing.assert_allclose(center, [0.0 + 0.2 * 4.0, 1.0 + 0.2 * 0.0])

    rng = np.random.default_rng(4)
    xs, center = [rng.standard_normal(4) for _ in range(3)], rng.standard_normal(4)
    total, x_sum = center + sum(xs), sum(xs)
    for x in xs:
        easgd_sync_worker(x, center, np.zeros(4), 0.1, 0.7)
    easgd_sync_center(center, x_sum, 3, 0.1, 0.7)
    np.testing.assert_allclose(center + sum(xs), total, rtol=1e-14)


# -- averaging, BMUF, sync (§1, §2) ----------------------------------------------------

def test_bmuf_hand_computed():
    """G = w_g - mean; Δ <- η_b Δ + ζ G; w = w_g - Δ; Nesterov: w - η_b Δ."""
    for nesterov, expected in [(False, [0.45, 0.0]), (True, [0.175, -0.5])]:
        w_global, delta = vec(1.0, 1.0), vec(0.1, 0.0)
        new = bmuf_sync(w_global, vec(0.5, 0.0), delta, eta_b=0.5, zeta=1.0, nesterov_bm=nesterov)
        assert new is w_global
        np.testing.assert_allclose(new, expected, atol=1e-15)
        np.testing.assert_allclose(delta, [0.55, 1.0])
    w_global, delta = vec(1.0), vec(0.0)
    np.testing.assert_allclose(bmuf_sync(w_global, vec(0.0), delta, eta_b=0.0, zeta=0.5), [0.5])


@pytest.mark.parametrize("nesterov", [True, False])
def test_bmuf_without_momentum_is_averaging_bitwise(nesterov):
    """bmuf_sync with η_b = 0, ζ = 1 returns exactly the mean, round after round (float32 too)."""
    for dtype in (np.float64, np.float32):
        rng = np.random.default_rng(5)
        w_global = rng.standard_normal(100).astype(dtype)
        delta = np.zeros_like(w_global)
        for _ in range(4):
            replicas = [w_global + rng.standard_normal(100).astype(dtype) for _ in range(3)]
            mean = avg_sync(replicas[0] + replicas[1] + replicas[2], 3)
            expected = mean.copy()
            new = bmuf_sync(w_global, mean, delta, eta_b=0.0, zeta=1.0, nesterov_bm=nesterov)
            np.testing.assert_array_equal(new, expected)
            assert new.dtype == dtype


def test_averaging_every_step_from_identical_starts_is_sync_sgd():
    """Averaging after one local SGD step of each replica = one SGD step on the averaged gradient."""
    w, gs, lr = np.linspace(0.0, 1.0, 5), grads(4, seed=6), 0.1
    replicas = [w.copy() for _ in gs]
    for x, g in zip(replicas, gs):
        rule = LocalSgdWorker(x, tau=1)
        rule.local_step(x, g, lr)
        assert rule.should_push(0)
    averaged = avg_sync(sum(replicas[1:], replicas[0].copy()), 4)
    synced = w.copy()
    sync_sgd(synced, sum(gs[1:], gs[0].copy()), 4, lr)
    np.testing.assert_allclose(averaged, synced, rtol=1e-14)
    np.testing.assert_allclose(synced, w - lr * np.mean(gs, axis=0), rtol=1e-14)


def test_hogwild_apply_updates_in_place():
    """hogwild_apply: w <- w - η g in the shared vector itself."""
    shared = vec(1.0, 2.0)
    view = shared[:]
    hogwild_apply(view, vec(1.0, -1.0), 0.5)
    np.testing.assert_array_equal(shared, [0.5, 2.5])


# -- dtype, checkpoints, registry ------------------------------------------------------

SERVERS = [(AsgdServer, {}), (DcAsgdServer, {}), (DcAsgdAdaptiveServer, {}), (EasgdServer, {})]


@pytest.mark.parametrize("cls, kw", SERVERS)
def test_float32_stays_float32(cls, kw):
    """Server state and replies keep the vectors' float32."""
    server = cls(np.ones(4, np.float32), 2, **kw)
    for m, g in zip([0, 1, 0], grads(3, 4, dtype=np.float32)):
        reply = server.apply(m, g, 0.1)
        assert reply.dtype == np.float32
    for value in server.state_dict().values():
        assert value.dtype in (np.float32, np.int64)


@pytest.mark.parametrize("cls, kw", SERVERS)
def test_server_state_dict_resumes_exactly(cls, kw):
    """Saving after two pushes and loading into a fresh rule gives the same later replies."""
    gs = grads(5, seed=7)
    a = cls(np.ones(5), 2, **kw)
    for m, g in zip([0, 1], gs):
        a.apply(m, g, 0.1)
    state = a.state_dict()
    b = cls(np.zeros(5), 2, **kw)
    b.load_state_dict(state)
    assert b.version == 2 and b.sent_version == a.sent_version
    for m, g in zip([1, 0, 0], gs[2:]):
        np.testing.assert_array_equal(a.apply(m, g, 0.1), b.apply(m, g, 0.1))
    a.w += 1.0
    assert not np.array_equal(state["w"], a.w)  # the state is a snapshot
    with pytest.raises(ValueError, match="workers"):
        cls(np.zeros(5), 3, **kw).load_state_dict(state)


def test_worker_state_dict_round_trip():
    """EAMSGD's momentum and Downpour's accumulator survive a checkpoint."""
    w = np.ones(3)
    a = EamsgdWorker(w, tau=5, delta=0.9)
    a.local_step(w, vec(1.0, 2.0, 3.0), 0.1)
    b = EamsgdWorker(w, tau=5, delta=0.9)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(b.v, a.v)
    d = AsgdWorker(w, n_push=3, n_fetch=3)
    assert d.state_dict() == {}
    d.local_step(w, vec(1.0, 1.0, 1.0), 0.1)
    e = AsgdWorker(w, n_push=3, n_fetch=3)
    e.load_state_dict(d.state_dict())
    np.testing.assert_array_equal(e.acc, d.acc)


def test_registry_kinds_and_halves():
    """Every algorithm has a known kind; parameter-server ones build a server and workers."""
    assert {"sync", "avg", "bmuf", "asgd", "dcasgd-c", "dcasgd-a", "easgd", "eamsgd", "hogwild"} <= set(ALGORITHMS)
    for spec in ALGORITHMS.values():
        assert spec.kind in ("allreduce", "ps", "shared-memory") and spec.section.startswith("§")
        if spec.kind == "ps":
            hyper = spec.resolve({}, 4, 0.1)
            server = spec.make_server(np.ones(3), 4, hyper)
            worker = spec.make_worker(np.ones(3), hyper)
            assert server.version == 0 and hasattr(worker, "on_reply")
    assert ALGORITHMS["hogwild"].kind == "shared-memory" and ALGORITHMS["hogwild"].server is hogwild_apply


def test_registry_defaults_follow_the_reference():
    """Defaults of ALGORITHMS.md: λ 0.04 (c); λ0 2, μ 0.95, ε 1e-7 (a); α 0.9/N; δ 0.99; η_b 0.875, ζ 1."""
    assert get("dcasgd-c").resolve({}, 4, 0.1) == {"lambda_dc": 0.04}
    assert get("dcasgd-a").resolve({}, 4, 0.1) == {"lambda_dc": 2.0, "ms_decay": 0.95, "eps_dc": 1e-7}
    assert get("eamsgd").resolve({}, 8, 0.1) == {"alpha": 0.9 / 8, "tau": 100, "delta": 0.99}
    assert get("bmuf").resolve({}, 4, 0.1) == {"tau": 50, "eta_b": 0.875, "zeta": 1.0, "nesterov_bm": True}
    assert get("easgd-sync").resolve({}, 3, 0.1)["rho"] == pytest.approx(3.0)  # β = N η ρ = 0.9
    assert get("asgd").resolve({}, 4, 0.1) == {"n_push": 1, "n_fetch": 1}


def test_cli_flags_round_trip_and_reject_misfits():
    """add_arguments adds each flag once; hyper_from_args checks values and flags foreign to the algorithm."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--tau", "4", "--eta-b", "0.5", "--no-nesterov-bm"])
    assert hyper_from_args("bmuf", args, 4, 0.1) == {"tau": 4, "eta_b": 0.5, "zeta": 1.0, "nesterov_bm": False}
    with pytest.raises(AlgorithmError, match="--eta-b does not apply to avg"):
        hyper_from_args("avg", args, 4, 0.1)
    with pytest.raises(AlgorithmError, match="--lambda-dc must be >= 0"):
        hyper_from_args("dcasgd-c", parser.parse_args(["--lambda-dc", "-1"]), 4, 0.1)
    with pytest.raises(AlgorithmError, match="--tau must be >= 1"):
        hyper_from_args("easgd", parser.parse_args(["--tau", "0"]), 4, 0.1)
    with pytest.raises(AlgorithmError, match="unknown algorithm"):
        get("nope")

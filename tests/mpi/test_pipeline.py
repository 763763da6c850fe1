"""Pipeline schedules over MPI ranks against one process computing the same steps."""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from hpdl.comm.p2p import PipeChannel
from hpdl.models import build_model
from hpdl.optim import make_optimizer
from hpdl.pipeline import microbatch
from hpdl.pipeline.partition import balance, flop_costs, stage_bounds
from hpdl.pipeline.runtime import Feed, StageRunner, stage_shapes
from hpdl.pipeline.schedules import SCHEDULES
from hpdl.trainer import loss_and_grads

comm = MPI.COMM_WORLD
# A rank whose peer failed raises CommTimeout after this long instead of waiting for pytest's timeout.
COMM_TIMEOUT = 30.0
# Dropout off: its masks are drawn per micro-batch, so only dropout-free models must agree exactly.
MODELS = {"mlp": {"hidden": [32, 24]}, "cnn": {"channels": [4, 6], "hidden": 16, "dropout": 0.0},
          "cnn-winograd": {"channels": [4, 6], "hidden": 16, "dropout": 0.0, "winograd": True}}


def synthetic_batches(n: int, batch: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, 1, 28, 28)), rng.integers(0, 10, batch)) for _ in range(n)]


def stage_runner(model, schedule: str, n_micro: int, dtype, lr_momentum=(0.05, 0.9), counts=None):
    """This rank's stage of `model`, cut by `counts` or evenly by FLOPs over all ranks."""
    P, s = comm.Get_size(), comm.Get_rank()
    start, stop = stage_bounds(counts or balance(flop_costs(model), P))[s]
    layers = model.layers[start:stop]
    params = model.init(0, np, dtype, start, stop)
    opt = make_optimizer("sgd", layers, momentum=lr_momentum[1])
    stream = n_micro if SCHEDULES[schedule].flush else max(n_micro, P)
    return StageRunner(layers, params, start, s, P, schedule, stream, opt, PipeChannel(comm, s, P, timeout=COMM_TIMEOUT),
                       stage_shapes(model.shapes(), (start, stop)), np, dtype), (start, stop)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "cnn-winograd"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_flushed_schedules_equal_single_process(model_name, schedule, dtype, tol):
    """20 flushed pipeline steps leave every stage's parameters equal to single-process SGD's
    (the cnn with im2col and with Winograd convolutions, whose activations cross ranks batch-innermost)."""
    model = build_model(model_name.split("-")[0], **MODELS[model_name])
    batch, n_micro, lr = 12, 4, 0.05
    runner, (start, stop) = stage_runner(model, schedule, n_micro, dtype)
    ref_params = model.init(0, np, dtype)
    ref_opt = make_optimizer("sgd", model.layers, momentum=0.9)
    spec = SCHEDULES[schedule]
    weights, sizes = microbatch.loss_weights(batch, n_micro), microbatch.sizes(batch, n_micro)
    bounds = microbatch.bounds(batch, n_micro)
    for step, (x, y) in enumerate(synthetic_batches(20, batch)):
        x = x.astype(dtype)
        runner.run(spec.generator(runner.stage, runner.n_stages, n_micro), Feed(
            x=lambda mb: x[slice(*bounds[mb])], y=lambda mb: y[slice(*bounds[mb])],
            weight=lambda mb: weights[mb], size=lambda mb: sizes[mb], key=lambda mb: (0,), lr=lambda mb: lr))
        _, grads = loss_and_grads(model.layers, ref_params, x, y, (0,))
        ref_opt.step(ref_params, grads, lr)
    worst = max((float(np.max(np.abs(p[k] - r[k])))
                 for p, r in zip(runner.params, ref_params[start:stop]) for k in p), default=0.0)
    assert runner.updates == 20
    assert worst < tol, f"stage {runner.stage}: max abs diff {worst:.3g}"


def flat(layers, params) -> np.ndarray:
    return np.concatenate([np.zeros(0)] + [np.ravel(p[n]) for layer, p in zip(layers, params)
                                           for n in layer.trainable])


def gathered_records(runner, records: list) -> list[list[np.ndarray]] | None:
    """Every stage's per-micro-batch [stashed weights, applied gradient], gathered on rank 0."""
    mine = np.concatenate([np.concatenate(r) for r in records])
    sizes = np.zeros(comm.Get_size(), dtype=np.int64)
    comm.Allgather(np.array([mine.size], dtype=np.int64), sizes)
    out = np.empty(int(sizes.sum())) if comm.Get_rank() == 0 else None
    comm.Gatherv(mine, (out, sizes) if out is not None else None, root=0)
    if out is None:
        return None
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return [out[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("schedule, exact", [("pipedream", True), ("pipelined-bp", False)])
def test_weight_stashing_gives_exact_gradients(schedule, exact):
    """pipedream applies, per micro-batch, the gradient at the weights its forward used; pipelined-bp does not."""
    P, n_micro, b = comm.Get_size(), 12, 4
    # Two Linear layers per stage: a stage's weight gradient then depends on its own later
    # weights (through dx inside the stage), which is where a missing stash shows.
    model = build_model("mlp", hidden=[12] * (2 * P - 1))
    counts = [5] + [4] * (P - 2) + [3]
    runner, (start, stop) = stage_runner(model, schedule, n_micro, np.float64, counts=counts)
    records: list[tuple[np.ndarray, np.ndarray]] = []
    runner.on_update = lambda mb, w, g: records.append((flat(runner.layers, w), flat(runner.layers, g)))
    data = synthetic_batches(n_micro, b, seed=3)
    runner.run(SCHEDULES[schedule].generator(runner.stage, P, n_micro), Feed(
        x=lambda mb: data[mb][0], y=lambda mb: data[mb][1], weight=lambda mb: 1.0,
        size=lambda mb: b, key=lambda mb: (0,), lr=lambda mb: 0.2))
    assert len(records) == n_micro
    per_stage = gathered_records(runner, records)
    if per_stage is None:
        return
    bounds = stage_bounds(counts)
    mismatches = 0
    for mb in range(n_micro):
        # The model at the weights each stage stashed for this micro-batch, in one process.
        params = model.init(0, np, np.float64)
        applied = []
        for s, (lo, hi) in enumerate(bounds):
            n = flat(model.layers[lo:hi], params[lo:hi]).size
            rec = per_stage[s].reshape(n_micro, 2 * n)[mb]
            unflatten(model.layers[lo:hi], params[lo:hi], rec[:n])
            applied.append(rec[n:])
        _, grads = loss_and_grads(model.layers, params, data[mb][0], data[mb][1], (0,))
        for s, (lo, hi) in enumerate(bounds):
            diff = np.max(np.abs(flat(model.layers[lo:hi], grads[lo:hi]) - applied[s]), initial=0.0)
            if exact:
                assert diff < 1e-12, f"micro-batch {mb}, stage {s}: {diff:.3g}"
            mismatches += diff > 1e-6
    if not exact:
        assert mismatches > 0


def unflatten(layers, params, vec: np.ndarray) -> None:
    offset = 0
    for layer, p in zip(layers, params):
        for n in layer.trainable:
            p[n][...] = vec[offset:offset + p[n].size].reshape(p[n].shape)
            offset += p[n].size


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_every_schedule_completes_for_few_and_many_micro_batches(schedule):
    """M < P, M = P and M >> P all run to completion with every micro-batch stepped as the schedule says."""
    model = build_model("mlp", hidden=[8, 8, 8])
    P = comm.Get_size()
    for n_micro in sorted({max(1, P - 1), P, 4 * P + 1}):
        runner, _ = stage_runner(model, schedule, n_micro, np.float32)
        data = synthetic_batches(n_micro, 2, seed=n_micro)
        runner.run(SCHEDULES[schedule].generator(runner.stage, P, n_micro), Feed(
            x=lambda mb: data[mb][0].astype(np.float32), y=lambda mb: data[mb][1], weight=lambda mb: 1.0,
            size=lambda mb: 2, key=lambda mb: (0,), lr=lambda mb: 0.01))
        assert runner.updates == (1 if SCHEDULES[schedule].flush else n_micro)
        assert not runner.stash.entries

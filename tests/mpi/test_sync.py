"""Synchronous data parallelism: bucketed allreduce, and R replicas against one process with an R-times batch."""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from hpdl.comm.collectives import BucketAllreduce
from hpdl.flat import Flat
from hpdl.models import build_model
from hpdl.optim import make_optimizer
from hpdl.pipeline import microbatch
from hpdl.pipeline.runtime import Feed, StageRunner, stage_shapes
from hpdl.pipeline.schedules import SCHEDULES
from hpdl.trainer import loss_and_grads

comm = MPI.COMM_WORLD


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("bucket_bytes", [1, 200, 1 << 30])
def test_buckets_sum_like_one_allreduce(bucket_bytes):
    """However the vector is cut into buckets, the result is the sum over ranks of every element."""
    model = build_model("mlp", hidden=[7, 5])
    params = model.init(0, np, np.float64)
    flat = Flat(model.layers, params, np, np.float64)
    flat.vector[:] = np.arange(flat.vector.size) * (comm.rank + 1)
    reducer = BucketAllreduce(comm, flat, bucket_bytes=bucket_bytes)
    # Backward without dx stops at the first layer with parameters (layer 1, after Flatten).
    for i in reversed(range(1, len(model.layers))):
        reducer.layer_done(i)
    reducer.wait()
    n = comm.size
    np.testing.assert_array_equal(flat.vector, np.arange(flat.vector.size) * n * (n + 1) / 2)
    assert reducer.bytes_reduced == flat.vector.nbytes
    assert (len(reducer) == 1) == (bucket_bytes >= flat.vector.nbytes)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("n_micro", [1, 3])
@pytest.mark.parametrize("name, options", [("cnn", {"channels": [3, 4], "hidden": 8, "dropout": 0.0}),
                                           ("mlp", {"hidden": [16]})])
def test_replicas_equal_one_process_with_the_global_batch(n_micro, name, options):
    """20 sync steps over R replicas equal single-process SGD on the R-times larger batch (float64, < 1e-10)."""
    R, r = comm.size, comm.rank
    model = build_model(name, **options)
    b = 6
    params = model.init(0, np, np.float64)
    opt = make_optimizer("sgd", model.layers, momentum=0.9, weight_decay=1e-3)
    runner = StageRunner(model.layers, params, 0, 0, 1, "1f1b", n_micro, opt, None,
                         stage_shapes(model.shapes(), (0, len(model.layers))), np, np.float64, stage_comm=comm)
    ref = model.init(0, np, np.float64)
    ref_opt = make_optimizer("sgd", model.layers, momentum=0.9, weight_decay=1e-3)
    rng = np.random.default_rng(5)
    weights, bounds = microbatch.loss_weights(b, n_micro, R), microbatch.bounds(b, n_micro)
    for step in range(20):
        x, y = rng.standard_normal((R * b, 1, 28, 28)), rng.integers(0, 10, R * b)
        xr, yr = x[r * b:(r + 1) * b], y[r * b:(r + 1) * b]
        runner.run(SCHEDULES["1f1b"].generator(0, 1, n_micro), Feed(
            x=lambda mb: xr[slice(*bounds[mb])], y=lambda mb: yr[slice(*bounds[mb])],
            weight=lambda mb: weights[mb], size=lambda mb: bounds[mb][1] - bounds[mb][0],
            key=lambda mb: (0,), lr=lambda mb: 0.05))
        _, grads = loss_and_grads(model.layers, ref, x, y, (0,))
        ref_opt.step(ref, grads, 0.05)
    worst = max(float(np.max(np.abs(p[k] - q[k]))) for p, q in zip(params, ref) for k in p)
    assert worst < 1e-10

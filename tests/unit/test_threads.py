"""Splitting a batch into row blocks over threads: the same step as the whole batch, and when it applies."""
from __future__ import annotations

import numpy as np
import pytest

from hpdl.config import ConfigError
from hpdl.data import Loader
from hpdl.models import build_model
from hpdl.threads import MIN_BLOCK_ROWS, RowThreads, row_blocks
from hpdl.trainer import evaluate, loss_and_grads

from test_train import result_of, run


@pytest.fixture(scope="module")
def two():
    threads = RowThreads(2)
    yield threads
    threads.close()


def batch(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 28, 28)), rng.integers(0, 10, n)


@pytest.mark.parametrize("blocks, winograd", [(2, False), (3, True)])
def test_row_blocks_give_the_whole_batch_step(blocks, winograd):
    """The cnn's loss and every gradient from row blocks run on threads equal the whole batch's
    in float64 to rounding, dropout included (each block draws its rows of the batch's mask),
    with the loss weight applied; with im2col and with Winograd convolutions."""
    model = build_model("cnn", channels=(4, 8), hidden=16, winograd=winograd)
    params = model.init(0, np, np.float64)
    x, y = batch(40)
    loss, grads = loss_and_grads(model.layers, params, x, y, (3, 1), 0.25)
    threads = RowThreads(blocks)
    try:
        split_loss, split_grads = loss_and_grads(model.layers, params, x, y, (3, 1), 0.25, threads=threads)
    finally:
        threads.close()
    assert split_loss == pytest.approx(float(loss), rel=1e-13)
    for whole, split in zip(grads, split_grads):
        assert whole.keys() == split.keys()
        for name in whole:
            np.testing.assert_allclose(split[name], whole[name], rtol=1e-11, atol=1e-15, err_msg=name)


def test_on_layer_sees_the_summed_gradients_in_backward_order(two):
    """With blocks, on_layer is called once per layer, last layer first, with the batch's gradients."""
    model = build_model("cnn", channels=(4, 8), hidden=16, dropout=0.0)
    params = model.init(1, np, np.float64)
    x, y = batch(32, seed=1)
    seen = []
    _, grads = loss_and_grads(model.layers, params, x, y, (0,), on_layer=lambda i, g: seen.append((i, g)),
                              threads=two)
    assert [i for i, _ in seen] == list(reversed(range(len(model.layers))))
    assert all(g is grads[i] for i, g in seen)


def test_evaluate_in_blocks_equals_evaluate_whole(two):
    """Test loss and accuracy over a split are the same with the batches run in row blocks."""
    model = build_model("cnn", channels=(4, 8), hidden=16)
    params = model.init(0)
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (1000, 1, 28, 28), dtype=np.uint8)
    loader = Loader((images, rng.integers(0, 10, 1000, dtype=np.uint8)), "test", 300, shuffle=False,
                    drop_last=False)
    whole, split = evaluate(model.layers, params, loader), evaluate(model.layers, params, loader, two)
    assert split[1] == whole[1]
    assert split[0] == pytest.approx(whole[0], rel=1e-6)


def test_blocks_are_even_cover_the_batch_and_are_never_too_thin():
    """bounds() tiles the rows in order, sizes differ by at most one, none below MIN_BLOCK_ROWS
    unless the batch itself is smaller (then one block)."""
    threads = RowThreads(4)
    try:
        for rows in (1, MIN_BLOCK_ROWS - 1, 2 * MIN_BLOCK_ROWS, 37, 128, 1000):
            bounds = threads.bounds(rows)
            assert bounds[0][0] == 0 and bounds[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [stop - first for first, stop in bounds]
            assert max(sizes) - min(sizes) <= 1 and len(bounds) <= 4
            assert len(bounds) == 1 or min(sizes) >= MIN_BLOCK_ROWS
        assert len(threads.bounds(128)) == 4 and len(threads.bounds(2 * MIN_BLOCK_ROWS)) == 2
    finally:
        threads.close()


def test_a_block_runs_in_the_callers_numpy_error_state_and_its_errors_reach_the_caller(two):
    """Worker threads see the caller's np.errstate, and an exception in any block is raised by map."""
    def overflow(first: int, stop: int):
        return np.float32(3e38) * np.float32(10)

    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        two.map(overflow, 2 * MIN_BLOCK_ROWS)
    with np.errstate(over="ignore"):
        assert all(np.isinf(v) for v in two.map(overflow, 2 * MIN_BLOCK_ROWS))


@pytest.mark.parametrize("model, split, threads, device, blocks", [
    ("cnn", "auto", 2, "cpu", 2),
    ("cnn", "auto", 1, "cpu", 1),
    ("cnn", "blas", 4, "cpu", 1),
    ("cnn", "auto", 2, "gpu", 1),
    ("mlp", "auto", 2, "cpu", 1),      # matrix products alone: BLAS threads do as well
    ("mlp", "rows", 2, "cpu", 2),
    ("resnet", "auto", 2, "cpu", 1),   # BatchNorm needs the whole batch
])
def test_which_runs_split_rows(model, split, threads, device, blocks):
    """auto splits convolutional nets without batch statistics on CPU; rows forces it; blas never splits."""
    assert row_blocks(split, build_model(model).layers, threads, device) == blocks


@pytest.mark.parametrize("model, device, needle", [
    ("resnet", "cpu", "BatchNorm normalizes over the whole batch"),
    ("cnn", "gpu", "the GPU runs a batch whole"),
])
def test_forcing_rows_where_it_cannot_apply_is_an_error(model, device, needle):
    with pytest.raises(ConfigError, match=needle):
        row_blocks("rows", build_model(model).layers, 2, device)


def test_cli_split_run_trains_like_the_blas_run(mnist_h5, capsys):
    """hpdl.train's cnn with --thread-split rows and blas train alike over 30 steps in float64 (the
    same steps up to rounding), and rows on a BatchNorm net is a one-line exit 2."""
    common = ["--data", str(mnist_h5), "--model", "cnn", "--max-steps", "30", "--epochs", "1",
              "--threads", "2", "--no-progress", "--batch-size", "64", "--dtype", "float64"]
    results = {}
    for split in ("rows", "blas"):
        code, out, _ = run(common + ["--thread-split", split], capsys)
        assert code == 0
        results[split] = result_of(out)
    assert results["rows"]["test_acc"] == results["blas"]["test_acc"]
    assert results["rows"]["train_loss"] == pytest.approx(results["blas"]["train_loss"], rel=1e-9)
    code, _, err = run(["--model", "resnet", "--thread-split", "rows", "--max-steps", "1", "--no-progress",
                        "--data", str(mnist_h5)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "BatchNorm" in err

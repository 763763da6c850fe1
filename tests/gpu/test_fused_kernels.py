"""The fused kernels of optim_update.cu, norm.cu, im2col.cu, maxpool.cu and sum_squares.cu match their
NumPy oracles in hpdl.kernels (tests/unit/test_kernel_oracles.py ties the oracles to hpdl).

Tolerances. The element-wise updates and im2col/col2im must be bit-identical in float32:
the kernels perform the oracle's IEEE operations in the oracle's order with explicit
round-to-nearest intrinsics (never contracted to FMAs), col2im adds in the oracle's order,
and im2col only copies. The reductions (LayerNorm, BatchNorm, sums of squares) add in a
different order from NumPy's pairwise sums, so no fixed bit pattern is right; instead the
kernel must be as accurate as NumPy float32 itself (hpdl.kernels.float32_allowance): each
error against the float64 oracle (run on the same float32 inputs) at most twice NumPy
float32's largest, plus 8 float32 ulps of the largest magnitude (a floor for outputs NumPy
happens to get exact), plus, for an output that is a sum of terms t over the batch (dgamma,
dbeta, sums of squares), 8 eps sum|t|: a sum's rounding error in any order whose last
additions form a tree is of order eps sum|t|, and NumPy's pairwise order may be luckier on
one draw. CuPy float64 takes the oracle path on the device; it must agree with NumPy
float64 to 1e-12.
"""
from __future__ import annotations

import numpy as np
import pytest

cp = pytest.importorskip("cupy")

from accuracy import assert_as_accurate  # noqa: E402  (after the skip: nothing to test without cupy)
from layouts import expected_layout, stored  # noqa: E402
from hpdl import kernels  # noqa: E402

pytestmark = pytest.mark.gpu

# 1, 33, 1000 elements, and one past 65535 blocks x 256 threads, so the grid-stride loop runs.
FLAT_SIZES = [1, 33, 1000, 65535 * 256 + 1]


def _randn(rng, shape, scale=1.0, dtype=np.float32):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _dev(*arrays):
    return [cp.asarray(a) for a in arrays]


def _host(*arrays):
    return [cp.asnumpy(a) for a in arrays]


# ---- optimizer updates ---------------------------------------------------------------------

# One update table: an empty tensor among them, and more blocks in all than the grid's cap.
TABLE_SIZES = [1, 0, 33, 1000, 65535 * 256 + 1, 7]


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 1e-2), (0.9, True, 5e-4)])
def test_sgd_update_bit_identical(momentum, nesterov, wd):
    """Two steps over tensors of every size in one launch (the buffers' first step, then a later
    one), with a rate and decay per tensor, give the oracle's weights and buffers exactly."""
    rng = np.random.default_rng(0)
    ws, bufs = [_randn(rng, n) for n in TABLE_SIZES], [np.empty(n, np.float32) for n in TABLE_SIZES]
    ws_d, bufs_d = _dev(*ws), _dev(*bufs)
    lrs, wds = [0.1 / (k + 1) for k in range(len(ws))], [wd * (k % 2) for k in range(len(ws))]
    for first in (True, False):
        gs = [_randn(rng, n) for n in TABLE_SIZES]
        kernels.sgd_update(ws_d, _dev(*gs), lrs, wds, momentum, nesterov, bufs_d, [first] * len(ws))
        kernels.sgd_update_ref(ws, gs, lrs, wds, momentum, nesterov, bufs, [first] * len(ws))
    for dev, host in zip(ws_d + (bufs_d if momentum else []), ws + (bufs if momentum else [])):
        np.testing.assert_array_equal(cp.asnumpy(dev), host)


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adamw_update_bit_identical(wd):
    """Three steps over tensors of every size in one launch give the oracle's w, m and v exactly,
    including bias correction at t = 1."""
    rng = np.random.default_rng(1)
    ws = [_randn(rng, n) for n in TABLE_SIZES]
    ms, vs = [np.zeros(n, np.float32) for n in TABLE_SIZES], [np.zeros(n, np.float32) for n in TABLE_SIZES]
    ws_d, ms_d, vs_d = _dev(*ws), _dev(*ms), _dev(*vs)
    wds = [wd * (k % 2) for k in range(len(ws))]
    for t, lr in enumerate((1e-3, 2e-3, 5e-4), start=1):
        gs = [_randn(rng, n, 0.1) for n in TABLE_SIZES]
        lrs = [lr * (k + 1) for k in range(len(ws))]
        kernels.adamw_update(ws_d, _dev(*gs), ms_d, vs_d, lrs, t, wds, (0.9, 0.999), 1e-8)
        kernels.adamw_update_ref(ws, gs, ms, vs, lrs, t, wds, (0.9, 0.999), 1e-8)
    for dev, host in zip(ws_d + ms_d + vs_d, ws + ms + vs):
        np.testing.assert_array_equal(cp.asnumpy(dev), host)


def test_halted_updates_change_nothing():
    """A non-zero device halt flag leaves w, the momentum buffer and the moments untouched; a zero one
    changes w as an update without the flag does."""
    rng = np.random.default_rng(9)
    w, g = _randn(rng, 5000), _randn(rng, 5000)
    w_d, g_d, buf_d, m_d, v_d = _dev(w, g, w, np.zeros_like(w), np.zeros_like(w))
    halted, clear = cp.ones(1, cp.float32), cp.zeros(1, cp.float32)
    kernels.sgd_update([w_d], [g_d], [0.1], [0.01], 0.9, False, [buf_d], [False], halted)
    kernels.adamw_update([w_d], [g_d], [m_d], [v_d], [1e-3], 1, [0.01], halt=halted)
    for dev, host in ((w_d, w), (buf_d, w), (m_d, np.zeros_like(w)), (v_d, np.zeros_like(w))):
        np.testing.assert_array_equal(cp.asnumpy(dev), host)
    kernels.sgd_update([w_d], [g_d], [0.1], [0.0], halt=clear)
    kernels.sgd_update_ref([w], [g], [0.1], [0.0])
    np.testing.assert_array_equal(cp.asnumpy(w_d), w)


def test_any_nonfinite_parity():
    """The flag is set exactly where one of many tensors (more than one grid row's worth of elements,
    some empty) holds a NaN or an Inf, as the oracle's is."""
    rng = np.random.default_rng(10)
    clean = [_randn(rng, n, 1e30) for n in (1, 300_000, 0, 33, 5)]
    for position in (None, (0, 0), (1, 299_999), (3, 7), (4, 4)):
        tensors = [a.copy() for a in clean]
        if position is not None:
            tensors[position[0]][position[1]] = np.inf if position[0] % 2 else np.nan
        flag, ref = cp.zeros(1, cp.float32), np.zeros(1, np.float32)
        kernels.any_nonfinite([cp.asarray(a) for a in tensors], flag)
        kernels.any_nonfinite_ref(tensors, ref)
        assert float(flag[0]) == ref[0] == (position is not None), position


def test_record_refusal_parity():
    """Over clean, refused, clean and refused updates the kernel leaves the oracle's halt flag and
    refusal step: raised at the first refusal, which alone is recorded."""
    halt, at = cp.zeros(1, cp.float32), cp.zeros(1, cp.int64)
    halt_ref, at_ref = np.zeros(1, np.float32), np.zeros(1, np.int64)
    for step, refused in enumerate((0.0, 1.0, 0.0, 1.0), start=1):
        kernels.record_refusal(cp.asarray([refused], dtype=cp.float32), halt, at, step)
        kernels.record_refusal_ref(np.array([refused], np.float32), halt_ref, at_ref, step)
        assert (float(halt[0]), int(at[0])) == (float(halt_ref[0]), int(at_ref[0])), step
    assert (float(halt[0]), int(at[0])) == (1.0, 2)


@pytest.mark.parametrize("n", FLAT_SIZES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_dcasgd_update_bit_identical(n, adaptive):
    """The server update gives the oracle's w, backup row (= the new w) and mean square exactly."""
    rng = np.random.default_rng(2)
    w, backup, g = _randn(rng, n), _randn(rng, n), _randn(rng, n)
    ms = np.abs(_randn(rng, n)) if adaptive else None
    w_d, backup_d, g_d = _dev(w, backup, g)
    ms_d = cp.asarray(ms) if adaptive else None
    kernels.dcasgd_update(w_d, backup_d, g_d, 0.05, 2.0, ms_d, 0.95, 1e-7)
    kernels.dcasgd_update_ref(w, backup, g, 0.05, 2.0, ms, 0.95, 1e-7)
    np.testing.assert_array_equal(cp.asnumpy(w_d), w)
    np.testing.assert_array_equal(cp.asnumpy(backup_d), w)
    if adaptive:
        np.testing.assert_array_equal(cp.asnumpy(ms_d), ms)


def test_dcasgd_update_on_a_backup_row():
    """A row of the server's (workers, n) backup matrix is updated in place, the others untouched."""
    rng = np.random.default_rng(3)
    w, g = _randn(rng, 64), _randn(rng, 64)
    backup = np.stack([_randn(rng, 64) for _ in range(3)])
    backup_d = cp.asarray(backup)
    w_d = cp.asarray(w)
    kernels.dcasgd_update(w_d, backup_d[1], cp.asarray(g), 0.1, 0.04)
    kernels.dcasgd_update_ref(w, backup[1], g, 0.1, 0.04)
    np.testing.assert_array_equal(cp.asnumpy(backup_d), backup)


def test_easgd_kernels_bit_identical():
    """The elastic step (centre and reply) and both synchronous halves equal the oracles exactly."""
    rng = np.random.default_rng(4)
    n = 3001
    center, x, g, x_sum = (_randn(rng, n) for _ in range(4))
    center_d, x_d, g_d, x_sum_d = _dev(center, x, g, x_sum)
    e_d = kernels.easgd_elastic(center_d, x_d, 0.225)
    e = kernels.easgd_elastic_ref(center, x, 0.225)
    np.testing.assert_array_equal(cp.asnumpy(e_d), e)
    np.testing.assert_array_equal(cp.asnumpy(center_d), center)
    kernels.easgd_sync_worker(x_d, center_d, g_d, 0.05, 3.6)
    kernels.easgd_sync_worker_ref(x, center, g, 0.05, 3.6)
    np.testing.assert_array_equal(cp.asnumpy(x_d), x)
    kernels.easgd_sync_center(center_d, x_sum_d, 4, 0.05, 3.6)
    kernels.easgd_sync_center_ref(center, x_sum, 4, 0.05, 3.6)
    np.testing.assert_array_equal(cp.asnumpy(center_d), center)


def test_updates_refuse_strided_in_place_arrays():
    """A non-contiguous array to be written in place is an error, not a silently updated copy."""
    w = cp.zeros(20, dtype=cp.float32)[::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.sgd_update([w], [cp.zeros(10, dtype=cp.float32)], [0.1], [0.0])


def test_float64_updates_take_the_reference_path():
    """CuPy float64 runs the oracle on the device, keeps float64 and matches NumPy to 1e-12."""
    rng = np.random.default_rng(5)
    w, m, v, g = (rng.standard_normal(100) for _ in range(4))
    v = np.abs(v)
    w_d, m_d, v_d, g_d = _dev(w, m, v, g)
    kernels.adamw_update([w_d], [g_d], [m_d], [v_d], [1e-3], 3, [0.01])
    kernels.adamw_update_ref([w], [g], [m], [v], [1e-3], 3, [0.01])
    assert w_d.dtype == cp.float64
    np.testing.assert_allclose(cp.asnumpy(w_d), w, rtol=1e-12)


# ---- LayerNorm and BatchNorm ---------------------------------------------------------------

# Rows narrower than a warp, wider than a block (512 threads), and more rows than grid.x's cap.
LAYERNORM_SHAPES = [(1, 1), (5, 10), (64, 768), (3, 4099), (2, 7, 33), (70000, 3)]


@pytest.mark.parametrize("shape", LAYERNORM_SHAPES)
def test_layernorm_parity(shape):
    """y, xhat, rstd, dx, dgamma and dbeta are as accurate as NumPy float32's, with the layer's shapes."""
    rng = np.random.default_rng(6)
    n = shape[-1]
    x = _randn(rng, shape, 3.0) + np.float32(2.0)   # a mean far from 0 tests the two-pass variance
    gamma, beta, dy = _randn(rng, n), _randn(rng, n), _randn(rng, shape)
    out = kernels.layernorm_forward(*_dev(x, gamma, beta))
    ref32 = kernels.layernorm_forward_ref(x, gamma, beta)
    ref64 = kernels.layernorm_forward_ref(*(a.astype(np.float64) for a in (x, gamma, beta)))
    for name, k, r32, r64 in zip(("y", "xhat", "rstd"), _host(*out), ref32, ref64):
        assert_as_accurate(k, r32, r64, name)
    grads = kernels.layernorm_backward(*_dev(dy), out[1], out[2], cp.asarray(gamma))
    gref32 = kernels.layernorm_backward_ref(dy, ref32[1], ref32[2], gamma)
    gref64 = kernels.layernorm_backward_ref(dy.astype(np.float64), ref64[1], ref64[2], gamma.astype(np.float64))
    dy64 = dy.reshape(-1, n).astype(np.float64)
    sums = (0.0, np.abs(dy64 * ref64[1].reshape(-1, n)).sum(axis=0), np.abs(dy64).sum(axis=0))
    for name, k, r32, r64, abs_sum in zip(("dx", "dgamma", "dbeta"), _host(*grads), gref32, gref64, sums):
        assert_as_accurate(k, r32, r64, name, abs_sum)


# (N, C) and (N, C, H, W); one channel of 262144 values; more channels than warps in a block.
BATCHNORM_LAYOUTS = [("nchw", "nchw"), ("batch_inner", "batch_inner"), ("batch_inner", "nchw"), ("nhwc", "nhwc")]
BATCHNORM_SHAPES = [(1, 1), (3, 5), (256, 10), (4, 3, 5, 7), (64, 1, 64, 64), (8, 100, 4, 4)]


@pytest.mark.parametrize("x_layout,dy_layout", BATCHNORM_LAYOUTS)
@pytest.mark.parametrize("shape", BATCHNORM_SHAPES)
def test_batchnorm_parity(shape, x_layout, dy_layout):
    """Training-mode forward (y, xhat, rstd, running statistics) and backward are as accurate
    as NumPy float32's, with x and dy stored NCHW, batch-innermost or NHWC; y, xhat and dx keep
    x's layout where the kernels walk it (NCHW, batch-innermost)."""
    rng = np.random.default_rng(7)
    c = shape[1]
    x = _randn(rng, shape, 2.0) - np.float32(1.0)
    gamma, beta, dy = _randn(rng, c), _randn(rng, c), _randn(rng, shape)
    rm, rv = _randn(rng, c), np.abs(_randn(rng, c))
    rm_d, rv_d = _dev(rm, rv)
    x_d = stored(cp.asarray(x), x_layout)
    out = kernels.batchnorm_forward(x_d, *_dev(gamma, beta), rm_d, rv_d, 1e-5, 0.1)
    assert out[0].strides == out[1].strides == stored(x_d, expected_layout(x_layout)).strides
    rm32, rv32, rm64, rv64 = rm.copy(), rv.copy(), rm.astype(np.float64), rv.astype(np.float64)
    ref32 = kernels.batchnorm_forward_ref(x, gamma, beta, rm32, rv32, 1e-5, 0.1)
    ref64 = kernels.batchnorm_forward_ref(*(a.astype(np.float64) for a in (x, gamma, beta)), rm64, rv64, 1e-5, 0.1)
    for name, k, r32, r64 in zip(("y", "xhat", "rstd", "running_mean", "running_var"),
                                 _host(*out, rm_d, rv_d), (*ref32, rm32, rv32), (*ref64, rm64, rv64)):
        assert_as_accurate(k, r32, r64, name)
    grads = kernels.batchnorm_backward(stored(cp.asarray(dy), dy_layout), out[1], out[2], cp.asarray(gamma))
    assert grads[0].strides == out[1].strides
    gref32 = kernels.batchnorm_backward_ref(dy, ref32[1], ref32[2], gamma)
    gref64 = kernels.batchnorm_backward_ref(dy.astype(np.float64), ref64[1], ref64[2], gamma.astype(np.float64))
    axes = (0,) + tuple(range(2, len(shape)))
    dy64 = dy.astype(np.float64)
    sums = (0.0, np.abs(dy64 * ref64[1]).sum(axis=axes), np.abs(dy64).sum(axis=axes))
    for name, k, r32, r64, abs_sum in zip(("dx", "dgamma", "dbeta"), _host(*grads), gref32, gref64, sums):
        assert_as_accurate(k, r32, r64, name, abs_sum)


def test_float64_norms_take_the_reference_path():
    """CuPy float64 LayerNorm runs the oracle on the device and matches NumPy to 1e-12."""
    rng = np.random.default_rng(8)
    x, gamma, beta = rng.standard_normal((6, 20)), rng.standard_normal(20), rng.standard_normal(20)
    out = kernels.layernorm_forward(*_dev(x, gamma, beta))
    assert out[0].dtype == cp.float64
    for k, r in zip(_host(*out), kernels.layernorm_forward_ref(x, gamma, beta)):
        np.testing.assert_allclose(k, r, rtol=1e-12, atol=1e-14)


# ---- im2col / col2im -----------------------------------------------------------------------

# N, C, H, W, k, stride, pad: the cnn's and resnet's shapes, strides and paddings above 1,
# a 1x1 shortcut, a kernel as large as the padded image, and over 65535 x 256 patch entries.
CONV_CASES = [(2, 3, 7, 6, 3, 1, 1), (2, 2, 9, 9, 3, 2, 1), (4, 16, 28, 28, 3, 1, 1), (8, 16, 14, 14, 1, 2, 0),
              (1, 2, 5, 5, 5, 1, 2), (2, 1, 8, 7, 3, 3, 2), (128, 32, 28, 28, 3, 1, 1)]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col_col2im_bit_identical(case, batched):
    """im2col copies exactly the oracle's entries; col2im sums exactly as the oracle, in both layouts."""
    n, c, h, w, k, s, pad = case
    rng = np.random.default_rng(9)
    x = _randn(rng, (n, c, h, w))
    cols = kernels.im2col(cp.asarray(x), k, s, pad, batched)
    cols_ref = kernels.im2col_ref(x, k, s, pad, batched)
    np.testing.assert_array_equal(cp.asnumpy(cols), cols_ref)
    dcols = _randn(rng, cols_ref.shape)
    dx = kernels.col2im(cp.asarray(dcols), x.shape, k, s, pad, batched)
    np.testing.assert_array_equal(cp.asnumpy(dx), kernels.col2im_ref(dcols, x.shape, k, s, pad, batched))


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_layout_im2col_col2im_bit_identical(case):
    """With x batch-innermost (conv's layout, read through its strides) and col2im writing
    batch-innermost, hpdl.layers.conv's im2col/col2im on the GPU equal their NumPy path."""
    from hpdl.layers import conv
    n, c, h, w, k, s, pad = case
    rng = np.random.default_rng(12)
    x = conv.nchw(np.ascontiguousarray(conv.batch_inner(_randn(rng, (n, c, h, w)))))
    x_d = conv.nchw(cp.asarray(conv.batch_inner(x)))
    cols = conv.im2col(x_d, k, s, pad)
    np.testing.assert_array_equal(cp.asnumpy(cols), conv.im2col(x, k, s, pad))
    dcols = _randn(rng, cols.shape)
    dx = conv.col2im(cp.asarray(dcols), x.shape, k, s, pad)
    assert conv.batch_inner(dx).flags.c_contiguous
    np.testing.assert_array_equal(cp.asnumpy(dx), conv.col2im(dcols, x.shape, k, s, pad))


# ---- sums of squares -----------------------------------------------------------------------

@pytest.mark.parametrize("k, shape", [(2, (128, 32, 28, 28)), (2, (7, 3, 5, 9)), (3, (4, 2, 10, 7))])
def test_maxpool_bit_identical(k, shape):
    """y, the winning offsets and dx equal the oracles exactly, with ties, a NaN window, a NaN in dy and
    ragged edges, on batch-innermost input as conv hands it on."""
    rng = np.random.default_rng(13)
    x = np.round(_randn(rng, shape), 0)
    x[0, 0, 0, 0] = np.nan
    x_d = stored(cp.asarray(x), "batch_inner")
    y_d, win_d = kernels.maxpool_forward(x_d, k)
    y, win = kernels.maxpool_forward_ref(x, k)
    dy = _randn(rng, y.shape)
    dy[0, 0, 0, 1] = np.nan
    dx_d = kernels.maxpool_backward(cp.asarray(dy), win_d, x.shape, k)
    with np.errstate(invalid="ignore"):   # NaN * 0
        dx = kernels.maxpool_backward_ref(dy, win, x.shape, k)
    for dev, host in ((y_d, y), (win_d, win), (dx_d, dx)):
        np.testing.assert_array_equal(cp.asnumpy(dev), host)


def test_sum_squares_parity():
    """One call over tensors of 0, 1, 33 and 3 million elements, and a 2-D one, gives each
    tensor's sum of squares as accurately as NumPy float32's dot product."""
    rng = np.random.default_rng(10)
    arrays = [np.zeros(0, np.float32), _randn(rng, 1), _randn(rng, 33), _randn(rng, 3_000_000), _randn(rng, (70, 300))]
    out = kernels.sum_squares(_dev(*arrays))
    assert isinstance(out, cp.ndarray) and out.shape == (5,) and out.dtype == cp.float32
    ref64 = kernels.sum_squares_ref([a.astype(np.float64) for a in arrays])
    assert_as_accurate(cp.asnumpy(out), kernels.sum_squares_ref(arrays), ref64, "sum of squares", ref64)


def test_sum_squares_of_strided_views():
    """Non-contiguous views are summed as their contiguous copies would be."""
    rng = np.random.default_rng(11)
    a = _randn(rng, (40, 50))
    out = kernels.sum_squares([cp.asarray(a)[:, ::3], cp.asarray(a).T])
    ref64 = kernels.sum_squares_ref([a[:, ::3].astype(np.float64), a.T.astype(np.float64)])
    assert_as_accurate(cp.asnumpy(out), kernels.sum_squares_ref([a[:, ::3], a.T]), ref64, "views", ref64)

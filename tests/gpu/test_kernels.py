"""The fused CUDA kernels match hpdl.kernels' NumPy references in float32."""
from __future__ import annotations

import numpy as np
import pytest

cp = pytest.importorskip("cupy")

from hpdl import kernels  # noqa: E402  (after the skip: nothing to test without cupy)

pytestmark = pytest.mark.gpu

# B = 1, N = 1, N not a multiple of 32, N = 1000, rows wider than any block (512 / 1024
# threads), and B beyond the 65535 grid.y limit so the row-striding loop runs.
ELEMENTWISE_SHAPES = [(1, 1), (1, 33), (7, 1000), (3, 2049), (65, 257), (70000, 3)]
SOFTMAX_SHAPES = [(1, 1), (1, 10), (5, 33), (64, 1000), (3, 5000), (2, 100003)]


def _randn(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES)
def test_bias_relu_forward_parity(shape):
    """The kernel gives bit-identical y to the reference (one float add and a mask multiply per element)."""
    rng = np.random.default_rng(0)
    x, b = _randn(rng, shape), _randn(rng, shape[1:])
    y = kernels.bias_relu_forward(cp.asarray(x), cp.asarray(b))
    assert isinstance(y, cp.ndarray) and y.dtype == cp.float32
    np.testing.assert_array_equal(cp.asnumpy(y), kernels.bias_relu_forward_ref(x, b))


@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES)
def test_bias_relu_backward_parity(shape):
    """dx is bit-identical to the reference, zero exactly where y is zero."""
    rng = np.random.default_rng(1)
    y = np.maximum(_randn(rng, shape), 0)
    dy = _randn(rng, shape)
    dx = kernels.bias_relu_backward(cp.asarray(y), cp.asarray(dy))
    np.testing.assert_array_equal(cp.asnumpy(dx), kernels.bias_relu_backward_ref(y, dy))


def test_bias_relu_non_finite_values_and_batch_innermost_layout():
    """NaN and -Inf give NaN in the forward kernel, and dy's NaN and Inf stay non-finite where the
    mask is 0, as in the oracles; backward and relu_forward on NCHW views of (C, H, W, N) memory (a
    convolution's output) keep that layout and equal the oracles, NaN and Inf included."""
    rng = np.random.default_rng(11)
    x, b, dy = _randn(rng, (4, 40)), _randn(rng, (40,)), _randn(rng, (4, 40))
    x[0, :4], dy[1, :4] = [np.nan, -np.inf, np.inf, 0.0], [np.nan, np.inf, -np.inf, 0.0]
    y = kernels.bias_relu_forward(cp.asarray(x), cp.asarray(b))
    with np.errstate(invalid="ignore"):   # inf * 0 in the oracles
        np.testing.assert_array_equal(cp.asnumpy(y), kernels.bias_relu_forward_ref(x, b))
        expected = kernels.bias_relu_backward_ref(cp.asnumpy(y), dy)
    np.testing.assert_array_equal(cp.asnumpy(kernels.bias_relu_backward(y, cp.asarray(dy))), expected)
    y4, dy4 = (cp.asarray(_randn(rng, (3, 4, 5, 64))).transpose(3, 0, 1, 2) for _ in range(2))
    dx4 = kernels.bias_relu_backward(y4, dy4)
    assert dx4.strides == dy4.strides and not dy4.flags.c_contiguous
    np.testing.assert_array_equal(cp.asnumpy(dx4), kernels.bias_relu_backward_ref(cp.asnumpy(y4), cp.asnumpy(dy4)))
    x4 = cp.asarray(_randn(rng, (3, 4, 5, 64))).transpose(3, 0, 1, 2)
    x4[0, 0, 0, :3] = cp.asarray([np.nan, -np.inf, np.inf], dtype=cp.float32)
    y4 = kernels.relu_forward(x4)
    assert y4.strides == x4.strides
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(cp.asnumpy(y4), cp.asnumpy(x4) * (cp.asnumpy(x4) > 0))


@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES)
def test_bias_gelu_forward_parity(shape):
    """y matches the reference to float32 rounding (tanhf vs numpy's tanh); u = x + b exactly."""
    rng = np.random.default_rng(2)
    x, b = _randn(rng, shape, 3.0), _randn(rng, shape[1:])
    y, u = kernels.bias_gelu_forward(cp.asarray(x), cp.asarray(b))
    y_ref, u_ref = kernels.bias_gelu_forward_ref(x, b)
    np.testing.assert_array_equal(cp.asnumpy(u), u_ref)
    np.testing.assert_allclose(cp.asnumpy(y), y_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES)
def test_bias_gelu_backward_parity(shape):
    """dx matches the reference to float32 rounding."""
    rng = np.random.default_rng(3)
    u, dy = _randn(rng, shape, 3.0), _randn(rng, shape)
    dx = kernels.bias_gelu_backward(cp.asarray(u), cp.asarray(dy))
    # 1 - t^2 cancels for |u| of a few units; there the float32 reference itself is off
    # float64 by up to ~4e-6 absolute, so two float32 evaluations may differ by twice that.
    np.testing.assert_allclose(cp.asnumpy(dx), kernels.bias_gelu_backward_ref(u, dy),
                               rtol=1e-5, atol=2e-5)


def test_bias_gelu_backward_keeps_a_batch_innermost_layout():
    """On NCHW views of (C, H, W, N) memory (GELU after a convolution) dx keeps that layout and
    matches the reference as closely as on C-ordered arrays."""
    rng = np.random.default_rng(12)
    u4, dy4 = (cp.asarray(_randn(rng, (3, 4, 5, 64), 3.0)).transpose(3, 0, 1, 2) for _ in range(2))
    dx4 = kernels.bias_gelu_backward(u4, dy4)
    assert dx4.strides == dy4.strides and not dy4.flags.c_contiguous
    np.testing.assert_allclose(cp.asnumpy(dx4), kernels.bias_gelu_backward_ref(cp.asnumpy(u4), cp.asnumpy(dy4)),
                               rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("shape", SOFTMAX_SHAPES)
def test_softmax_xent_parity(shape):
    """Mean loss and dlogits match the reference, for rows narrower and wider than a block."""
    rng = np.random.default_rng(4)
    B, C = shape
    logits = _randn(rng, shape, 4.0)
    labels = rng.integers(0, C, B)
    loss, dlogits = kernels.softmax_xent(cp.asarray(logits), cp.asarray(labels), 0.5)
    loss_ref, dlogits_ref = kernels.softmax_xent_ref(logits, labels, 0.5)
    assert isinstance(loss, cp.ndarray) and loss.shape == ()  # stays on the device
    np.testing.assert_allclose(float(loss), loss_ref, rtol=1e-5)
    # dlogits entries are O(1 / B); atol covers softmax values near zero.
    np.testing.assert_allclose(cp.asnumpy(dlogits), dlogits_ref, rtol=1e-5, atol=1e-6 / B)


def test_softmax_xent_large_logits_stay_finite():
    """Logits of 1e4 (exp overflows float32) give finite results matching the reference."""
    rng = np.random.default_rng(5)
    logits = _randn(rng, (8, 300)) + np.float32(1e4)
    labels = rng.integers(0, 300, 8)
    loss, dlogits = kernels.softmax_xent(cp.asarray(logits), cp.asarray(labels))
    loss_ref, dlogits_ref = kernels.softmax_xent_ref(logits, labels)
    assert np.isfinite(float(loss)) and bool(cp.isfinite(dlogits).all())
    np.testing.assert_allclose(float(loss), loss_ref, rtol=1e-5)
    np.testing.assert_allclose(cp.asnumpy(dlogits), dlogits_ref, rtol=1e-5, atol=1e-7)


def test_softmax_xent_bad_label_poisons_its_row_only():
    """A label outside [0, C) makes the loss NaN and only that row of dlogits NaN."""
    logits = cp.zeros((3, 5), dtype=cp.float32)
    loss, dlogits = kernels.softmax_xent(logits, cp.asarray([0, 5, 2]))
    assert np.isnan(float(loss))
    nan_rows = cp.asnumpy(cp.isnan(dlogits).any(axis=1))
    np.testing.assert_array_equal(nan_rows, [False, True, False])


def test_in_place_and_strided_inputs():
    """out=x computes bias+ReLU in place; non-contiguous inputs give the same result as copies."""
    rng = np.random.default_rng(6)
    x, b = _randn(rng, (9, 130)), _randn(rng, 65)
    expected = kernels.bias_relu_forward_ref(x[:, ::2], b)
    strided = cp.asarray(x)[:, ::2]
    np.testing.assert_array_equal(cp.asnumpy(kernels.bias_relu_forward(strided, cp.asarray(b))),
                                  expected)
    x_dev = cp.ascontiguousarray(strided)
    assert kernels.bias_relu_forward(x_dev, cp.asarray(b), out=x_dev) is x_dev
    np.testing.assert_array_equal(cp.asnumpy(x_dev), expected)


def test_float64_takes_the_reference_path():
    """CuPy float64 (gradient checks) is computed by the xp reference, keeping float64."""
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((4, 6))
    labels = rng.integers(0, 6, 4)
    loss, dlogits = kernels.softmax_xent(cp.asarray(logits), cp.asarray(labels))
    loss_ref, dlogits_ref = kernels.softmax_xent_ref(logits, labels)
    assert dlogits.dtype == cp.float64
    np.testing.assert_allclose(cp.asnumpy(dlogits), dlogits_ref, rtol=1e-12)
    np.testing.assert_allclose(float(loss), loss_ref, rtol=1e-12)


def test_load_is_cached():
    """Loading a kernel file twice returns the same compiled module."""
    assert kernels.load("bias_act") is kernels.load("bias_act")

"""Layers and loss: gradients against finite differences, and each layer's own contract."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gradcheck import assert_gradient_close, check_layer, numerical_gradient
from layouts import stored
from hpdl import kernels
from hpdl.layers import (EVAL, GELU, TRAIN, BatchNorm, Conv2d, Dropout, Flatten, GlobalAvgPool,
                         LayerNorm, Linear, MaxPool2d, Mode, ReLU, Residual, accuracy, col2im,
                         im2col, softmax_cross_entropy_backward, softmax_cross_entropy_forward)
from hpdl.models import basic_block

KEY = Mode(train=True, key=(7, 3))


# (layer, per-batch input shape, mode): every layer, in the configurations the models use
# and the awkward ones (stride with padding, overlapping and ragged pooling windows).
CASES = {
    "linear": (Linear(5, 4), (3, 5), TRAIN),
    "relu": (ReLU(), (3, 2, 4, 4), TRAIN),
    "gelu": (GELU(), (3, 7), TRAIN),
    "conv": (Conv2d(3, 4, 3), (2, 3, 5, 5), TRAIN),
    "conv-stride2-pad1": (Conv2d(3, 4, 3, stride=2, pad=1), (2, 3, 6, 5), TRAIN),
    "conv-1x1-stride2": (Conv2d(3, 2, 1, stride=2), (2, 3, 5, 5), TRAIN),
    "conv-winograd-pad1": (Conv2d(3, 4, 3, pad=1, winograd=True), (2, 3, 4, 5), TRAIN),
    "conv-winograd-odd": (Conv2d(3, 2, 3, winograd=True), (3, 3, 6, 5), TRAIN),
    "conv-no-bias": (Conv2d(3, 4, 3, stride=2, pad=1, bias=False), (2, 3, 6, 5), TRAIN),
    "conv-winograd-no-bias": (Conv2d(3, 4, 3, pad=1, winograd=True, bias=False), (2, 3, 4, 5), TRAIN),
    "maxpool": (MaxPool2d(2), (2, 3, 4, 6), TRAIN),
    "maxpool-ragged": (MaxPool2d(2), (2, 2, 5, 5), TRAIN),
    "maxpool-overlapping": (MaxPool2d(3, stride=2), (2, 2, 7, 5), TRAIN),
    "global-avg-pool": (GlobalAvgPool(), (2, 3, 3, 4), TRAIN),
    "dropout": (Dropout(0.4), (4, 6), KEY),
    "dropout-eval": (Dropout(0.4), (4, 6), EVAL),
    "layernorm": (LayerNorm(6), (3, 2, 6), TRAIN),
    "batchnorm-2d": (BatchNorm(4), (6, 4), TRAIN),
    "batchnorm-4d": (BatchNorm(3), (4, 3, 3, 2), TRAIN),
    "batchnorm-eval": (BatchNorm(3), (4, 3, 3, 2), EVAL),
    "flatten": (Flatten(), (2, 3, 2, 2), TRAIN),
    "residual-identity": (basic_block(3, 3, 1), (3, 3, 4, 4), TRAIN),
    "residual-projection": (basic_block(3, 4, 2), (3, 3, 6, 6), TRAIN),
    "residual-no-post": (Residual([Linear(4, 4), GELU(), LayerNorm(4)], post=None), (3, 4), TRAIN),
    "residual-dropout": (Residual([Linear(4, 4), Dropout(0.5)], [Dropout(0.5)]), (5, 4), KEY),
}


@pytest.mark.parametrize("name", CASES)
def test_backward_matches_finite_differences(name):
    """dx and every parameter gradient equal central differences of sum(y * dy) in float64."""
    layer, shape, mode = CASES[name]
    x = np.random.default_rng(1).standard_normal(shape)
    params = None
    if isinstance(layer, BatchNorm) and not mode.train:
        rng = np.random.default_rng(2)   # running statistics away from their (0, 1) start
        params = {"gamma": rng.standard_normal(3), "beta": rng.standard_normal(3),
                  "running_mean": rng.standard_normal(3), "running_var": rng.uniform(0.5, 2.0, 3)}
    check_layer(layer, x, mode, params)


@pytest.mark.parametrize("name", CASES)
def test_float32_stays_float32(name):
    """float32 input and parameters give float32 output, input gradient and parameter gradients."""
    layer, shape, mode = CASES[name]
    params = layer.init(np.random.default_rng(0), np, np.float32)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    y, cache = layer.forward(params, x, mode)
    dx, grads = layer.backward(params, cache, np.ones_like(y))
    assert y.dtype == np.float32 and dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values()), {k: g.dtype for k, g in grads.items()}
    assert all(p.dtype == np.float32 for p in params.values())   # buffers updated in float32 too


@pytest.mark.parametrize("name", CASES)
def test_out_shape_matches_forward(name):
    """out_shape(per-sample input shape) is the per-sample shape forward actually produces."""
    layer, shape, mode = CASES[name]
    params = layer.init(np.random.default_rng(0), np, np.float32)
    y, _ = layer.forward(params, np.ones(shape, dtype=np.float32), mode)
    assert y.shape == (shape[0],) + tuple(layer.out_shape(shape[1:]))


def naive_conv(x, W, b, stride, pad):
    n, _, h, w = x.shape
    c_out, _, k, _ = W.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    y = np.zeros((n, c_out, ho, wo))
    for i in range(n):
        for o in range(c_out):
            for a in range(ho):
                for c in range(wo):
                    patch = xp[i, :, a * stride:a * stride + k, c * stride:c * stride + k]
                    y[i, o, a, c] = (patch * W[o]).sum() + b[o]
    return y


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 0), (3, 2, 1), (2, 2, 0), (1, 1, 0)])
def test_conv_forward_matches_direct_loop(k, stride, pad):
    """Conv2d's im2col product equals the textbook six-fold loop, bias included."""
    rng = np.random.default_rng(0)
    layer = Conv2d(2, 3, k, stride=stride, pad=pad)
    params = {"W": rng.standard_normal((3, 2, k, k)), "b": rng.standard_normal(3)}
    x = rng.standard_normal((2, 2, 5, 6))
    y, _ = layer.forward(params, x)
    expected = naive_conv(x, params["W"], params["b"], stride, pad)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("h,w,pad", [(6, 6, 1), (5, 7, 1), (7, 4, 0), (3, 3, 0), (4, 5, 2)])
def test_winograd_conv_equals_the_im2col_product(h, w, pad):
    """The Winograd F(2x2, 3x3) path's output, input gradient, weight and bias gradients (with and
    without dx) equal the im2col product's in float64 to rounding, odd output sizes and any padding
    included."""
    rng = np.random.default_rng(3)
    layer, reference = Conv2d(4, 5, 3, pad=pad, winograd=True), Conv2d(4, 5, 3, pad=pad, winograd=False)
    params = {"W": rng.standard_normal((5, 4, 3, 3)), "b": rng.standard_normal(5)}
    x = rng.standard_normal((3, 4, h, w))
    y, cache = layer.forward(params, x)
    y_ref, cache_ref = reference.forward(params, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, naive_conv(x, params["W"], params["b"], 1, pad), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx, grads = layer.backward(params, cache, dy)
    dx_ref, grads_ref = reference.backward(params, cache_ref, dy)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-12)
    for name in ("W", "b"):
        np.testing.assert_allclose(grads[name], grads_ref[name], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.param_grads(params, cache, dy)[name], grads_ref[name], rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("c_in, c_out, k, stride, winograd", [
    (32, 64, 3, 1, True), (32, 32, 3, 1, True), (16, 32, 3, 1, True), (16, 16, 3, 1, False), (1, 32, 3, 1, False),
    (64, 64, 3, 2, False), (64, 64, 1, 1, False)])
def test_wide_3x3_stride1_convolutions_take_the_winograd_path(c_in, c_out, k, stride, winograd, monkeypatch):
    """The automatic choice: 3 x 3 at stride 1 with enough channels, off the GPU kernels only (there
    im2col's one kernel and one product beat Winograd's many launches); forcing it elsewhere is an error."""
    x = np.zeros((1, c_in, 4, 4), np.float32)
    assert Conv2d(c_in, c_out, k, stride=stride).takes_winograd(x) == winograd
    assert Conv2d(c_in, c_out, k, stride=stride, winograd=False).takes_winograd(x) is False
    monkeypatch.setattr(kernels, "on_kernel_path", lambda *arrays: True)
    assert Conv2d(c_in, c_out, k, stride=stride).takes_winograd(x) is False
    if winograd:
        assert Conv2d(c_in, c_out, k, stride=stride, winograd=True).takes_winograd(x) is True
    if k != 3 or stride != 1:
        with pytest.raises(ValueError, match="3 x 3 kernel at stride 1"):
            Conv2d(c_in, c_out, k, stride=stride, winograd=True)


def test_conv_and_pool_outputs_are_stored_batch_innermost():
    """Conv2d (both paths) and MaxPool2d hand on (N, C, H, W) views of (C, H, W, N) memory, and give
    the same results for an input stored NCHW as for the same values stored batch-innermost."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 8, 6, 6))
    x_inner = stored(x, "batch_inner")
    for layer in (Conv2d(8, 3, 3, pad=1, winograd=True), Conv2d(8, 3, 3, pad=1), Conv2d(8, 3, 3, stride=2),
                  MaxPool2d(2), MaxPool2d(3, stride=2)):
        params = layer.init(rng, np, np.float64)
        y, cache = layer.forward(params, x)
        assert y.transpose(1, 2, 3, 0).flags.c_contiguous, layer
        y_inner, cache_inner = layer.forward(params, x_inner)
        np.testing.assert_array_equal(y, y_inner)
        dy = rng.standard_normal(y.shape)
        dx, _ = layer.backward(params, cache, dy)
        dx_inner, _ = layer.backward(params, cache_inner, stored(dy, "batch_inner"))
        np.testing.assert_array_equal(dx, dx_inner)


def test_gradients_come_back_stored_as_the_input_is():
    """Given batch-innermost input (a Linear: conv's output flattened, F order), Linear, GlobalAvgPool
    and a residual block hand dx back in that layout, with the values an NCHW input gets: the
    layer below then needs no transposing copy."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 3, 4, 4))
    x_inner = stored(x, "batch_inner")
    for layer, a, a_inner in ((Linear(48, 5), x.reshape(4, -1), x_inner.reshape(4, -1)),
                              (GlobalAvgPool(), x, x_inner), (basic_block(3, 3, 1), x, x_inner)):
        params = layer.init(rng, np, np.float64)
        y, cache = layer.forward(params, a)
        dy = rng.standard_normal(y.shape)
        dx, _ = layer.backward(params, cache, dy)
        dx_inner, _ = layer.backward(params, layer.forward(params, a_inner)[1], dy)
        assert dx_inner.strides == a_inner.strides, layer
        np.testing.assert_allclose(dx_inner, dx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("winograd", [False, True])
def test_a_convolution_bias_before_batchnorm_cancels(winograd):
    """BatchNorm's output and the gradient reaching x are the same whether or not the convolution
    before it has a bias, and that bias's gradient is zero: why the resnet's convolutions have none."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, 3, 6, 6))
    with_b, without_b, norm = Conv2d(3, 5, 3, pad=1, winograd=winograd), Conv2d(3, 5, 3, pad=1, winograd=winograd,
                                                                                   bias=False), BatchNorm(5)
    p = with_b.init(rng, np, np.float64)
    p["b"] = rng.standard_normal(5)
    q = {"W": p["W"]}
    assert set(without_b.init(rng, np, np.float64)) == set(without_b.trainable) == {"W"}
    results = []
    for layer, params in ((with_b, p), (without_b, q)):
        pn = norm.init(rng, np, np.float64)
        h, conv_cache = layer.forward(params, x)
        y, norm_cache = norm.forward(pn, h)
        dy = np.random.default_rng(13).standard_normal(y.shape)
        dx, grads = layer.backward(params, conv_cache, norm.backward(pn, norm_cache, dy)[0])
        results.append((y, dx, grads))
    np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-12)
    np.testing.assert_allclose(results[0][1], results[1][1], atol=1e-12)
    np.testing.assert_allclose(results[0][2]["W"], results[1][2]["W"], atol=1e-12)
    np.testing.assert_allclose(results[0][2]["b"], 0.0, atol=1e-12)
    assert set(results[1][2]) == {"W"}


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (2, 2, 0), (3, 2, 0), (1, 2, 0)])
def test_col2im_is_adjoint_of_im2col(k, stride, pad):
    """<im2col(x), c> == <x, col2im(c)>, which is what makes col2im the right backward."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6))
    cols = im2col(x, k, stride, pad)
    c = rng.standard_normal(cols.shape)
    dx = col2im(c, x.shape, k, stride, pad)
    assert dx.shape == x.shape
    assert math.isclose((cols * c).sum(), (x * dx).sum(), rel_tol=1e-12)


def test_maxpool_forward_matches_window_max():
    """Overlapping max pooling returns the maximum of every k x k window."""
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 6))
    y, _ = MaxPool2d(3, stride=2).forward({}, x)
    expected = np.array([[[[x[n, c, 2 * a:2 * a + 3, 2 * b:2 * b + 3].max() for b in range(2)]
                           for a in range(3)] for c in range(3)] for n in range(2)])
    np.testing.assert_array_equal(y, expected)


def test_maxpool_tie_sends_gradient_to_one_input():
    """With all inputs equal, each window passes its whole gradient to exactly one element."""
    layer = MaxPool2d(2)
    x = np.zeros((2, 3, 4, 4), dtype=np.float32)
    y, cache = layer.forward({}, x)
    dy = np.random.default_rng(0).uniform(1.0, 2.0, y.shape).astype(np.float32)
    dx, _ = layer.backward({}, cache, dy)
    windows = dx.reshape(2, 3, 2, 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 2, 2, 4)
    assert ((windows != 0).sum(axis=-1) == 1).all()
    np.testing.assert_array_equal(windows.sum(axis=-1), dy)


def test_relu_keeps_non_finite_values_non_finite():
    """ReLU multiplies by its mask both ways: a NaN or -Inf input gives NaN and a NaN or Inf in
    dy stays non-finite where the mask is 0, so the gradient check sees what came in."""
    x = np.array([[-np.inf, -1.0, 0.0, 2.0, np.nan, np.inf]], np.float32)
    with np.errstate(invalid="ignore"):   # -inf * 0
        y, cache = ReLU().forward({}, x)
    np.testing.assert_array_equal(y, [[np.nan, 0.0, 0.0, 2.0, np.nan, np.inf]])
    with np.errstate(invalid="ignore"):   # inf * 0
        dx, _ = ReLU().backward({}, cache, np.array([[np.nan, np.inf, 1.0, 3.0, 5.0, 7.0]], np.float32))
    np.testing.assert_array_equal(np.isnan(dx), [[True, True, False, False, False, False]])
    np.testing.assert_array_equal(dx[:, 2:4], [[0.0, 3.0]])
    np.testing.assert_array_equal(dx[:, 5], [7.0])


def test_gelu_close_to_exact_gelu():
    """The tanh approximation stays within 1e-3 of x * Phi(x) computed with erf."""
    x = np.linspace(-6, 6, 101)
    y, _ = GELU().forward({}, x)
    exact = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
    np.testing.assert_allclose(y, exact, atol=1e-3)


def test_batchnorm_train_normalizes_and_updates_running_stats():
    """Training output has per-channel zero mean and unit variance; running stats move by
    momentum 0.1 towards the batch mean and the unbiased batch variance."""
    layer = BatchNorm(3)
    params = layer.init(np.random.default_rng(0), np, np.float64)
    x = np.random.default_rng(1).normal(2.0, 3.0, (4, 3, 5, 5))
    y, _ = layer.forward(params, x, TRAIN)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1, rtol=1e-4)   # eps = 1e-5 shrinks it
    mean = x.mean(axis=(0, 2, 3))
    var = x.transpose(1, 0, 2, 3).reshape(3, -1).var(axis=1, ddof=1)
    np.testing.assert_allclose(params["running_mean"], 0.1 * mean, rtol=1e-12)
    np.testing.assert_allclose(params["running_var"], 0.9 + 0.1 * var, rtol=1e-12)


def test_batchnorm_eval_uses_running_stats():
    """Evaluation normalizes with the running statistics, not the batch's, and leaves them alone."""
    layer = BatchNorm(2)
    rng = np.random.default_rng(0)
    params = {"gamma": rng.standard_normal(2), "beta": rng.standard_normal(2),
              "running_mean": rng.standard_normal(2), "running_var": rng.uniform(0.5, 2, 2)}
    before = {k: v.copy() for k, v in params.items()}
    x = rng.standard_normal((3, 2))
    y, _ = layer.forward(params, x, EVAL)
    expected = ((x - before["running_mean"]) / np.sqrt(before["running_var"] + 1e-5)
                * params["gamma"] + params["beta"])
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])


def test_dropout_masks_follow_the_key():
    """Equal keys give equal masks, different keys different ones; eval is the identity."""
    layer = Dropout(0.5)
    x = np.ones((64, 64), dtype=np.float32)
    a, _ = layer.forward({}, x, Mode(True, (1, 2)))
    b, _ = layer.forward({}, x, Mode(True, (1, 2)))
    c, _ = layer.forward({}, x, Mode(True, (1, 3)))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    y, _ = layer.forward({}, x, EVAL)
    np.testing.assert_array_equal(y, x)


def test_dropout_is_inverted_with_rate_p():
    """Kept elements are scaled by 1/(1-p), and about a fraction p is dropped (within 5 sigma)."""
    p, n = 0.3, 100_000
    y, _ = Dropout(p).forward({}, np.ones(n, dtype=np.float32), KEY)
    assert set(np.unique(y).tolist()) == {0.0, np.float32(1 / (1 - p))}
    dropped = (y == 0).mean()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_residual_names_and_buffers():
    """A block's params are its sub-layers' under prefixes; buffers are neither trainable nor
    decayed, and BatchNorm inside the block updates them in the block's own dict."""
    block = basic_block(2, 3, 2)
    params = block.init(np.random.default_rng(0), np, np.float32)
    assert set(block.trainable) == {"0.W", "1.gamma", "1.beta", "3.W", "4.gamma",   # no conv bias before a BatchNorm
                                    "4.beta", "s0.W", "s1.gamma", "s1.beta"}
    assert set(params) == set(block.trainable) | {"1.running_mean", "1.running_var",
                                                  "4.running_mean", "4.running_var",
                                                  "s1.running_mean", "s1.running_var"}
    assert set(block.no_decay) == set(block.trainable) - {"0.W", "3.W", "s0.W"}
    x = np.random.default_rng(1).normal(1.0, 1.0, (2, 2, 4, 4)).astype(np.float32)
    block.forward(params, x, TRAIN)
    assert (params["s1.running_mean"] != 0).all()


def test_residual_without_shortcut_adds_input():
    """With the identity shortcut and no post, the block computes branch(x) + x."""
    lin = Linear(3, 3)
    block = Residual([lin], post=None)
    params = block.init(np.random.default_rng(0), np, np.float64)
    x = np.random.default_rng(1).standard_normal((2, 3))
    y, _ = block.forward(params, x)
    np.testing.assert_allclose(y, x @ params["0.W"] + params["0.b"] + x, rtol=1e-12)


def test_residual_dropouts_draw_distinct_masks():
    """Two dropouts of one block, seeing the same key, still draw different masks."""
    block = Residual([Dropout(0.5)], [Dropout(0.5)], post=None)
    y, _ = block.forward({}, np.ones((32, 32), dtype=np.float32), KEY)
    # Equal masks would make every sum 0 or 4; distinct ones also give 2 (one kept).
    assert (y == 2).any()


def test_loss_matches_definition_and_is_stable():
    """The loss is the batch mean of -log softmax at the label, unchanged by huge logit shifts."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    loss, _ = softmax_cross_entropy_forward(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert math.isclose(float(loss), -np.log(p[np.arange(5), labels]).mean(), rel_tol=1e-12)
    shifted, _ = softmax_cross_entropy_forward(logits + 1e4, labels)
    assert math.isclose(float(shifted), float(loss), rel_tol=1e-9)
    big, _ = softmax_cross_entropy_forward((logits * 1e4).astype(np.float32), labels)
    assert np.isfinite(big) and big.dtype == np.float32


@pytest.mark.parametrize("dloss", [1.0, 0.375])
def test_loss_backward_matches_finite_differences(dloss):
    """backward(cache, dloss) equals dloss times the numerical gradient of the mean loss."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 5))
    labels = np.array([4, 0, 2, 2])
    _, cache = softmax_cross_entropy_forward(logits, labels)
    dlogits = softmax_cross_entropy_backward(cache, dloss)

    def scaled_loss() -> float:
        return dloss * float(softmax_cross_entropy_forward(logits, labels)[0])

    numeric = numerical_gradient(scaled_loss, logits)
    assert_gradient_close("dlogits", dlogits, numeric)


def test_micro_batch_gradients_sum_to_batch_gradient():
    """Micro-batches of b out of B with dloss = b / B reproduce the whole batch's gradient."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 6)
    full = softmax_cross_entropy_backward(softmax_cross_entropy_forward(logits, labels)[1])
    parts = [softmax_cross_entropy_backward(softmax_cross_entropy_forward(logits[s], labels[s])[1], 2 / 6)
             for s in (slice(0, 2), slice(2, 4), slice(4, 6))]
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=1e-6)
    assert full.dtype == np.float32


def test_accuracy():
    """Accuracy is the fraction of rows whose argmax is the label."""
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert float(accuracy(logits, np.array([1, 0, 0, 1]))) == 0.5

"""hpdl.kernels' NumPy oracles compute exactly what hpdl's code around them expects.

The GPU parity tests (tests/gpu/) compare each fused kernel with its `*_ref` oracle. hpdl's
optimizers, server rules and normalization layers call the kernels' entry points, so these
tests, which run anywhere, check the bookkeeping around the calls (first steps, step
counts, decay per tensor, a worker's backup row) against the oracles called by hand, and
tie the oracles of code that does not call them (conv's im2col, the norms) to that code.
tests/unit/test_kernels_wired.py runs the same callers on the kernels themselves.
"""
from __future__ import annotations

import numpy as np
import pytest

from hpdl import kernels
from hpdl.algorithms.dcasgd import DcAsgdAdaptiveServer, DcAsgdServer
from hpdl.algorithms.easgd import EasgdServer
from hpdl.layers import Linear
from hpdl.layers.conv import col2im, im2col
from hpdl.optim import SGD, AdamW
from hpdl.optim.largebatch import squared_norms
from hpdl.optim.lars import pair_norms

RATES = (0.1, 0.05, 0.02)   # a different learning rate at each of three steps


def _layers_and_params(dtype=np.float32):
    """Two Linear layers (W decays, b does not) with random non-zero parameters and gradients."""
    rng = np.random.default_rng(0)
    layers = [Linear(5, 4), Linear(4, 3)]
    params = [layer.init(np.random.default_rng(i), np, dtype) for i, layer in enumerate(layers)]
    for p in params:
        p["b"] += rng.standard_normal(p["b"].shape).astype(dtype)
    grads = [[{k: rng.standard_normal(v.shape).astype(dtype) for k, v in p.items()} for p in params]
             for _ in RATES]
    return layers, params, grads


def _tensors(layers, params):
    """(layer index, name, decays) of every trainable tensor, in the optimizer's order."""
    return [(i, name, name not in layer.no_decay) for i, layer in enumerate(layers) for name in layer.trainable]


@pytest.mark.parametrize("momentum,nesterov,weight_decay",
                         [(0.0, False, 0.0), (0.0, False, 0.01), (0.9, False, 0.0), (0.9, False, 0.01),
                          (0.9, True, 0.01)])
def test_sgd_oracle_equals_hpdl_sgd(momentum, nesterov, weight_decay):
    """Three steps of sgd_update_ref give bit-identical weights and momentum buffers to
    hpdl.optim.SGD (decay on weights only, buffers overwritten on the first step)."""
    layers, params, grads = _layers_and_params()
    tensors = _tensors(layers, params)
    mine = [np.copy(params[i][name]) for i, name, _ in tensors]
    bufs = [np.full_like(w, np.nan) for w in mine]   # the first step must overwrite them
    wds = [weight_decay if decays else 0.0 for *_, decays in tensors]
    opt = SGD(layers, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    for t, (lr, g) in enumerate(zip(RATES, grads)):
        opt.step(params, g, lr)
        kernels.sgd_update_ref(mine, [g[i][name] for i, name, _ in tensors], [lr] * len(tensors), wds,
                               momentum, nesterov, bufs, [t == 0] * len(tensors))
    for (i, name, _), w, buf in zip(tensors, mine, bufs):
        np.testing.assert_array_equal(w, params[i][name])
        if momentum:
            np.testing.assert_array_equal(buf, opt.state[f"{i}/{name}/momentum"])
    assert params[0]["W"].dtype == np.float32


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adamw_oracle_equals_hpdl_adamw(weight_decay):
    """Three steps of adamw_update_ref give bit-identical weights and moments to hpdl.optim.AdamW."""
    layers, params, grads = _layers_and_params()
    tensors = _tensors(layers, params)
    mine = [np.copy(params[i][name]) for i, name, _ in tensors]
    ms, vs = [np.zeros_like(w) for w in mine], [np.zeros_like(w) for w in mine]
    wds = [weight_decay if decays else 0.0 for *_, decays in tensors]
    opt = AdamW(layers, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    for t, (lr, g) in enumerate(zip(RATES, grads), start=1):
        opt.step(params, g, lr)
        kernels.adamw_update_ref(mine, [g[i][name] for i, name, _ in tensors], ms, vs, [lr] * len(tensors), t,
                                 wds, (0.8, 0.99), 1e-6)
    for (i, name, _), w, m, v in zip(tensors, mine, ms, vs):
        np.testing.assert_array_equal(w, params[i][name])
        np.testing.assert_array_equal(m, opt.state[f"{i}/{name}/exp_avg"])
        np.testing.assert_array_equal(v, opt.state[f"{i}/{name}/exp_avg_sq"])


@pytest.mark.parametrize("adaptive", [False, True])
def test_dcasgd_oracle_equals_hpdl_server(adaptive):
    """Interleaved messages from three workers (so each backup lags w differently) leave the
    oracle's w, backup rows and mean squares bit-identical to the DC-ASGD server's, and the
    reply is the updated weights."""
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal(50).astype(np.float32)
    server = (DcAsgdAdaptiveServer(w0, 3, lambda_dc=2.0, ms_decay=0.9, eps_dc=1e-7) if adaptive
              else DcAsgdServer(w0, 3, lambda_dc=0.5))
    w, backup = w0.copy(), np.stack([w0] * 3)
    ms = np.zeros_like(backup) if adaptive else None
    for step, worker in enumerate([0, 1, 0, 2, 2, 1]):
        g = rng.standard_normal(50).astype(np.float32)
        lr = 0.1 / (1 + step)
        reply = server.apply(worker, g, lr)
        if adaptive:
            kernels.dcasgd_update_ref(w, backup[worker], g, lr, 2.0, ms[worker], 0.9, 1e-7)
        else:
            kernels.dcasgd_update_ref(w, backup[worker], g, lr, 0.5)
        np.testing.assert_array_equal(reply, w)
    np.testing.assert_array_equal(server.w, w)
    np.testing.assert_array_equal(server.backup, backup)
    if adaptive:
        np.testing.assert_array_equal(server.ms, ms)
    assert not np.array_equal(backup[0], backup[1])  # the delays really differed


def test_easgd_elastic_oracle_equals_hpdl_server():
    """Messages from two workers give bit-identical centres and replies e to EasgdServer's."""
    rng = np.random.default_rng(2)
    center0 = rng.standard_normal(40).astype(np.float32)
    server = EasgdServer(center0, 2, alpha=0.45)
    center = center0.copy()
    for worker in (0, 1, 1, 0):
        x = rng.standard_normal(40).astype(np.float32)
        e_hpdl = server.apply(worker, x, 0.1).copy()
        e = kernels.easgd_elastic_ref(center, x, 0.45)
        np.testing.assert_array_equal(e, e_hpdl)
    np.testing.assert_array_equal(center, server.w)


CONV_CASES = [(2, 3, 7, 6, 3, 1, 1), (2, 2, 9, 9, 3, 2, 1), (1, 4, 5, 8, 1, 2, 0), (3, 1, 6, 6, 2, 2, 0),
              (1, 2, 5, 5, 5, 1, 2), (2, 1, 8, 7, 3, 3, 2)]   # N, C, H, W, k, stride, pad


@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col_oracle_equals_conv(case):
    """im2col_ref equals conv.im2col, its batched layout is the same patches sample-major, and
    each entry is x[n, c, a s + i - pad, b s + j - pad] or 0, checked entry by entry."""
    n, c, h, w, k, s, pad = case
    x = np.random.default_rng(6).standard_normal((n, c, h, w)).astype(np.float32)
    ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    hpdl_cols = im2col(x, k, s, pad)
    np.testing.assert_array_equal(kernels.im2col_ref(x, k, s, pad, batched=False), hpdl_cols)
    batched = kernels.im2col_ref(x, k, s, pad)
    np.testing.assert_array_equal(batched, hpdl_cols.reshape(c * k * k, ho * wo, n).transpose(2, 0, 1))
    for nn, cc, i, j, a, b in np.ndindex(n, c, k, k, ho, wo):
        hh, ww = a * s + i - pad, b * s + j - pad
        inside = 0 <= hh < h and 0 <= ww < w
        assert batched[nn, (cc * k + i) * k + j, a * wo + b] == (x[nn, cc, hh, ww] if inside else 0.0)


@pytest.mark.parametrize("case", CONV_CASES)
def test_col2im_oracle_equals_conv_and_is_the_adjoint(case):
    """col2im_ref equals conv.col2im bit for bit, its batched layout gives the same x, and
    <im2col(x), cols> = <x, col2im(cols)> in float64."""
    n, c, h, w, k, s, pad = case
    rng = np.random.default_rng(7)
    ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    cols = rng.standard_normal((c * k * k, ho * wo * n)).astype(np.float32)
    x_shape = (n, c, h, w)
    dx = kernels.col2im_ref(cols, x_shape, k, s, pad)
    np.testing.assert_array_equal(dx, col2im(cols, x_shape, k, s, pad))
    as_batched = cols.reshape(c * k * k, ho * wo, n).transpose(2, 0, 1)
    np.testing.assert_array_equal(kernels.col2im_ref(np.ascontiguousarray(as_batched), x_shape, k, s, pad,
                                                     batched=True), dx)
    x64, cols64 = rng.standard_normal(x_shape), rng.standard_normal(cols.shape)
    lhs = np.vdot(kernels.im2col_ref(x64, k, s, pad, batched=False), cols64)
    rhs = np.vdot(x64, kernels.col2im_ref(cols64, x_shape, k, s, pad))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)


def test_sum_squares_oracle_matches_hpdl_norms():
    """Per tensor, sum_squares_ref is the float64 sum of squares; LARS's and LAMB's pair_norms
    are its roots, and largebatch.squared_norms its sums per layer."""
    layers, params, grads = _layers_and_params()
    tensors = [grads[0][i][name] for i, name, _ in _tensors(layers, params)]
    s = kernels.sum_squares_ref(tensors)
    assert s.shape == (len(tensors),) and s.dtype == np.float32
    exact = [np.sum(t.astype(np.float64) ** 2) for t in tensors]
    np.testing.assert_allclose(s, exact, rtol=1e-6)
    np.testing.assert_allclose(pair_norms([tensors[:2], tensors[2:]]).ravel(), np.sqrt(exact), rtol=1e-6)
    per_layer = [s[0] + s[1], s[2] + s[3]]   # each Linear's W and b
    np.testing.assert_allclose(per_layer, squared_norms(layers, grads[0]), rtol=1e-6)


def test_numpy_inputs_take_the_reference_path():
    """On NumPy arrays every public entry point returns (or writes) exactly its oracle's result."""
    rng = np.random.default_rng(8)
    w, g = rng.standard_normal((2, 6)).astype(np.float32)
    w1, buf1, w2, buf2 = w.copy(), np.empty_like(w), w.copy(), np.empty_like(w)
    kernels.sgd_update([w1], [g], [0.1], [0.01], 0.9, True, [buf1], [True])
    kernels.sgd_update_ref([w2], [g], [0.1], [0.01], 0.9, True, [buf2], [True])
    np.testing.assert_array_equal(w1, w2)
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(kernels.im2col(x, 3, 1, 1), kernels.im2col_ref(x, 3, 1, 1))
    gamma, beta = np.ones(5, np.float32), np.zeros(5, np.float32)
    for a, b in zip(kernels.layernorm_forward(x, gamma, beta), kernels.layernorm_forward_ref(x, gamma, beta)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(kernels.sum_squares([w, g]), kernels.sum_squares_ref([w, g]))


def test_argument_errors_are_reported():
    """Mismatched shapes, a missing momentum buffer and a non-fitting conv raise ValueError."""
    z = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"\(3,\) and \(4,\)"):
        kernels.adamw_update([z], [np.zeros(3, np.float32)], [z.copy()], [z.copy()], [0.1], 1, [0.0])
    with pytest.raises(ValueError, match="lists of 1 and 2 tensors"):
        kernels.sgd_update([z], [z], [0.1, 0.2], [0.0])
    with pytest.raises(ValueError, match="buf"):
        kernels.sgd_update([z], [z], [0.1], [0.0], momentum=0.9)
    with pytest.raises(ValueError, match="ms_decay"):
        kernels.dcasgd_update(z, z.copy(), z, 0.1, 2.0, ms=z.copy())
    with pytest.raises(ValueError, match="does not fit"):
        kernels.im2col(np.zeros((1, 1, 2, 2), np.float32), 5, 1, 0)
    with pytest.raises(ValueError, match="gamma"):
        kernels.batchnorm_forward(np.zeros((2, 3, 4, 4), np.float32), z, z, z, z)
    with pytest.raises(ValueError, match="cols"):
        kernels.col2im(np.zeros((9, 5), np.float32), (1, 1, 4, 4), 3, 1, 1)

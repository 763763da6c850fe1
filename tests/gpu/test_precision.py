"""CuPy under --precision fp16 and tf32 against the NumPy policy: same operand rounding, float32 accumulation.

Bounds. Both sides multiply the same rounded operands exactly (float16 x float16 products fit float32)
and add k terms in float32 in different orders, so each result entry is within gamma_k = k 2^-24 /
(1 - k 2^-24) of sum |a_i b_i| of the exact product of the rounded operands: two such errors apart
at most. TF32 keeps 10 stored mantissa bits, like float16, so its operand rounding is at most
u = 2^-11 relative (truncation would be 2^-10: the bound allows that), with float32's range.
"""
from __future__ import annotations

import numpy as np
import pytest

cp = pytest.importorskip("cupy")

from hpdl.layers import Linear  # noqa: E402  (after the skip: nothing to test without cupy)
from hpdl.precision import POLICIES, matmul, use  # noqa: E402

pytestmark = pytest.mark.gpu
U16 = 2.0 ** -11


def gamma(k: int) -> float:
    return k * 2.0 ** -24 / (1 - k * 2.0 ** -24)


def operands(shape_a, shape_b, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape_a).astype(np.float32), rng.standard_normal(shape_b).astype(np.float32)


@pytest.mark.parametrize("shapes", [((256, 512), (512, 128)), ((7, 300), (300, 1))])
def test_fp16_gemm_matches_the_numpy_policy(shapes):
    """cuBLAS gemmEx (float16 in, float32 compute and out) equals NumPy's emulation up to float32 summation
    order, also for transposed operands."""
    a, b = operands(*shapes)
    with use(POLICIES["fp16"]):
        host = matmul(a, b)
        host_t = matmul(b.T, a.T)
    with use(POLICIES["fp16"], gpu=True):
        dev = cp.asnumpy(matmul(cp.asarray(a), cp.asarray(b)))
        dev_t = cp.asnumpy(matmul(cp.asarray(b).T, cp.asarray(a).T))
    a16, b16 = a.astype(np.float16).astype(np.float64), b.astype(np.float16).astype(np.float64)
    limit = 2 * gamma(a.shape[1]) * (np.abs(a16) @ np.abs(b16))
    assert dev.dtype == np.float32
    assert (np.abs(dev - host) <= limit).all()
    assert (np.abs(dev_t - host_t) <= limit.T).all()


def test_tf32_rounds_operands_and_fp32_does_not():
    """Under tf32 the product's error against float64 is within 2u + gamma_k of sum |a b| (and larger than
    fp32's on a TF32-capable device); under fp32 it is within gamma_k."""
    a, b = operands((512, 1024), (1024, 256), seed=1)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    magnitude = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
    k = a.shape[1]
    with use(POLICIES["tf32"], gpu=True):
        tf32 = cp.asnumpy(matmul(cp.asarray(a), cp.asarray(b)))
    with use(POLICIES["fp32"], gpu=True):
        fp32 = cp.asnumpy(matmul(cp.asarray(a), cp.asarray(b)))
    assert (np.abs(fp32 - exact) <= gamma(k) * magnitude).all()
    assert (np.abs(tf32 - exact) <= ((2 * U16 + U16 ** 2) * (1 + gamma(k)) + gamma(k)) * magnitude).all()
    if int(cp.cuda.Device().compute_capability) >= 80:
        assert np.abs(tf32 - exact).max() > np.abs(fp32 - exact).max()


def test_fp16_linear_layer_matches_the_numpy_policy():
    """A Linear layer's forward and backward in fp16 on the GPU agree with the NumPy policy to the same bound."""
    layer = Linear(300, 64)
    params = layer.init(np.random.default_rng(2), np, np.float32)
    x, dy = operands((32, 300), (32, 64), seed=3)
    with use(POLICIES["fp16"]):
        y, cache = layer.forward(params, x)
        dx, g = layer.backward(params, cache, dy)
    dev_params = {k: cp.asarray(v) for k, v in params.items()}
    with use(POLICIES["fp16"], gpu=True):
        y_d, cache_d = layer.forward(dev_params, cp.asarray(x))
        dx_d, g_d = layer.backward(dev_params, cache_d, cp.asarray(dy))
    r = lambda v: np.abs(v.astype(np.float16).astype(np.float64))  # noqa: E731
    checks = [(y_d, y, 2 * gamma(300) * (r(x) @ r(params["W"]))),
              (dx_d, dx, 2 * gamma(64) * (r(dy) @ r(params["W"]).T)),
              (g_d["W"], g["W"], 2 * gamma(32) * (r(x).T @ r(dy)))]
    for dev, host, limit in checks:
        # y also adds the bias in float32 on both sides: half an ulp of rounding each.
        assert (np.abs(cp.asnumpy(dev) - host) <= limit + 2.0 ** -23 * np.abs(host)).all()

"""Finite-difference checks of a layer's backward pass, in float64."""
from __future__ import annotations

import numpy as np

from hpdl.layers import TRAIN, Layer, Mode


def numerical_gradient(f, a: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f() with respect to every element of a (perturbed in place)."""
    grad = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + eps
        up = f()
        a[i] = old - eps
        down = f()
        a[i] = old
        grad[i] = (up - down) / (2 * eps)
    return grad


def assert_gradient_close(what: str, analytic: np.ndarray, numeric: np.ndarray,
                          rtol: float = 1e-6, atol: float = 1e-8) -> None:
    """max |analytic - numeric| <= rtol * (largest entry) + atol.

    Relative to the largest entry so that near-zero entries cannot inflate the error; atol
    sits just above the ~1e-9 round-off of central differences of an O(10) float64 sum, so
    that a gradient that is exactly zero (a bias before BatchNorm) can pass.
    """
    scale = max(np.abs(analytic).max(), np.abs(numeric).max())
    err = np.abs(analytic - numeric).max()
    assert err <= rtol * scale + atol, f"{what}: max error {err:.2e} on gradients of size {scale:.2e}"


def check_layer(layer: Layer, x: np.ndarray, mode: Mode = TRAIN, params=None,
                seed: int = 0) -> None:
    """Assert backward gives d sum(y * dy) / d(x and every trainable parameter) for a random dy.

    Trainable parameters are jittered first so that no special value (zero bias, unit scale)
    hides a missing term. Also asserts backward leaves params untouched and returns one
    gradient per trainable name.
    """
    rng = np.random.default_rng(seed)
    if params is None:
        params = layer.init(rng, np, np.float64)
        for name in layer.trainable:
            params[name] = params[name] + 0.3 * rng.standard_normal(params[name].shape)
    x = np.array(x, dtype=np.float64)
    y, cache = layer.forward(params, x, mode)
    dy = rng.standard_normal(y.shape)

    before = {k: v.copy() for k, v in params.items()}
    dx, grads = layer.backward(params, cache, dy)
    for k, v in params.items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"backward changed params[{k!r}]")
    assert sorted(grads) == sorted(layer.trainable)

    def f() -> float:
        return float((layer.forward(params, x, mode)[0] * dy).sum())

    assert dx.shape == x.shape
    assert_gradient_close("dx", dx, numerical_gradient(f, x))
    for name in layer.trainable:
        assert grads[name].shape == params[name].shape, name
        assert_gradient_close(f"d{name}", grads[name], numerical_gradient(f, params[name]))

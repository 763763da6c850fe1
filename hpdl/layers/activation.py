"""Element-wise activations: ReLU and GELU (tanh approximation)."""
from __future__ import annotations

import math

from ..backend import array_module
from ..kernels import bias_relu_backward, relu_forward
from .base import TRAIN, Layer, Mode

_C = math.sqrt(2.0 / math.pi)   # GELU's tanh approximation: tanh(_C (x + _A x^3))
_A = 0.044715


class ReLU(Layer):
    """max(x, 0), computed as x (x > 0): a NaN or -Inf input gives NaN, so a non-finite value
    stays non-finite for the gradient check (and NumPy's multiply beats its maximum by a
    scalar). The cache is the output y, which is its own mask (y > 0 exactly where x > 0) and
    the next layer's input anyway; Linear.forward_relu writes the same cache."""

    def forward(self, params, x, mode: Mode = TRAIN):
        # x: (B, ...) -> y: same shape and layout; one kernel launch on the GPU (kernels/bias_act.cu)
        y = relu_forward(x)
        return y, y

    def backward(self, params, cache, dy):
        # One kernel launch on the GPU (kernels/bias_act.cu), dy * (y > 0) elsewhere.
        return bias_relu_backward(cache, dy), {}

    def flops(self, in_shape):
        return math.prod(in_shape)


class GELU(Layer):
    """x * Phi(x) with Phi approximated as (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2."""

    def forward(self, params, x, mode: Mode = TRAIN):
        # x: (B, ...) -> y: same shape
        xp = array_module(x)
        t = xp.tanh(_C * (x + _A * x * x * x))
        return 0.5 * x * (1.0 + t), (x, t)

    def backward(self, params, cache, dy):
        x, t = cache
        # d/dx [x (1 + t) / 2] with dt/dx = (1 - t^2) _C (1 + 3 _A x^2)
        dt = (1.0 - t * t) * (_C * (1.0 + 3.0 * _A * x * x))
        return dy * (0.5 * (1.0 + t) + 0.5 * x * dt), {}

    def flops(self, in_shape):
        return 10 * math.prod(in_shape)   # a handful of multiplies and one tanh per element

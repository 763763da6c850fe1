"""Element-wise activations: ReLU and GELU (tanh approximation)."""
from __future__ import annotations

import math

from ..kernels import bias_gelu_backward, bias_relu_backward, gelu_ref, relu_forward
from .base import TRAIN, Layer, Mode


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
    """x Phi(x) with Phi(x) ~ (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2. The cache is the input
    x (GELU' needs it); Linear.forward_gelu writes the same cache."""

    def forward(self, params, x, mode: Mode = TRAIN):
        # x: (B, ...) -> y: same shape
        return gelu_ref(x), x

    def backward(self, params, cache, dy):
        # One kernel launch on the GPU (kernels/bias_act.cu), dy GELU'(x) elsewhere.
        return bias_gelu_backward(cache, dy), {}

    def flops(self, in_shape):
        return 10 * math.prod(in_shape)   # a handful of multiplies and one tanh per element

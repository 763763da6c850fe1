"""Fully connected layer: y = x W + b."""
from __future__ import annotations

import numpy as np

from ..kernels import bias_gelu_forward, bias_relu_forward
from ..precision import matmul
from .base import TRAIN, Layer, Mode


class Linear(Layer):
    trainable = ("W", "b")
    no_decay = ("b",)

    def __init__(self, n_in: int, n_out: int):
        self.n_in, self.n_out = n_in, n_out

    def init(self, rng, xp, dtype):
        # He initialization: keeps activation variance constant through ReLU layers.
        W = rng.standard_normal((self.n_in, self.n_out)) * np.sqrt(2.0 / self.n_in)
        return {"W": xp.asarray(W, dtype=dtype), "b": xp.zeros(self.n_out, dtype=dtype)}

    def forward(self, params, x, mode: Mode = TRAIN):
        # x: (B, n_in)  W: (n_in, n_out)  b: (n_out,)  ->  y: (B, n_out)
        y = matmul(x, params["W"])
        y += params["b"]
        return y, x

    def forward_relu(self, params, x):
        """forward, then a ReLU, with the bias add and the ReLU in one pass (one kernel launch on
        the GPU): (y, (this layer's cache, the ReLU's)), the values both forwards would give."""
        y = matmul(x, params["W"])
        return bias_relu_forward(y, params["b"], out=y), (x, y)

    def forward_gelu(self, params, x):
        """forward, then a GELU, in one pass after the product (one kernel launch on the GPU):
        (y, (this layer's cache, the GELU's: the biased product u))."""
        z = matmul(x, params["W"])
        y, u = bias_gelu_forward(z, params["b"], out=z)
        return y, (x, u)

    def backward(self, params, cache, dy):
        # dy: (B, n_out) -> dx: (B, n_in) stored as x is, dW: (n_in, n_out), db: (n_out,)
        x = cache
        if x.flags.f_contiguous and not x.flags.c_contiguous:
            # x is conv's batch-innermost output flattened: dx = (W dy^T)^T lands in that layout,
            # where dy W^T would cost the layer below a transposing copy.
            dx = matmul(params["W"], dy.T).T
        else:
            dx = matmul(dy, params["W"].T)
        return dx, self.param_grads(params, cache, dy)

    def param_grads(self, params, cache, dy):
        x = cache
        return {"W": matmul(x.T, dy), "b": dy.sum(axis=0)}

    def out_shape(self, in_shape):
        return (self.n_out,)

    def flops(self, in_shape):
        return 2 * self.n_in * self.n_out

"""Normalization layers: LayerNorm over features, BatchNorm over the batch (and pixels)."""
from __future__ import annotations

import math

from ..backend import array_module
from ..kernels import batchnorm_backward, batchnorm_forward, layernorm_backward, layernorm_forward
from .base import TRAIN, Layer, Mode


def _affine_params(n: int, xp, dtype):
    return {"gamma": xp.ones(n, dtype=dtype), "beta": xp.zeros(n, dtype=dtype)}


class LayerNorm(Layer):
    """Each sample's last axis normalized to zero mean, unit variance, then scaled and shifted."""

    trainable = ("gamma", "beta")
    no_decay = ("gamma", "beta")

    def __init__(self, n: int, eps: float = 1e-5):
        self.n, self.eps = n, eps

    def init(self, rng, xp, dtype):
        return _affine_params(self.n, xp, dtype)

    def forward(self, params, x, mode: Mode = TRAIN):
        # x: (..., n) -> y: (..., n)   gamma, beta: (n,)   cache: xhat (..., n), rstd (..., 1)
        y, xhat, rstd = layernorm_forward(x, params["gamma"], params["beta"], self.eps)
        return y, (xhat, rstd)

    def backward(self, params, cache, dy):
        dx, dgamma, dbeta = layernorm_backward(dy, *cache, params["gamma"])
        return dx, {"gamma": dgamma, "beta": dbeta}

    def flops(self, in_shape):
        return 8 * math.prod(in_shape)   # mean, variance, normalize, scale and shift


class BatchNorm(Layer):
    """Per-channel normalization of (N, C) or (N, C, H, W) with batch statistics in training.

    Running statistics (buffers, not trainable) follow PyTorch: momentum 0.1 and the
    unbiased batch variance; evaluation normalizes with them instead of the batch's.
    """

    trainable = ("gamma", "beta")
    no_decay = ("gamma", "beta")
    couples_rows = True

    def __init__(self, c: int, eps: float = 1e-5, momentum: float = 0.1):
        self.c, self.eps, self.momentum = c, eps, momentum

    def init(self, rng, xp, dtype):
        return {**_affine_params(self.c, xp, dtype),
                "running_mean": xp.zeros(self.c, dtype=dtype),
                "running_var": xp.ones(self.c, dtype=dtype)}

    def forward(self, params, x, mode: Mode = TRAIN):
        # x: (N, C) or (N, C, H, W) -> y: same shape; statistics are per channel
        if mode.train:   # batch statistics, and the running ones updated in place
            y, xhat, rstd = batchnorm_forward(x, params["gamma"], params["beta"], params["running_mean"],
                                              params["running_var"], self.eps, self.momentum)
            return y, (xhat, rstd, True)
        xp = array_module(x)
        as_channel = (1, self.c) + (1,) * (x.ndim - 2)    # broadcasts (C,) against x
        rstd = 1.0 / xp.sqrt(params["running_var"].reshape(as_channel) + self.eps)
        xhat = (x - params["running_mean"].reshape(as_channel)) * rstd
        return xhat * params["gamma"].reshape(as_channel) + params["beta"].reshape(as_channel), (xhat, rstd, False)

    def backward(self, params, cache, dy):
        xhat, rstd, train = cache
        if train:
            dx, dgamma, dbeta = batchnorm_backward(dy, xhat, rstd, params["gamma"])
            return dx, {"gamma": dgamma, "beta": dbeta}
        # In evaluation the statistics are constants, so only the scaling by rstd remains.
        axes = (0,) + tuple(range(2, dy.ndim))   # every axis but the channel
        dx = dy * params["gamma"].reshape((1, self.c) + (1,) * (dy.ndim - 2)) * rstd
        return dx, {"gamma": (dy * xhat).sum(axis=axes), "beta": dy.sum(axis=axes)}

    def flops(self, in_shape):
        return 8 * math.prod(in_shape)

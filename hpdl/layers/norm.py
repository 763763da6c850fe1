"""Normalization layers: LayerNorm over features, BatchNorm over the batch (and pixels)."""
from __future__ import annotations

import math

from ..backend import array_module
from .base import TRAIN, Layer, Mode


def _normalize_backward(dxhat, xhat, rstd, axes):
    """dx from dxhat for xhat = (x - mean(x)) * rstd, mean and variance taken over axes.

    The two subtracted means are the gradient flowing through the mean and the variance.
    """
    mean_d = dxhat.mean(axis=axes, keepdims=True)
    mean_dx = (dxhat * xhat).mean(axis=axes, keepdims=True)
    return rstd * (dxhat - mean_d - xhat * mean_dx)


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
        # x: (..., n) -> y: (..., n)   gamma, beta: (n,)
        xp = array_module(x)
        xc = x - x.mean(axis=-1, keepdims=True)
        rstd = 1.0 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + self.eps)   # (..., 1)
        xhat = xc * rstd
        return xhat * params["gamma"] + params["beta"], (xhat, rstd)

    def backward(self, params, cache, dy):
        xhat, rstd = cache
        dx = _normalize_backward(dy * params["gamma"], xhat, rstd, -1)
        dy2, xhat2 = dy.reshape(-1, self.n), xhat.reshape(-1, self.n)
        return dx, {"gamma": (dy2 * xhat2).sum(axis=0), "beta": dy2.sum(axis=0)}

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

    @staticmethod
    def _axes(x) -> tuple[int, ...]:
        return (0,) + tuple(range(2, x.ndim))   # every axis but the channel

    def forward(self, params, x, mode: Mode = TRAIN):
        # x: (N, C) or (N, C, H, W) -> y: same shape; statistics are per channel
        xp = array_module(x)
        axes = self._axes(x)
        as_channel = (1, self.c) + (1,) * (x.ndim - 2)    # broadcasts (C,) against x
        if mode.train:
            mean = x.mean(axis=axes, keepdims=True)
            xc = x - mean
            var = (xc * xc).mean(axis=axes, keepdims=True)
            self._update_running(params, mean, var, x.size // self.c)
        else:
            xc = x - params["running_mean"].reshape(as_channel)
            var = params["running_var"].reshape(as_channel)
        rstd = 1.0 / xp.sqrt(var + self.eps)
        xhat = xc * rstd
        y = xhat * params["gamma"].reshape(as_channel) + params["beta"].reshape(as_channel)
        return y, (xhat, rstd, mode.train)

    def _update_running(self, params, mean, var, count: int) -> None:
        m = self.momentum
        unbiased = count / max(count - 1, 1)
        params["running_mean"] *= 1.0 - m
        params["running_mean"] += m * mean.reshape(-1)
        params["running_var"] *= 1.0 - m
        params["running_var"] += (m * unbiased) * var.reshape(-1)

    def backward(self, params, cache, dy):
        xhat, rstd, train = cache
        axes = self._axes(dy)
        dxhat = dy * params["gamma"].reshape((1, self.c) + (1,) * (dy.ndim - 2))
        # In evaluation the statistics are constants, so only the scaling by rstd remains.
        dx = _normalize_backward(dxhat, xhat, rstd, axes) if train else dxhat * rstd
        return dx, {"gamma": (dy * xhat).sum(axis=axes), "beta": dy.sum(axis=axes)}

    def flops(self, in_shape):
        return 8 * math.prod(in_shape)

"""Inverted dropout with masks drawn from the forward pass's key, identical on every device."""
from __future__ import annotations

import math

import numpy as np

from ..backend import array_module
from .base import TRAIN, Layer, Mode


class Dropout(Layer):
    """Zero each element with probability p in training, scaling survivors by 1 / (1 - p)."""

    # Names dropout's random stream within a layer's key; fixed so masks never depend on
    # anything but the key (not object ids, not the device).
    salt = 0xD0

    def __init__(self, p: float):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, params, x, mode: Mode = TRAIN):
        # x: (B, ...) -> y: same shape; the cache is the scaled mask, or None for the identity
        if not mode.train or self.p == 0.0:
            return x, None
        xp = array_module(x)
        # Drawn on the host with NumPy so that a GPU run draws the very masks a CPU run does.
        rng = np.random.default_rng(mode.key + (self.salt,))
        if mode.rows is None:
            keep = rng.random(x.shape, dtype=np.float32) >= self.p
        else:  # one block of a batch split over threads: its rows of the whole batch's mask
            first, total = mode.rows
            keep = rng.random((total, *x.shape[1:]), dtype=np.float32)[first:first + len(x)] >= self.p
        # Scaled on the host: one upload, and no launch on a GPU to scale it there.
        mask = xp.asarray(np.multiply(keep, 1.0 / (1.0 - self.p), dtype=x.dtype))
        return x * mask, mask

    def backward(self, params, cache, dy):
        return (dy if cache is None else dy * cache), {}

    def flops(self, in_shape):
        return math.prod(in_shape)

"""Reshaping layers: Flatten (N, ...) -> (N, features)."""
from __future__ import annotations

import math

from .base import TRAIN, Layer, Mode


class Flatten(Layer):
    def forward(self, params, x, mode: Mode = TRAIN):
        # x: (N, d1, d2, ...) -> y: (N, d1*d2*...)
        return x.reshape(x.shape[0], -1), x.shape

    def backward(self, params, cache, dy):
        return dy.reshape(cache), {}

    def out_shape(self, in_shape):
        return (math.prod(in_shape),)

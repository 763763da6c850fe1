"""Pooling over NCHW images: max pooling over k x k windows, global average pooling."""
from __future__ import annotations

from ..backend import array_module
from .base import TRAIN, Layer, Mode
from .conv import col2im, im2col, out_size


class MaxPool2d(Layer):
    """Max over k x k windows, stride k unless given; windows may overlap."""

    def __init__(self, k: int, stride: int | None = None):
        self.k, self.stride = k, stride or k

    def forward(self, params, x, mode: Mode = TRAIN):
        # x: (N, C, H, W) -> y: (N, C, Ho, Wo)
        if self.stride == self.k:
            return self._forward_tiles(x)
        xp = array_module(x)
        n, c, h, w = x.shape
        k, s = self.k, self.stride
        ho, wo = out_size(h, k, s, 0), out_size(w, k, s, 0)
        # The windows of conv's im2col: cols[c, o, m] is offset o of window m of channel c.
        cols = im2col(x, k, s, 0).reshape(c, k * k, n * ho * wo)
        y = cols.max(axis=1)                                           # (C, N*Ho*Wo)
        # One-hot winner per window: the first offset reaching the max, so that ties
        # send the whole gradient to one input, as a subgradient should.
        win = xp.empty(cols.shape, dtype=bool)
        free = xp.ones(y.shape, dtype=bool)
        for o in range(k * k):
            xp.logical_and(cols[:, o] == y, free, out=win[:, o])
            free &= ~win[:, o]
        y = xp.ascontiguousarray(y.reshape(c, n, ho, wo).transpose(1, 0, 2, 3))
        return y, (win, x.shape)

    def _forward_tiles(self, x):
        """Non-overlapping windows: offsets first, so y and the winners come out in NCHW order."""
        xp = array_module(x)
        n, c, h, w = x.shape
        k = self.k
        ho, wo = h // k, w // k
        # tiles[o] (o = i*k + j) holds x[n, c, a*k + i, b*k + j] for every output (n, c, a, b).
        tiles = xp.ascontiguousarray(
            x[:, :, :ho * k, :wo * k].reshape(n, c, ho, k, wo, k).transpose(3, 5, 0, 1, 2, 4)
        ).reshape(k * k, n, c, ho, wo)
        y = tiles.max(axis=0)
        win = xp.empty(tiles.shape, dtype=bool)
        free = xp.ones(y.shape, dtype=bool)
        for o in range(k * k):
            xp.logical_and(tiles[o] == y, free, out=win[o])
            free &= ~win[o]
        return y, (win, x.shape)

    def backward(self, params, cache, dy):
        # dy: (N, C, Ho, Wo) -> dx: (N, C, H, W), nonzero only at each window's winner
        win, x_shape = cache
        if self.stride == self.k:
            return self._backward_tiles(win, x_shape, dy), {}
        c = x_shape[1]
        dy2 = dy.transpose(1, 0, 2, 3).reshape(c, 1, -1)              # (C, 1, N*Ho*Wo)
        dcols = (win * dy2).reshape(c * self.k * self.k, -1)
        return col2im(dcols, x_shape, self.k, self.stride, 0), {}

    def _backward_tiles(self, win, x_shape, dy):
        xp = array_module(dy)
        k = self.k
        ho, wo = dy.shape[2:]
        dx = xp.zeros(x_shape, dtype=dy.dtype)
        for o in range(k * k):
            i, j = divmod(o, k)
            xp.multiply(dy, win[o], out=dx[:, :, i:i + k * ho:k, j:j + k * wo:k])
        return dx

    def out_shape(self, in_shape):
        c, h, w = in_shape
        return (c, out_size(h, self.k, self.stride, 0), out_size(w, self.k, self.stride, 0))

    def flops(self, in_shape):
        c, ho, wo = self.out_shape(in_shape)
        return c * ho * wo * self.k * self.k   # one comparison per window element


class GlobalAvgPool(Layer):
    """Mean over all spatial positions: (N, C, H, W) -> (N, C)."""

    def forward(self, params, x, mode: Mode = TRAIN):
        return x.mean(axis=(2, 3)), x.shape

    def backward(self, params, cache, dy):
        # dy: (N, C) -> dx: (N, C, H, W), each position receiving an equal share
        xp = array_module(dy)
        h, w = cache[2:]
        return xp.broadcast_to(dy[:, :, None, None] / (h * w), cache).copy(), {}

    def out_shape(self, in_shape):
        return in_shape[:1]

    def flops(self, in_shape):
        c, h, w = in_shape
        return c * h * w

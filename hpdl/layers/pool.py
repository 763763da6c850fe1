"""Pooling over NCHW-indexed images: max pooling over k x k windows, global average pooling."""
from __future__ import annotations

from .. import kernels
from ..backend import array_module
from .base import TRAIN, Layer, Mode
from .conv import batch_inner, col2im, im2col, nchw, out_size


class MaxPool2d(Layer):
    """Max over k x k windows, stride k unless given; windows may overlap. Output batch-innermost (conv.py)."""

    def __init__(self, k: int, stride: int | None = None):
        self.k, self.stride = k, stride or k

    def forward(self, params, x, mode: Mode = TRAIN):
        # x: (N, C, H, W) -> y: (N, C, Ho, Wo). The cache starts with the path taken: disjoint
        # windows on the GPU kernels are one launch each way (kernels/maxpool.cu), with the
        # winning offsets as one uint8 per window instead of k^2 one-hot masks.
        if self.stride == self.k and kernels.on_kernel_path(x):
            y, win = kernels.maxpool_forward(x, self.k)
            return y, (True, win, x.shape)
        xp = array_module(x)
        n, c, h, w = x.shape
        k, s = self.k, self.stride
        ho, wo = out_size(h, k, s, 0), out_size(w, k, s, 0)
        if s == k:  # disjoint windows: offset o = (i, j) of every window is one strided view of x
            src = batch_inner(x)
            taps = [src[:, i:i + k * ho:k, j:j + k * wo:k] for i in range(k) for j in range(k)]
        else:       # the windows of conv's im2col: taps[o][c, a, b, n] is offset o of window (a, b)
            cols = im2col(x, k, s, 0).reshape(c, k * k, ho, wo, n)
            taps = [cols[:, o] for o in range(k * k)]
        y = xp.empty((c, ho, wo, n), dtype=x.dtype)
        y[...] = taps[0]
        for tap in taps[1:]:
            xp.maximum(y, tap, out=y)
        # One-hot winner per window: the first offset reaching the max, so that ties
        # send the whole gradient to one input, as a subgradient should.
        win = xp.empty((k * k, c, ho, wo, n), dtype=bool)
        free = xp.ones(y.shape, dtype=bool)
        for o, tap in enumerate(taps):
            xp.logical_and(tap == y, free, out=win[o])
            free &= ~win[o]
        return nchw(y), (False, win, x.shape)

    def backward(self, params, cache, dy):
        # dy: (N, C, Ho, Wo) -> dx: (N, C, H, W), nonzero only at each window's winner
        fused, win, x_shape = cache
        if fused:
            return kernels.maxpool_backward(dy, win, x_shape, self.k), {}
        xp = array_module(dy)
        n, c, h, w = x_shape
        k, s = self.k, self.stride
        g = batch_inner(dy)                                            # (C, Ho, Wo, N)
        if s != k:
            return col2im((win * g).transpose(1, 0, 2, 3, 4).reshape(c * k * k, -1), x_shape, k, s, 0), {}
        ho, wo = g.shape[1:3]
        covered = (h, w) == (k * ho, k * wo)   # else the rows and columns past the last window get 0
        dx = (xp.empty if covered else xp.zeros)((c, h, w, n), dtype=dy.dtype)
        for o in range(k * k):
            i, j = divmod(o, k)
            xp.multiply(g, win[o], out=dx[:, i:i + k * ho:k, j:j + k * wo:k])
        return nchw(dx), {}

    def out_shape(self, in_shape):
        c, h, w = in_shape
        return (c, out_size(h, self.k, self.stride, 0), out_size(w, self.k, self.stride, 0))

    def flops(self, in_shape):
        c, ho, wo = self.out_shape(in_shape)
        return c * ho * wo * self.k * self.k   # one comparison per window element


class GlobalAvgPool(Layer):
    """Mean over all spatial positions: (N, C, H, W) -> (N, C)."""

    def forward(self, params, x, mode: Mode = TRAIN):
        # The cache is x itself (held anyway as the previous layer's output), for its layout.
        return x.mean(axis=(2, 3)), x

    def backward(self, params, cache, dy):
        # dy: (N, C) -> dx: (N, C, H, W) stored as x is, each position receiving an equal share
        h, w = cache.shape[2:]
        dx = array_module(dy).empty_like(cache)
        dx[...] = dy[:, :, None, None] / (h * w)
        return dx, {}

    def out_shape(self, in_shape):
        return in_shape[:1]

    def flops(self, in_shape):
        c, h, w = in_shape
        return c * h * w

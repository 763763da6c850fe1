"""2-D convolution (NCHW) as one matrix product over im2col patches."""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from ..precision import matmul
from .base import TRAIN, Layer, Mode


def out_size(size: int, k: int, stride: int, pad: int) -> int:
    """Output length along one spatial axis."""
    return (size + 2 * pad - k) // stride + 1


def im2col(x, k: int, stride: int, pad: int):
    """Patches of x as columns: (N, C, H, W) -> (C*k*k, N*Ho*Wo).

    Rows are ordered (c, i, j) like a flattened (C, k, k) filter, columns (n, ho, wo).
    Putting the kernel offsets first makes the one copy below run along contiguous image
    rows, and lets col2im add whole (C, N, Ho, Wo) slabs at a time.
    """
    xp = array_module(x)
    n, c, h, w = x.shape
    ho, wo = out_size(h, k, stride, pad), out_size(w, k, stride, pad)
    if pad:
        x = xp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    sn, sc, sh, sw = x.strides
    # A zero-copy view (C, k, k, N, Ho, Wo): element [c, i, j, n, a, b] = x[n, c, a*s + i, b*s + j]
    patches = xp.lib.stride_tricks.as_strided(
        x, (c, k, k, n, ho, wo), (sc, sh, sw, sn, sh * stride, sw * stride))
    return patches.reshape(c * k * k, n * ho * wo)


def col2im(cols, x_shape: tuple[int, int, int, int], k: int, stride: int, pad: int):
    """The adjoint of im2col: (C*k*k, N*Ho*Wo) -> (N, C, H, W), summing overlapping patches."""
    xp = array_module(cols)
    n, c, h, w = x_shape
    ho, wo = out_size(h, k, stride, pad), out_size(w, k, stride, pad)
    cols = cols.reshape(c, k, k, n, ho, wo)
    # Accumulate channel-major so each offset adds one contiguous slab of cols.
    dx = xp.zeros((c, n, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    for i in range(k):
        for j in range(k):
            dx[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride] += cols[:, i, j]
    dx = dx[:, :, pad:pad + h, pad:pad + w]
    return xp.ascontiguousarray(dx.transpose(1, 0, 2, 3))


class Conv2d(Layer):
    trainable = ("W", "b")
    no_decay = ("b",)

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, pad: int = 0):
        self.c_in, self.c_out, self.k, self.stride, self.pad = c_in, c_out, k, stride, pad

    def init(self, rng, xp, dtype):
        # He initialization over the fan-in c_in * k * k, as for Linear.
        fan_in = self.c_in * self.k * self.k
        W = rng.standard_normal((self.c_out, self.c_in, self.k, self.k)) * np.sqrt(2.0 / fan_in)
        return {"W": xp.asarray(W, dtype=dtype), "b": xp.zeros(self.c_out, dtype=dtype)}

    def forward(self, params, x, mode: Mode = TRAIN):
        # x: (N, C_in, H, W)  W: (C_out, C_in, k, k)  b: (C_out,)  ->  y: (N, C_out, Ho, Wo)
        xp = array_module(x)
        n, _, h, w = x.shape
        ho, wo = out_size(h, self.k, self.stride, self.pad), out_size(w, self.k, self.stride, self.pad)
        cols = im2col(x, self.k, self.stride, self.pad)               # (C_in*k*k, N*Ho*Wo)
        y = matmul(params["W"].reshape(self.c_out, -1), cols)          # (C_out, N*Ho*Wo)
        y += params["b"][:, None]
        y = xp.ascontiguousarray(y.reshape(self.c_out, n, ho, wo).transpose(1, 0, 2, 3))
        return y, (cols, x.shape)

    def backward(self, params, cache, dy):
        # dy: (N, C_out, Ho, Wo) -> dx: (N, C_in, H, W), dW: (C_out, C_in, k, k), db: (C_out,)
        cols, x_shape = cache
        dy2 = dy.transpose(1, 0, 2, 3).reshape(self.c_out, -1)          # (C_out, N*Ho*Wo)
        W2 = params["W"].reshape(self.c_out, -1)                        # (C_out, C_in*k*k)
        dx = col2im(matmul(W2.T, dy2), x_shape, self.k, self.stride, self.pad)
        return dx, self._grads(params, cols, dy2)

    def param_grads(self, params, cache, dy):
        return self._grads(params, cache[0], dy.transpose(1, 0, 2, 3).reshape(self.c_out, -1))

    def _grads(self, params, cols, dy2):
        # cols: (C_in*k*k, N*Ho*Wo)  dy2: (C_out, N*Ho*Wo)
        return {"W": matmul(dy2, cols.T).reshape(params["W"].shape), "b": dy2.sum(axis=1)}

    def out_shape(self, in_shape):
        _, h, w = in_shape
        return (self.c_out, out_size(h, self.k, self.stride, self.pad),
                out_size(w, self.k, self.stride, self.pad))

    def flops(self, in_shape):
        _, ho, wo = self.out_shape(in_shape)
        return 2 * self.c_in * self.k * self.k * self.c_out * ho * wo

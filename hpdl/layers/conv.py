"""2-D convolution on NCHW-indexed arrays stored batch-innermost: im2col + one product, or Winograd F(2x2, 3x3).

Layout. Arrays are indexed (N, C, H, W) as everywhere in hpdl, but the convolution and pooling
layers store their outputs batch-innermost, (C, H, W, N) in memory, and hand on transposed
views. Every im2col copy, col2im add, pooling window and Winograd transform then walks runs of
N (or W x N) contiguous floats instead of W, and the product W @ cols lands in that layout with
no transpose. Inputs in any layout are accepted; element-wise layers keep the layout they get.
"""
from __future__ import annotations

import numpy as np

from .. import kernels
from ..backend import array_module
from ..precision import matmul
from .base import TRAIN, Layer, Mode

# Off the GPU kernels, a 3 x 3, stride-1 convolution takes the Winograd path when
# C_in C_out / (C_in + C_out) reaches this: the multiplications it saves grow as C_in x C_out,
# its transforms' memory passes as C_in + C_out. Measured on one core, batch 64, 14 x 14
# (forward + backward, ms, Winograd vs im2col): 32 -> 64 channels 10.9 vs 14.9, 16 -> 32 3.6
# vs 3.8, 8 -> 16 1.5 vs 1.2, 1 -> 32 12 vs 1.9.
WINOGRAD_MIN_WIDTH = 10

# Winograd F(2x2, 3x3) (Lavin & Gray 2016): y = A^T [(G w G^T) * (B^T d B)] A per 4 x 4 input tile d
# (stride 2) and 2 x 2 output tile. B^T and A^T are applied below as the sums their rows spell.
G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
A_T = ((1, 1, 1, 0), (0, 1, -1, -1))


def out_size(size: int, k: int, stride: int, pad: int) -> int:
    """Output length along one spatial axis."""
    return (size + 2 * pad - k) // stride + 1


def batch_inner(x):
    """(N, C, H, W) -> the (C, H, W, N) view: contiguous when x is stored batch-innermost."""
    return x.transpose(1, 2, 3, 0)


def nchw(a):
    """(C, H, W, N) -> the (N, C, H, W) view the layers hand on."""
    return a.transpose(3, 0, 1, 2)


def padded(x, pad: int, h_total: int | None = None, w_total: int | None = None):
    """x (N, C, H, W) as a zero-bordered (C, h_total, w_total, N) array, x at offset (pad, pad)."""
    xp = array_module(x)
    n, c, h, w = x.shape
    out = xp.zeros((c, h_total or h + 2 * pad, w_total or w + 2 * pad, n), dtype=x.dtype)
    out[:, pad:pad + h, pad:pad + w] = batch_inner(x)
    return out


def im2col(x, k: int, stride: int, pad: int):
    """Patches of x as columns: (N, C, H, W) -> (C*k*k, Ho*Wo*N).

    Rows are ordered (c, i, j) like a flattened (C, k, k) filter, columns (ho, wo, n): the
    product W @ cols is then (C_out, Ho, Wo, N), batch-innermost. One kernel launch on the
    GPU (kernels.im2col, reading x where it lies), im2col_xp elsewhere.
    """
    if kernels.on_kernel_path(x):
        return kernels.im2col(x, k, stride, pad, batched=False)
    return im2col_xp(x, k, stride, pad)


def im2col_xp(x, k: int, stride: int, pad: int):
    """im2col in array operations: one strided copy that walks runs of Wo x N contiguous floats."""
    n, c, h, w = x.shape
    ho, wo = out_size(h, k, stride, pad), out_size(w, k, stride, pad)
    src = padded(x, pad) if pad else batch_inner(x)
    xp = array_module(x)
    sc, sh, sw, sn = src.strides
    # A zero-copy view (C, k, k, Ho, Wo, N): element [c, i, j, a, b, n] = x[n, c, a*s + i, b*s + j]
    patches = xp.lib.stride_tricks.as_strided(
        src, (c, k, k, ho, wo, n), (sc, sh, sw, sh * stride, sw * stride, sn))
    return patches.reshape(c * k * k, ho * wo * n)


def col2im(cols, x_shape: tuple[int, int, int, int], k: int, stride: int, pad: int):
    """The adjoint of im2col: (C*k*k, Ho*Wo*N) -> (N, C, H, W) stored batch-innermost, summing
    overlaps. One kernel launch on the GPU (kernels.col2im), col2im_xp elsewhere."""
    if kernels.on_kernel_path(cols):
        return kernels.col2im(cols, x_shape, k, stride, pad, batch_inner=True)
    return col2im_xp(cols, x_shape, k, stride, pad)


def col2im_xp(cols, x_shape: tuple[int, int, int, int], k: int, stride: int, pad: int):
    """col2im in array operations: k*k strided slab additions."""
    xp = array_module(cols)
    n, c, h, w = x_shape
    ho, wo = out_size(h, k, stride, pad), out_size(w, k, stride, pad)
    cols = cols.reshape(c, k, k, ho, wo, n)
    dx = xp.zeros((c, h + 2 * pad, w + 2 * pad, n), dtype=cols.dtype)
    for i in range(k):
        for j in range(k):
            dx[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride] += cols[:, i, j]
    return nchw(dx[:, pad:pad + h, pad:pad + w])


def _taps(a, axis: int, tiles: int) -> list:
    """The 4 views of a along `axis` that 4-tap tiles at stride 2 read: tap r of tile t is a[2t + r]."""
    return [a[(slice(None),) * axis + (slice(r, r + 2 * tiles, 2),)] for r in range(4)]


def _bt(xp, d: list, out) -> None:
    """out[0..3] = B^T d along one axis: d0 - d2, d1 + d2, d2 - d1, d1 - d3."""
    xp.subtract(d[0], d[2], out=out[0])
    xp.add(d[1], d[2], out=out[1])
    xp.subtract(d[2], d[1], out=out[2])
    xp.subtract(d[1], d[3], out=out[3])


def _at(xp, m, out) -> None:
    """out[0..1] = A^T m along the first axis: m0 + m1 + m2, m1 - m2 - m3."""
    xp.add(m[0], m[1], out=out[0])
    out[0] += m[2]
    xp.subtract(m[1], m[2], out=out[1])
    out[1] -= m[3]


def _a(xp, e0, e1, out) -> None:
    """out[0..3] = A e, the adjoint of _at: e0, e0 + e1, e0 - e1, -e1."""
    out[0] = e0
    xp.add(e0, e1, out=out[1])
    xp.subtract(e0, e1, out=out[2])
    xp.negative(e1, out=out[3])


def _a_rows(xp, e0, e1, slab):
    """The rows of A e one at a time, the last without its sign: e0, e0 + e1, e0 - e1, e1 (A's is -e1).
    The two sums are written to `slab`: use each before asking for the next."""
    yield e0
    yield xp.add(e0, e1, out=slab)
    yield xp.subtract(e0, e1, out=slab)
    yield e1


def _b_add(xp, v: list, out, axis: int, tiles: int) -> None:
    """out = the overlap-add of B v along `axis` (length 2 tiles + 2): the adjoint of _taps then _bt.

    Tile t's rows 2t..2t+3 receive v0, v1 - v2 + v3, v2 + v1 - v0, -v3; even rows sum tile t's
    first and tile t-1's third, odd rows tile t's second and tile t-1's fourth.
    """
    def rows(start: int, stop: int, parity: int):
        return out[(slice(None),) * axis + (slice(2 * start + parity, 2 * stop + parity, 2),)]
    rows(0, tiles, 0)[...] = v[0]
    rows(tiles, tiles + 1, 0)[...] = 0
    even = rows(1, tiles + 1, 0)
    even += v[1]
    even += v[2]
    even -= v[0]
    odd = rows(0, tiles, 1)
    xp.subtract(v[1], v[2], out=odd)
    odd += v[3]
    rows(tiles, tiles + 1, 1)[...] = 0
    rows(1, tiles + 1, 1)[...] -= v[3]


class Conv2d(Layer):
    trainable = ("W", "b")
    no_decay = ("b",)

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, pad: int = 0, winograd: bool | None = None,
                 bias: bool = True):
        """`winograd`: force the Winograd F(2x2, 3x3) path on or off; None chooses (takes_winograd).
        `bias`: False before a BatchNorm, whose mean subtraction cancels any bias (its gradient is
        zero): the layer then skips the bias add and its sum in every pass."""
        self.c_in, self.c_out, self.k, self.stride, self.pad = c_in, c_out, k, stride, pad
        self.bias = bias
        if not bias:
            self.trainable, self.no_decay = ("W",), ()
        applies = k == 3 and stride == 1
        if winograd and not applies:
            raise ValueError(f"Winograd F(2x2, 3x3) needs a 3 x 3 kernel at stride 1, got {k} x {k} "
                             f"at stride {stride}")
        self.winograd = winograd
        self.wide = applies and c_in * c_out >= WINOGRAD_MIN_WIDTH * (c_in + c_out)

    def takes_winograd(self, x) -> bool:
        """Whether a pass over x takes the Winograd path: as forced, else where the layer is wide
        and x is off the GPU kernels. On a GPU each of Winograd's 16 products and some 40
        transform operations per pass is a launch, against im2col's one kernel and one product."""
        if self.winograd is not None:
            return self.winograd
        return self.wide and not kernels.on_kernel_path(x)

    def init(self, rng, xp, dtype):
        # He initialization over the fan-in c_in * k * k, as for Linear.
        fan_in = self.c_in * self.k * self.k
        W = rng.standard_normal((self.c_out, self.c_in, self.k, self.k)) * np.sqrt(2.0 / fan_in)
        params = {"W": xp.asarray(W, dtype=dtype)}
        if self.bias:
            params["b"] = xp.zeros(self.c_out, dtype=dtype)
        return params

    def forward(self, params, x, mode: Mode = TRAIN):
        # x: (N, C_in, H, W)  W: (C_out, C_in, k, k)  b: (C_out,)  ->  y: (N, C_out, Ho, Wo), batch-innermost
        # The cache starts with the path taken, so that backward takes the same one.
        if self.takes_winograd(x):
            y, cache = self._winograd_forward(params, x)
            return y, (True, cache)
        n, _, h, w = x.shape
        ho, wo = out_size(h, self.k, self.stride, self.pad), out_size(w, self.k, self.stride, self.pad)
        cols = im2col(x, self.k, self.stride, self.pad)               # (C_in*k*k, Ho*Wo*N)
        y = matmul(params["W"].reshape(self.c_out, -1), cols)          # (C_out, Ho*Wo*N)
        if self.bias:
            y += params["b"][:, None]
        return nchw(y.reshape(self.c_out, ho, wo, n)), (False, (cols, x.shape))

    def backward(self, params, cache, dy):
        # dy: (N, C_out, Ho, Wo) -> dx: (N, C_in, H, W), dW: (C_out, C_in, k, k), db: (C_out,)
        winograd, cache = cache
        if winograd:
            return self._winograd_backward(params, cache, dy, need_dx=True)
        cols, x_shape = cache
        dy2 = self._rows(dy)                                            # (C_out, Ho*Wo*N)
        W2 = params["W"].reshape(self.c_out, -1)                        # (C_out, C_in*k*k)
        dx = col2im(matmul(W2.T, dy2), x_shape, self.k, self.stride, self.pad)
        return dx, self._grads(params, cols, dy2)

    def param_grads(self, params, cache, dy):
        winograd, cache = cache
        if winograd:
            return self._winograd_backward(params, cache, dy, need_dx=False)[1]
        return self._grads(params, cache[0], self._rows(dy))

    def _rows(self, dy):
        """dy as (C_out, Ho*Wo*N): a view when dy is batch-innermost, as this layer's output is."""
        return array_module(dy).ascontiguousarray(batch_inner(dy)).reshape(self.c_out, -1)

    def _grads(self, params, cols, dy2):
        # cols: (C_in*k*k, Ho*Wo*N)  dy2: (C_out, Ho*Wo*N)
        grads = {"W": matmul(dy2, cols.T).reshape(params["W"].shape)}
        if self.bias:
            grads["b"] = dy2.sum(axis=1)
        return grads

    # -- Winograd F(2x2, 3x3): 2.25x fewer multiplications than im2col, in 16 products
    #    (C_out x C_in) @ (C_in x tiles), one per position of the 4 x 4 transformed tile.

    def _tiles(self, shape) -> tuple[int, int, int, int]:
        """(Ho, Wo, tile rows, tile columns) for an input of `shape` (N, C, H, W)."""
        h, w = shape[2:]
        ho, wo = out_size(h, 3, 1, self.pad), out_size(w, 3, 1, self.pad)
        return ho, wo, -(-ho // 2), -(-wo // 2)

    def _winograd_forward(self, params, x):
        xp = array_module(x)
        n = x.shape[0]
        ho, wo, th, tw = self._tiles(x.shape)
        d = padded(x, self.pad, 2 * th + 2, 2 * tw + 2)               # (C_in, 2Th+2, 2Tw+2, N)
        rows = xp.empty((4, self.c_in, th, 2 * tw + 2, n), dtype=x.dtype)
        _bt(xp, _taps(d, 1, th), rows)                                  # B^T d along rows
        V = xp.empty((4, 4, self.c_in, th, tw, n), dtype=x.dtype)
        _bt(xp, _taps(rows, 3, tw), V.transpose(1, 0, 2, 3, 4, 5))     # ... and along columns
        T = th * tw * n
        V = V.reshape(4, 4, self.c_in, T)
        U = self._filter(params["W"])                                   # (4, 4, C_out, C_in)
        # Y = A^T M A with M[a, b] = U[a, b] @ V[a, b], one row a of M at a time: its 4 products
        # (in cache) reduced along the columns, then added into the output rows with A^T's signs.
        # M itself (16 slices of C_out x T) never goes to memory.
        Y = xp.zeros((2, 2, self.c_out, T), dtype=x.dtype)
        row = xp.empty((4, self.c_out, T), dtype=x.dtype)
        part = xp.empty((2, self.c_out, T), dtype=x.dtype)
        for a in range(4):
            for b in range(4):
                matmul(U[a, b], V[a, b], out=row[b])
            _at(xp, row, part)
            for i in range(2):
                if A_T[i][a] > 0:
                    Y[i] += part
                elif A_T[i][a] < 0:
                    Y[i] -= part
        Y = Y.reshape(2, 2, self.c_out, th, tw, n)
        y = xp.empty((self.c_out, 2 * th, 2 * tw, n), dtype=x.dtype)
        for i in range(2):
            for j in range(2):
                if self.bias:
                    xp.add(Y[i, j], params["b"][:, None, None, None], out=y[:, i::2, j::2])
                else:
                    y[:, i::2, j::2] = Y[i, j]
        return nchw(y[:, :ho, :wo]), (V, U, x.shape)

    def _filter(self, W):
        """G W G^T for every (C_out, C_in) pair: (4, 4, C_out, C_in)."""
        xp = array_module(W)
        g = xp.asarray(G, dtype=W.dtype)
        return xp.einsum("ak,oikl,bl->aboi", g, W, g, optimize=True)

    def _winograd_backward(self, params, cache, dy, need_dx: bool):
        V, U, x_shape = cache
        xp = array_module(dy)
        n = x_shape[0]
        ho, wo, th, tw = self._tiles(x_shape)
        g = batch_inner(dy)                                             # (C_out, Ho, Wo, N)
        if (ho, wo) != (2 * th, 2 * tw):   # outputs past the edge of an odd size have zero gradient
            g = xp.zeros((self.c_out, 2 * th, 2 * tw, n), dtype=dy.dtype)
            g[:, :ho, :wo] = batch_inner(dy)
        # dM = A dY A^T for every tile: dY[i][j] is output (2a + i, 2b + j) of tile (a, b). A along
        # the columns first: cols[b, i] for each column position b of the transformed tile.
        T = th * tw * n
        cols = xp.empty((4, 2, self.c_out, th, tw, n), dtype=dy.dtype)
        for i in range(2):
            _a(xp, g[:, i::2, 0::2], g[:, i::2, 1::2], cols[:, i])
        cols = cols.reshape(4, 2, self.c_out, T)
        # Then along the rows, one (C_out, T) slice dM[a, b] at a time, used by both its products
        # while it is in cache: dM itself (16 such slices) never goes to memory.
        dU = xp.empty((4, 4, self.c_out, self.c_in), dtype=dy.dtype)
        dV = xp.empty((4, 4, self.c_in, T), dtype=dy.dtype) if need_dx else None
        Ut = U.transpose(0, 1, 3, 2).copy()
        Ut[3] *= -1   # _a_rows yields A's last row without its sign: the sign goes to the factors
        slab = xp.empty((self.c_out, T), dtype=dy.dtype)
        for b in range(4):
            for a, dM in enumerate(_a_rows(xp, *cols[b], slab)):
                matmul(dM, V[a, b].T, out=dU[a, b])
                if need_dx:
                    matmul(Ut[a, b], dM, out=dV[a, b])
        dU[3] *= -1
        gm = xp.asarray(G, dtype=dy.dtype)
        grads = {"W": xp.einsum("ak,aboi,bl->oikl", gm, dU, gm, optimize=True)}
        if self.bias:
            grads["b"] = g.sum(axis=(1, 2, 3))
        if not need_dx:
            return None, grads
        dV = dV.reshape(4, 4, self.c_in, th, tw, n)
        rows = xp.empty((4, self.c_in, th, 2 * tw + 2, n), dtype=dy.dtype)
        _b_add(xp, dV.transpose(1, 0, 2, 3, 4, 5), rows, 3, tw)        # columns' adjoint
        dd = xp.empty((self.c_in, 2 * th + 2, 2 * tw + 2, n), dtype=dy.dtype)
        _b_add(xp, rows, dd, 1, th)                                     # rows' adjoint
        h, w = x_shape[2:]
        return nchw(dd[:, self.pad:self.pad + h, self.pad:self.pad + w]), grads

    def out_shape(self, in_shape):
        _, h, w = in_shape
        return (self.c_out, out_size(h, self.k, self.stride, self.pad),
                out_size(w, self.k, self.stride, self.pad))

    def flops(self, in_shape):
        _, ho, wo = self.out_shape(in_shape)
        return 2 * self.c_in * self.k * self.k * self.c_out * ho * wo

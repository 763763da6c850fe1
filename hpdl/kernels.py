"""Fused CUDA kernels from kernels/*.cu, each beside the NumPy reference it must match.

Every entry point dispatches on its arguments: CuPy float32 arrays run the fused kernel;
anything else (NumPy arrays, other dtypes such as the float64 of gradient checks) runs the
`*_ref` function, written once against `xp` so it serves NumPy and CuPy alike. The `*_ref`
functions are the oracle the GPU parity tests compare against.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

from .backend import array_module

KERNEL_DIR = Path(__file__).parent.parent / "kernels"

# GELU(u) = 0.5 u (1 + tanh(k (u + c u^3))), the tanh approximation; bias_act.cu uses the same.
GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715

ELEMENTWISE_BLOCK = 256   # threads per block for the element-wise kernels
MAX_GRID = 65535          # grid.y limit; grid-stride loops cover anything beyond
SOFTMAX_MAX_BLOCK = 512   # threads per row; wider rows loop, narrower ones get fewer warps


@functools.lru_cache(maxsize=None)
def load(name: str):
    """kernels/{name}.cu as a cupy.RawModule; NVRTC compiles it on first use, once per process."""
    import cupy

    code = (KERNEL_DIR / f"{name}.cu").read_text()
    return cupy.RawModule(code=code, options=("-std=c++17",))


def _use_kernel(*arrays) -> bool:
    """The kernels exist for CuPy float32 only; every other case takes the reference path."""
    return all(array_module(a) is not np and a.dtype == np.float32 for a in arrays)


def _out(out, like):
    """A fresh result array like `like`, or the caller's `out` (may be an input: in place)."""
    if out is None:
        return array_module(like).empty_like(like)
    if out.shape != like.shape or out.dtype != like.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous {like.dtype} {like.shape}, "
                         f"got {out.dtype} {out.shape}")
    return out


def _check_bias(x, b) -> None:
    if x.ndim != 2 or b.shape != (x.shape[1],):
        raise ValueError(f"expected x (B, N) and b (N,), got {x.shape} and {b.shape}")


def _grid_rows_cols(B: int, N: int) -> tuple[int, int]:
    # x: column tiles of one block's width; y: one row per block up to the grid limit.
    return (max(1, math.ceil(N / ELEMENTWISE_BLOCK)), max(1, min(B, MAX_GRID)))


def _grid_flat(n: int) -> tuple[int]:
    return (max(1, min(math.ceil(n / ELEMENTWISE_BLOCK), MAX_GRID)),)


# ---- bias + ReLU ---------------------------------------------------------------------------

def bias_relu_forward_ref(x, b, out=None):
    """y = max(x + b, 0).  x: (B, N)  b: (N,)  ->  y: (B, N), written to `out` if given."""
    xp = array_module(x)
    y = xp.add(x, b, out=out)
    return xp.maximum(y, 0, out=y)


def bias_relu_backward_ref(y, dy, out=None):
    """dx = dy * (y > 0): the forward output is its own mask.  y, dy, dx: same shape."""
    return array_module(dy).multiply(dy, y > 0, out=out)


def bias_relu_forward(x, b, out=None):
    """y = max(x + b, 0); out=x computes it in place."""
    _check_bias(x, b)
    if not _use_kernel(x, b):
        return bias_relu_forward_ref(x, b, out)
    cp = array_module(x)
    x, b = cp.ascontiguousarray(x), cp.ascontiguousarray(b)
    y = _out(out, x)
    B, N = x.shape
    load("bias_act").get_function("bias_relu_forward")(
        _grid_rows_cols(B, N), (ELEMENTWISE_BLOCK,), (x, b, y, np.int32(B), np.int32(N)))
    return y


def bias_relu_backward(y, dy, out=None):
    """dx = dy * (y > 0), y the forward output; out=dy computes it in place."""
    if y.shape != dy.shape:
        raise ValueError(f"y {y.shape} and dy {dy.shape} differ")
    if not _use_kernel(y, dy):
        return bias_relu_backward_ref(y, dy, out)
    cp = array_module(y)
    y, dy = cp.ascontiguousarray(y), cp.ascontiguousarray(dy)
    dx = _out(out, dy)
    load("bias_act").get_function("bias_relu_backward")(
        _grid_flat(dy.size), (ELEMENTWISE_BLOCK,), (y, dy, dx, np.uint64(dy.size)))
    return dx


# ---- bias + GELU ---------------------------------------------------------------------------

def bias_gelu_forward_ref(x, b, out=None):
    """u = x + b, y = GELU(u).  x: (B, N)  b: (N,)  ->  (y, u), both (B, N); u is the cache."""
    xp = array_module(x)
    u = x + b
    t = xp.tanh(GELU_K * (u + GELU_C * u * u * u))
    return xp.multiply(0.5 * u, 1 + t, out=out), u


def bias_gelu_backward_ref(u, dy, out=None):
    """dx = dy * GELU'(u), u the pre-activation the forward pass returned."""
    xp = array_module(u)
    t = xp.tanh(GELU_K * (u + GELU_C * u * u * u))
    dgelu = 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * GELU_K * (1 + 3 * GELU_C * u * u)
    return xp.multiply(dy, dgelu, out=out)


def bias_gelu_forward(x, b, out=None):
    """(y, u) with u = x + b, y = GELU(u); y goes to `out` if given."""
    _check_bias(x, b)
    if not _use_kernel(x, b):
        return bias_gelu_forward_ref(x, b, out)
    cp = array_module(x)
    x, b = cp.ascontiguousarray(x), cp.ascontiguousarray(b)
    y, u = _out(out, x), cp.empty_like(x)
    B, N = x.shape
    load("bias_act").get_function("bias_gelu_forward")(
        _grid_rows_cols(B, N), (ELEMENTWISE_BLOCK,), (x, b, u, y, np.int32(B), np.int32(N)))
    return y, u


def bias_gelu_backward(u, dy, out=None):
    """dx = dy * GELU'(u); out=dy computes it in place."""
    if u.shape != dy.shape:
        raise ValueError(f"u {u.shape} and dy {dy.shape} differ")
    if not _use_kernel(u, dy):
        return bias_gelu_backward_ref(u, dy, out)
    cp = array_module(u)
    u, dy = cp.ascontiguousarray(u), cp.ascontiguousarray(dy)
    dx = _out(out, dy)
    load("bias_act").get_function("bias_gelu_backward")(
        _grid_flat(dy.size), (ELEMENTWISE_BLOCK,), (u, dy, dx, np.uint64(dy.size)))
    return dx


# ---- softmax cross-entropy -----------------------------------------------------------------

def softmax_xent_ref(logits, labels, dloss=1.0):
    """Mean cross-entropy of softmax(logits) and its gradient, scaled by dloss.

    logits: (B, C)  labels: (B,) ints in [0, C)  ->  (loss_mean, dlogits (B, C))
    dlogits = (softmax(logits) - onehot(labels)) * dloss / B
    """
    xp = array_module(logits)
    B = logits.shape[0]
    rows = xp.arange(B)
    z = logits - logits.max(axis=1, keepdims=True)  # the shift keeps exp() from overflowing
    logp = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))
    dlogits = xp.exp(logp)
    dlogits[rows, labels] -= 1
    dlogits *= dloss / B
    return -logp[rows, labels].mean(), dlogits


def softmax_xent(logits, labels, dloss=1.0):
    """(loss_mean, dlogits) as softmax_xent_ref, fused into one kernel launch on the GPU.

    On the GPU loss_mean is a 0-d device array (no host sync); a label outside [0, C)
    makes the loss and that row's gradient NaN.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (B, C) and labels (B,), got {logits.shape} and {labels.shape}")
    if not _use_kernel(logits):
        return softmax_xent_ref(logits, labels, dloss)
    cp = array_module(logits)
    logits = cp.ascontiguousarray(logits)
    labels = cp.ascontiguousarray(labels, dtype=cp.int32)
    B, C = logits.shape
    loss, dlogits = cp.empty(B, dtype=cp.float32), cp.empty_like(logits)
    block = min(SOFTMAX_MAX_BLOCK, 32 * math.ceil(C / 32))  # whole warps: the reduction needs them
    load("softmax_xent").get_function("softmax_xent")(
        (B,), (block,), (logits, labels, loss, dlogits, np.int32(C), np.float32(dloss / B)))
    return loss.mean(), dlogits

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
NVRTC_OPTIONS = ("-std=c++17",)   # cupy.RawModule adds the architecture, -ftz=true and its own


@functools.lru_cache(maxsize=None)
def load(name: str):
    """kernels/{name}.cu as a cupy.RawModule; NVRTC compiles it on first use, once per process."""
    import cupy

    code = (KERNEL_DIR / f"{name}.cu").read_text()
    return cupy.RawModule(code=code, options=NVRTC_OPTIONS)


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
    """y = u (u > 0), u = x + b: hpdl's ReLU of the biased x (a NaN or -Inf u gives NaN).
    x: (B, N)  b: (N,)  ->  y: (B, N), written to `out` if given."""
    xp = array_module(x)
    y = xp.add(x, b, out=out)
    return xp.multiply(y, y > 0, out=y)


def bias_relu_backward_ref(y, dy, out=None):
    """dx = dy * (y > 0): the forward output is its own mask.  y, dy, dx: same shape."""
    return array_module(dy).multiply(dy, y > 0, out=out)


def bias_relu_forward(x, b, out=None):
    """bias_relu_forward_ref in one launch on the GPU; out=x computes it in place."""
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


def relu_forward(x):
    """x (x > 0) (bias_relu_forward_ref without the bias), stored as x is: one launch on the GPU
    whenever x is dense in some axis order, where a CuPy ufunc would write a C-ordered result."""
    if not _use_kernel(x) or not _dense_alike(x):
        return x * (x > 0)
    y = _empty_as(x)
    load("bias_act").get_function("relu_forward")(
        _grid_flat(x.size), (ELEMENTWISE_BLOCK,), (x, y, np.uint64(x.size)))
    return y


def bias_relu_backward(y, dy, out=None):
    """dx = dy * (y > 0), y the forward output; out=dy computes it in place.

    On the GPU one launch whenever y, dy (and out) share one dense layout, whatever its axis
    order: conv's batch-innermost activations as well as C-contiguous ones, with no copy.
    """
    return _activation_backward(lambda: load("bias_act").get_function("bias_relu_backward"), bias_relu_backward_ref,
                                y, dy, out)


def _activation_backward(kernel, ref, a, dy, out):
    """dx = dy * f'(.) from the forward's cached array `a` (y for ReLU, u for GELU): `kernel()`'s
    one launch whenever a, dy (and out) share one dense layout, `ref` otherwise. `kernel` is a thunk:
    loading it needs CuPy, which the reference path does without."""
    if a.shape != dy.shape:
        raise ValueError(f"the cached {a.shape} and dy {dy.shape} differ")
    if not _use_kernel(a, dy) or not _dense_alike(a, dy, *_given(out)):
        return ref(a, dy, out)
    dx = _empty_as(dy) if out is None else out
    kernel()(_grid_flat(dy.size), (ELEMENTWISE_BLOCK,), (a, dy, dx, np.uint64(dy.size)))
    return dx


def _steps(a) -> tuple[int, ...]:
    """a's strides along its axes of more than one element, by which layouts compare: nothing
    steps along a one-element axis, so its stride is arbitrary (a batch of one has a float's 4
    bytes there when stored batch-innermost, a whole sample's bytes when C-ordered)."""
    return tuple(st for st, n in zip(a.strides, a.shape) if n != 1)


def _dense_alike(*arrays) -> bool:
    """Whether the arrays share shape, dtype and layout (_steps), and that layout covers their
    memory without gaps or overlaps (C order or any permutation of it): an element-wise kernel may
    then walk them as flat vectors from their first elements."""
    first = arrays[0]
    if any((a.shape, a.dtype, _steps(a)) != (first.shape, first.dtype, _steps(first)) for a in arrays):
        return False
    expected = first.itemsize
    for stride, size in sorted(zip(_steps(first), (n for n in first.shape if n != 1))):
        if stride != expected:
            return False
        expected *= size
    return True


def _empty_as(x):
    """An uninitialized array with x's shape, dtype and layout (_steps), x dense in some axis order
    (_dense_alike)."""
    order = sorted(range(x.ndim), key=lambda i: -x.strides[i])   # memory order, outermost first
    base = array_module(x).empty(tuple(x.shape[i] for i in order), dtype=x.dtype)
    return base.transpose(tuple(order.index(i) for i in range(x.ndim)))


# ---- bias + GELU ---------------------------------------------------------------------------

def gelu_ref(u, out=None):
    """GELU(u) = u Phi(u), with Phi(u) ~ (1 + tanh(k (u + c u^3))) / 2; written to `out` if given."""
    xp = array_module(u)
    t = xp.tanh(GELU_K * (u + GELU_C * u * u * u))
    return xp.multiply(0.5 * u, 1 + t, out=out)


def bias_gelu_forward_ref(x, b, out=None):
    """u = x + b, y = GELU(u).  x: (B, N)  b: (N,)  ->  (y, u), both (B, N); u is the cache."""
    u = x + b
    return gelu_ref(u, out), u


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
    """dx = dy * GELU'(u); out=dy computes it in place. On the GPU one launch whenever u, dy (and
    out) share one dense layout, as bias_relu_backward."""
    return _activation_backward(lambda: load("bias_act").get_function("bias_gelu_backward"), bias_gelu_backward_ref,
                                u, dy, out)


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


def float32_allowance(ref32, ref64, abs_sum=0.0):
    """The error against the float64 reference a float32 kernel may have, per element: twice
    the float32 reference's own largest error, plus 8 float32 ulps of the largest magnitude,
    plus 8 eps sum|t| where an output is a sum of terms t (abs_sum: sum|t| per output).

    This is the contract of the kernels that reduce (norms, sums of squares): they add in a
    different order from NumPy's pairwise sums, so they must be as accurate as NumPy float32
    rather than equal to it. A sum's rounding error in an order whose last additions form a
    tree is of order eps sum|t|, whichever order that is.
    """
    ref32, ref64 = (np.asarray(a, dtype=np.float64) for a in (ref32, ref64))
    eps = float(np.finfo(np.float32).eps)
    largest = np.abs(ref64).max(initial=0.0)
    return 2 * np.abs(ref32 - ref64).max(initial=0.0) + 8 * eps * (largest + np.asarray(abs_sum, dtype=np.float64))


# ---- optimizer updates: kernels/optim_update.cu --------------------------------------------
#
# In place: SGD and AdamW on lists of tensors (a model's, in one launch), the server rules on
# one flat vector per call. The kernels round every operation as NumPy does, in the same
# order, and their float32 coefficients are rounded here from the same Python doubles the
# NumPy code multiplies by: kernel and reference agree bit for bit.

def _check_same(*arrays) -> None:
    shapes = {a.shape for a in arrays if a is not None}
    if len(shapes) > 1:
        raise ValueError(f"arrays must share one shape, got {' and '.join(map(str, sorted(shapes)))}")


def _written(*arrays) -> None:
    """A kernel's in-place arrays must be C-contiguous: a contiguous copy would take the writes."""
    for a in arrays:
        if a is not None and not a.flags.c_contiguous:
            raise ValueError(f"arrays updated in place must be C-contiguous, got strides {a.strides}")


def _address(a) -> int:
    """The device address of a CuPy array's first element."""
    return a.data.ptr


_NO_HALT: dict = {}   # a zero halt flag per array module and device, for updates nobody halts


def _halt(halt, w):
    """The update kernels' halt flag: the caller's, or a shared zero on w's device."""
    if halt is not None:
        if halt.shape != (1,) or halt.dtype != np.float32:
            raise ValueError(f"halt must be a float32 array of shape (1,), got {halt.dtype} {halt.shape}")
        return halt
    xp = array_module(w)
    key = (xp.__name__, -1 if xp is np else xp.cuda.Device().id)
    if key not in _NO_HALT:
        _NO_HALT[key] = xp.zeros(1, dtype=np.float32)
    return _NO_HALT[key]


def _given(*arrays) -> list:
    """The arrays that are not None."""
    return [a for a in arrays if a is not None]


def _halted(halt) -> bool:
    """The reference path's reading of a halt flag (a host read where the flag is on a GPU)."""
    return halt is not None and bool(halt[0] != 0)


def _launch_flat(kernel, n: int, *args) -> None:
    """Run an element-wise kernel over n elements with a grid-stride launch."""
    kernel(_grid_flat(n), (ELEMENTWISE_BLOCK,), args)


def _check_tensors(what: str, arrays: list, values: list) -> None:
    """Per-tensor lists must have one entry per tensor: `arrays` one array of one shape each,
    `values` one number each."""
    count = len(arrays[0])
    for column in (*arrays, *values):
        if len(column) != count:
            raise ValueError(f"{what}: lists of {count} and {len(column)} tensors")
    for row in zip(*arrays):
        _check_same(*row)


# One row per tensor of sgd_update's and adamw_update's tables: struct SgdRow and struct
# AdamwRow in kernels/optim_update.cu, field for field.
SGD_ROW = np.dtype([("w", "u8"), ("g", "u8"), ("buf", "u8"), ("n", "u8"), ("first_block", "u8"),
                    ("lr", "f4"), ("wd", "f4"), ("first", "i4"), ("unused", "i4")])
ADAMW_ROW = np.dtype([("w", "u8"), ("g", "u8"), ("m", "u8"), ("v", "u8"), ("n", "u8"), ("first_block", "u8"),
                      ("decay", "f4"), ("step_size", "f4"), ("apply_decay", "i4"), ("unused", "i4")])


def _table(row: np.dtype, arrays: dict[str, list]) -> tuple[np.ndarray, int]:
    """(rows, blocks): a table of `row`s with the addresses of `arrays` (field -> one array per
    tensor) and each tensor's share of the ELEMENTWISE_BLOCK-thread blocks, `blocks` in all."""
    sizes = np.array([a.size for a in arrays["w"]], dtype=np.int64)
    rows = np.zeros(len(sizes), dtype=row)
    for field, column in arrays.items():
        rows[field] = [_address(a) for a in column]
    per_tensor = -(-sizes // ELEMENTWISE_BLOCK)
    rows["n"], rows["first_block"] = sizes, np.cumsum(per_tensor) - per_tensor
    return rows, int(per_tensor.sum())


def _launch_table(kernel, rows: np.ndarray, blocks: int, like, *args) -> None:
    """Run a kernel over a table of tensors (_table): the rows go to `like`'s device in one copy."""
    if blocks == 0:
        return
    table = array_module(like).asarray(rows.view(np.uint8))
    kernel((min(blocks, MAX_GRID),), (ELEMENTWISE_BLOCK,), (table, np.int32(len(rows)), np.uint64(blocks), *args))


def sgd_update_ref(ws, gs, lrs, wds, momentum: float = 0.0, nesterov: bool = False,
                   bufs=None, firsts=None, halt=None) -> None:
    """One step of hpdl.optim.SGD on each tensor w of `ws`, in place on w and its buffer:

        d = w wd + g  (wd != 0);  buf = d on its first step, else buf mu + d;
        d = buf mu + d  (Nesterov)  or  d = buf;  w -= lr d

    ws, gs, lrs, wds (and bufs, firsts where momentum != 0): one entry per tensor; bufs are
    the momentum buffers, overwritten where `firsts` is true.
    halt: None, or a float32 flag of shape (1,); non-zero leaves every array as it is.
    """
    if _halted(halt):
        return
    for k, (w, g, lr, wd) in enumerate(zip(ws, gs, lrs, wds)):
        d = g
        if wd:
            d = w * wd
            d += g
        if momentum:
            buf = bufs[k]
            if firsts[k]:
                buf[...] = d
            else:
                buf *= momentum
                buf += d
            if nesterov:
                ahead = buf * momentum
                ahead += d
                d = ahead
            else:
                d = buf
        w -= lr * d


def sgd_update(ws, gs, lrs, wds, momentum: float = 0.0, nesterov: bool = False,
               bufs=None, firsts=None, halt=None) -> None:
    """sgd_update_ref in one kernel launch on the GPU, however many tensors."""
    if momentum and (bufs is None or firsts is None):
        raise ValueError("SGD with momentum needs its buffers: pass bufs and firsts")
    bufs = bufs if momentum else None
    _check_tensors("sgd_update", [ws, gs, *([bufs] if momentum else [])],
                   [lrs, wds, *([firsts] if momentum else [])])
    if not ws:
        return
    if not _use_kernel(*ws, *gs, *(bufs or ()), *_given(halt)):
        return sgd_update_ref(ws, gs, lrs, wds, momentum, nesterov, bufs, firsts, halt)
    _written(*ws, *(bufs or ()))
    xp = array_module(ws[0])
    # The contiguous copies stay referenced in `gs` until the launch is queued.
    gs = [xp.ascontiguousarray(g) for g in gs]
    rows, blocks = _table(SGD_ROW, {"w": ws, "g": gs, "buf": bufs or ws})
    rows["lr"], rows["wd"] = lrs, wds
    rows["first"] = firsts if momentum else 0
    _launch_table(load("optim_update").get_function("sgd_update"), rows, blocks, ws[0],
                  np.float32(momentum), np.int32(nesterov), _halt(halt, ws[0]))


def adamw_update_ref(ws, gs, ms, vs, lrs, step: int, wds, betas: tuple[float, float] = (0.9, 0.999),
                     eps: float = 1e-8, halt=None) -> None:
    """One step of hpdl.optim.AdamW at step t = `step` (1 on the first) on each tensor w of
    `ws`, in place on w and its moments m, v:

        w *= 1 - lr wd;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
        w -= lr / (1-b1^t) * m / (sqrt(v) / sqrt(1-b2^t) + eps)

    ws, gs, ms, vs, lrs, wds: one entry per tensor.  halt: as for sgd_update_ref.
    """
    if _halted(halt):
        return
    b1, b2 = betas
    for w, g, m, v, lr, wd in zip(ws, gs, ms, vs, lrs, wds):
        xp = array_module(w)
        if wd:
            w *= 1.0 - lr * wd
        s = g * (1.0 - b1)
        m *= b1
        m += s
        xp.multiply(g, g, out=s)
        s *= 1.0 - b2
        v *= b2
        v += s
        xp.sqrt(v, out=s)
        s /= math.sqrt(1.0 - b2 ** step)
        s += eps
        xp.divide(m, s, out=s)
        s *= lr / (1.0 - b1 ** step)
        w -= s


def adamw_update(ws, gs, ms, vs, lrs, step: int, wds, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, halt=None) -> None:
    """adamw_update_ref in one kernel launch on the GPU (12 CuPy launches per tensor in the reference)."""
    if step < 1:
        raise ValueError(f"AdamW steps count from 1, got {step}")
    _check_tensors("adamw_update", [ws, gs, ms, vs], [lrs, wds])
    if not ws:
        return
    if not _use_kernel(*ws, *gs, *ms, *vs, *_given(halt)):
        return adamw_update_ref(ws, gs, ms, vs, lrs, step, wds, betas, eps, halt)
    _written(*ws, *ms, *vs)
    xp = array_module(ws[0])
    gs = [xp.ascontiguousarray(g) for g in gs]   # referenced until the launch is queued
    rows, blocks = _table(ADAMW_ROW, {"w": ws, "g": gs, "m": ms, "v": vs})
    b1, b2 = betas
    rows["decay"] = [1.0 - lr * wd for lr, wd in zip(lrs, wds)]
    rows["step_size"] = [lr / (1.0 - b1 ** step) for lr in lrs]
    rows["apply_decay"] = [bool(wd) for wd in wds]
    f = np.float32
    _launch_table(load("optim_update").get_function("adamw_update"), rows, blocks, ws[0],
                  f(b1), f(1.0 - b1), f(b2), f(1.0 - b2), f(math.sqrt(1.0 - b2 ** step)), f(eps), _halt(halt, ws[0]))


def dcasgd_update_ref(w, backup, g, lr: float, lambda_dc: float, ms=None,
                      ms_decay: float | None = None, eps_dc: float | None = None) -> None:
    """The DC-ASGD server's update for a gradient g from worker m, as
    hpdl.algorithms.dcasgd's servers' `apply`, in place on w, backup (= w_bak(m)) and ms:

        t = (w - w_bak) g g;  DC-ASGD-a (ms given): ms = decay ms + (1-decay) g^2,
        t = t / sqrt(ms + eps_dc);  w -= lr (lambda t + g);  w_bak = w  (the reply)

    ms is None for DC-ASGD-c (constant lambda), else worker m's mean-square row.
    """
    xp = array_module(w)
    t = w - backup
    t *= g
    t *= g
    if ms is not None:
        ms *= ms_decay
        s = g * g
        s *= 1.0 - ms_decay
        ms += s
        xp.add(ms, eps_dc, out=s)
        xp.sqrt(s, out=s)
        t /= s
    t *= lambda_dc
    t += g
    t *= lr
    w -= t
    backup[...] = w


def dcasgd_update(w, backup, g, lr: float, lambda_dc: float, ms=None,
                  ms_decay: float | None = None, eps_dc: float | None = None) -> None:
    """dcasgd_update_ref in one kernel launch on the GPU."""
    if ms is not None and (ms_decay is None or eps_dc is None):
        raise ValueError("DC-ASGD-a (ms given) needs ms_decay and eps_dc")
    _check_same(w, backup, g, ms)
    if not _use_kernel(*_given(w, backup, g, ms)):
        return dcasgd_update_ref(w, backup, g, lr, lambda_dc, ms, ms_decay, eps_dc)
    _written(w, backup, ms)
    g = array_module(g).ascontiguousarray(g)
    adaptive = ms is not None
    _launch_flat(load("optim_update").get_function("dcasgd_update"),
                 w.size, w, backup, g, ms if adaptive else w, np.uint64(w.size),
                 np.float32(lr), np.float32(lambda_dc), np.int32(adaptive),
                 np.float32(ms_decay if adaptive else 0.0),
                 np.float32(1.0 - ms_decay if adaptive else 0.0),
                 np.float32(eps_dc if adaptive else 0.0))


def easgd_elastic_ref(center, x, alpha: float, out=None):
    """Asynchronous EASGD's centre step, as hpdl.algorithms.easgd.EasgdServer, in place:

        e = alpha (x - center);  center += e;  returns e (the reply), written to `out` if given
    """
    e = array_module(center).subtract(x, center, out=out)
    e *= alpha
    center += e
    return e


def easgd_elastic(center, x, alpha: float, out=None):
    """easgd_elastic_ref in one kernel launch on the GPU."""
    _check_same(center, x, out)
    if not _use_kernel(center, x):
        return easgd_elastic_ref(center, x, alpha, out)
    _written(center)
    x = array_module(x).ascontiguousarray(x)
    e = _out(out, center)
    _launch_flat(load("optim_update").get_function("easgd_elastic"),
                 center.size, center, x, e, np.uint64(center.size), np.float32(alpha))
    return e


def easgd_sync_worker_ref(x, center, g, lr: float, rho: float) -> None:
    """Synchronous EASGD (ALGORITHMS.md §5), one replica's half, in place:

        x_i <- x_i - lr (g_i + rho (x_i - x~))

    `center` is x~ before this step (every replica holds the same copy).
    """
    d = x - center
    d *= float(rho)
    d += g
    d *= float(lr)
    x -= d


def easgd_sync_worker(x, center, g, lr: float, rho: float) -> None:
    """easgd_sync_worker_ref in one kernel launch on the GPU."""
    _check_same(x, center, g)
    if not _use_kernel(x, center, g):
        return easgd_sync_worker_ref(x, center, g, lr, rho)
    _written(x)
    cp = array_module(x)
    center, g = cp.ascontiguousarray(center), cp.ascontiguousarray(g)
    _launch_flat(load("optim_update").get_function("easgd_sync_worker"),
                 x.size, x, center, g, np.uint64(x.size),
                 np.float32(lr), np.float32(rho))


def easgd_sync_center_ref(center, x_sum, n_workers: int, lr: float, rho: float) -> None:
    """Synchronous EASGD (ALGORITHMS.md §5), the centre's half, in place:

        x~ <- x~ + lr rho sum_i (x_i - x~),  with sum_i (x_i - x~) = x_sum - N x~,

    where `x_sum` is the allreduced sum of the replicas' x_i taken BEFORE this step's
    `easgd_sync_worker`, and `center` is still x~ of before the step. Every replica calls
    it with the same allreduced sum, so their copies of x~ stay identical. The coupling
    beta = N lr rho = 0.9 of §5 means rho = 0.9 / (N lr).
    """
    d = center * -float(n_workers)
    d += x_sum
    d *= float(lr) * float(rho)
    center += d


def easgd_sync_center(center, x_sum, n_workers: int, lr: float, rho: float) -> None:
    """easgd_sync_center_ref in one kernel launch on the GPU."""
    _check_same(center, x_sum)
    if not _use_kernel(center, x_sum):
        return easgd_sync_center_ref(center, x_sum, n_workers, lr, rho)
    _written(center)
    x_sum = array_module(x_sum).ascontiguousarray(x_sum)
    _launch_flat(load("optim_update").get_function("easgd_sync_center"),
                 center.size, center, x_sum, np.uint64(center.size),
                 np.float32(-float(n_workers)), np.float32(float(lr) * float(rho)))


# ---- LayerNorm and BatchNorm: kernels/norm.cu ----------------------------------------------

NORM_MAX_BLOCK = 512     # threads per row or channel; longer ones loop
COLUMN_CHUNK_ROWS = 32   # rows per partial sum of the LayerNorm parameter gradients
MAX_COLUMN_CHUNKS = 1024


def _norm_block(n: int) -> int:
    return min(NORM_MAX_BLOCK, 32 * math.ceil(max(n, 1) / 32))  # whole warps: block_sum needs them


def layernorm_forward_ref(x, gamma, beta, eps: float = 1e-5):
    """LayerNorm.forward over the last axis.  x: (..., n)  gamma, beta: (n,)

        xc = x - mean(x);  rstd = 1 / sqrt(mean(xc^2) + eps);  xhat = xc rstd;
        y = xhat gamma + beta   ->  (y, xhat, rstd), rstd shaped (..., 1) as the layer's cache
    """
    xp = array_module(x)
    xc = x - x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    xhat = xc * rstd
    return xhat * gamma + beta, xhat, rstd


def layernorm_backward_ref(dy, xhat, rstd, gamma):
    """LayerNorm.backward.  dy, xhat: (..., n)  rstd: (..., 1)  ->  (dx, dgamma, dbeta)

        dxhat = dy gamma;  dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat));
        dgamma = sum of dy xhat, dbeta = sum of dy, over every axis but the last
    """
    dxhat = dy * gamma
    mean_d = dxhat.mean(axis=-1, keepdims=True)
    mean_dx = (dxhat * xhat).mean(axis=-1, keepdims=True)
    dx = rstd * (dxhat - mean_d - xhat * mean_dx)
    n = gamma.shape[0]
    dy2, xhat2 = dy.reshape(-1, n), xhat.reshape(-1, n)
    return dx, (dy2 * xhat2).sum(axis=0), dy2.sum(axis=0)


def _check_norm(x, gamma, beta, axis: int) -> None:
    if x.ndim < 2 or gamma.shape != (x.shape[axis],) or (beta is not None and beta.shape != gamma.shape):
        raise ValueError(f"expected x with {x.shape[axis] if x.ndim >= 2 else '?'} features on axis "
                         f"{axis} and gamma, beta of that length, got x {x.shape}, gamma {gamma.shape}")


def layernorm_forward(x, gamma, beta, eps: float = 1e-5):
    """layernorm_forward_ref, one block per row on the GPU."""
    _check_norm(x, gamma, beta, -1)
    if not _use_kernel(x, gamma, beta):
        return layernorm_forward_ref(x, gamma, beta, eps)
    cp = array_module(x)
    x, gamma, beta = cp.ascontiguousarray(x), cp.ascontiguousarray(gamma), cp.ascontiguousarray(beta)
    n = x.shape[-1]
    R = x.size // n
    y, xhat = cp.empty_like(x), cp.empty_like(x)
    rstd = cp.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    load("norm").get_function("layernorm_forward")(
        (max(1, min(R, MAX_GRID)),), (_norm_block(n),),
        (x, gamma, beta, y, xhat, rstd, np.int32(R), np.int32(n), np.float32(eps)))
    return y, xhat, rstd


def layernorm_backward(dy, xhat, rstd, gamma):
    """layernorm_backward_ref on the GPU: one block per row for dx, two launches for dgamma, dbeta."""
    _check_norm(dy, gamma, None, -1)
    _check_same(dy, xhat)
    if rstd.shape != dy.shape[:-1] + (1,):
        raise ValueError(f"rstd must be {dy.shape[:-1] + (1,)}, got {rstd.shape}")
    if not _use_kernel(dy, xhat, rstd, gamma):
        return layernorm_backward_ref(dy, xhat, rstd, gamma)
    cp = array_module(dy)
    dy, xhat, rstd, gamma = (cp.ascontiguousarray(a) for a in (dy, xhat, rstd, gamma))
    n = dy.shape[-1]
    R = dy.size // n
    dx = cp.empty_like(dy)
    load("norm").get_function("layernorm_backward")(
        (max(1, min(R, MAX_GRID)),), (_norm_block(n),),
        (dy, xhat, rstd, gamma, dx, np.int32(R), np.int32(n)))
    chunks = max(1, min(math.ceil(R / COLUMN_CHUNK_ROWS), MAX_COLUMN_CHUNKS))
    rows_per_chunk = max(1, math.ceil(R / chunks))
    partial = cp.empty((chunks, 2, n), dtype=dy.dtype)
    load("norm").get_function("column_sums_partial")(
        (max(1, min(math.ceil(n / ELEMENTWISE_BLOCK), MAX_GRID)), chunks), (ELEMENTWISE_BLOCK,),
        (dy, xhat, partial, np.int32(R), np.int32(n), np.int32(rows_per_chunk)))
    sums = cp.empty(2 * n, dtype=dy.dtype)
    load("norm").get_function("column_sums_finish")(
        _grid_flat(2 * n), (ELEMENTWISE_BLOCK,), (partial, sums, np.int32(chunks), np.int32(2 * n)))
    return dx, sums[:n], sums[n:]


def _channel_shape(x) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)   # broadcasts (C,) against x


def batchnorm_forward_ref(x, gamma, beta, running_mean, running_var, eps: float = 1e-5,
                          momentum: float = 0.1):
    """BatchNorm.forward in training mode.  x: (N, C) or (N, C, H, W)  gamma, beta: (C,)

    Per channel, over the M = N H W values: xc = x - mean;  var = mean(xc^2);
    rstd = 1 / sqrt(var + eps);  xhat = xc rstd;  y = xhat gamma + beta;  and in place
    running_mean = (1-m) running_mean + m mean,  running_var = (1-m) running_var + m M/(M-1) var.
    Returns (y, xhat, rstd), rstd shaped (1, C, 1, 1) (or (1, C)) as the layer's cache.
    """
    xp = array_module(x)
    axes = (0,) + tuple(range(2, x.ndim))
    as_channel = _channel_shape(x)
    mean = x.mean(axis=axes, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(axis=axes, keepdims=True)
    count = x.size // x.shape[1]
    unbiased = count / max(count - 1, 1)
    running_mean *= 1.0 - momentum
    running_mean += momentum * mean.reshape(-1)
    running_var *= 1.0 - momentum
    running_var += (momentum * unbiased) * var.reshape(-1)
    rstd = 1.0 / xp.sqrt(var + eps)
    xhat = xc * rstd
    return xhat * gamma.reshape(as_channel) + beta.reshape(as_channel), xhat, rstd


def batchnorm_backward_ref(dy, xhat, rstd, gamma):
    """BatchNorm.backward in training mode.  dy, xhat: (N, C[, H, W])  ->  (dx, dgamma, dbeta)

        dxhat = dy gamma;  dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat));
        dgamma = sum of dy xhat, dbeta = sum of dy;  means and sums per channel
    """
    axes = (0,) + tuple(range(2, dy.ndim))
    dxhat = dy * gamma.reshape(_channel_shape(dy))
    mean_d = dxhat.mean(axis=axes, keepdims=True)
    mean_dx = (dxhat * xhat).mean(axis=axes, keepdims=True)
    dx = rstd * (dxhat - mean_d - xhat * mean_dx)
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def _nc_s(x) -> tuple[int, int, int]:
    """(N, C, S): x seen as (N, C, S), S = H W (1 for (N, C))."""
    n, c = x.shape[:2]
    return n, c, x.size // max(n * c, 1)


def _channel_layout(x) -> tuple[int, int, int] | None:
    """norm.cu's (c_stride, run, run_stride), in elements, for x (N, C, ...) stored C-ordered (NCHW)
    or channel-major with each channel's values dense (conv's batch-innermost (C, H, W, N)); None
    for any other layout."""
    n, c, s = _nc_s(x)
    if x.flags.c_contiguous:
        return s, s, c * s
    if (c == 1 or x.strides[1] == n * s * x.itemsize) and _dense_alike(x):
        return n * s, n * s, 0
    return None


def _in_channel_layout(x):
    """(x, its _channel_layout): x itself where the kernels walk its layout, else a C-ordered copy."""
    layout = _channel_layout(x)
    if layout is None:
        x = array_module(x).ascontiguousarray(x)
        layout = _channel_layout(x)
    return x, layout


def batchnorm_forward(x, gamma, beta, running_mean, running_var, eps: float = 1e-5,
                      momentum: float = 0.1):
    """batchnorm_forward_ref, one block per channel on the GPU; y and xhat in x's layout when
    that is NCHW or channel-major (else x is first copied to C order)."""
    _check_norm(x, gamma, beta, 1)
    _check_same(gamma, running_mean, running_var)
    if not _use_kernel(x, gamma, beta, running_mean, running_var):
        return batchnorm_forward_ref(x, gamma, beta, running_mean, running_var, eps, momentum)
    _written(running_mean, running_var)
    cp = array_module(x)
    gamma, beta = cp.ascontiguousarray(gamma), cp.ascontiguousarray(beta)
    x, layout = _in_channel_layout(x)
    N, C, S = _nc_s(x)
    count = N * S
    y, xhat = _empty_as(x), _empty_as(x)
    rstd = cp.empty(_channel_shape(x), dtype=x.dtype)
    load("norm").get_function("batchnorm_forward")(
        (max(1, min(C, MAX_GRID)),), (_norm_block(count),),
        (x, gamma, beta, y, xhat, rstd, running_mean, running_var, np.int32(C), np.uint64(count),
         *map(np.uint64, layout), np.float32(eps), np.float32(1.0 - momentum), np.float32(momentum),
         np.float32(momentum * (count / max(count - 1, 1)))))
    return y, xhat, rstd


def batchnorm_backward(dy, xhat, rstd, gamma):
    """batchnorm_backward_ref, one block per channel on the GPU (dx, dgamma, dbeta in one launch);
    dx in xhat's layout, dy copied to it first if stored otherwise."""
    _check_norm(dy, gamma, None, 1)
    _check_same(dy, xhat)
    if rstd.shape != _channel_shape(dy):
        raise ValueError(f"rstd must be {_channel_shape(dy)}, got {rstd.shape}")
    if not _use_kernel(dy, xhat, rstd, gamma):
        return batchnorm_backward_ref(dy, xhat, rstd, gamma)
    cp = array_module(dy)
    rstd, gamma = cp.ascontiguousarray(rstd), cp.ascontiguousarray(gamma)
    xhat, layout = _in_channel_layout(xhat)
    if _steps(dy) != _steps(xhat):
        dy_in_layout = _empty_as(xhat)
        dy_in_layout[...] = dy
        dy = dy_in_layout
    N, C, S = _nc_s(dy)
    dx = _empty_as(xhat)
    dgamma, dbeta = cp.empty(C, dtype=dy.dtype), cp.empty(C, dtype=dy.dtype)
    load("norm").get_function("batchnorm_backward")(
        (max(1, min(C, MAX_GRID)),), (_norm_block(N * S),),
        (dy, xhat, rstd, gamma, dx, dgamma, dbeta, np.int32(C), np.uint64(N * S), *map(np.uint64, layout)))
    return dx, dgamma, dbeta


# ---- im2col / col2im: kernels/im2col.cu -----------------------------------------------------

def _conv_out(size: int, k: int, stride: int, pad: int) -> int:
    # hpdl.layers.conv.out_size, not imported: conv imports this module.
    return (size + 2 * pad - k) // stride + 1


def _check_conv(x_shape, k: int, stride: int, pad: int) -> tuple[int, int]:
    if len(x_shape) != 4 or k < 1 or stride < 1 or pad < 0:
        raise ValueError(f"expected (N, C, H, W), k >= 1, stride >= 1, pad >= 0, got {tuple(x_shape)}, "
                         f"k={k}, stride={stride}, pad={pad}")
    ho, wo = _conv_out(x_shape[2], k, stride, pad), _conv_out(x_shape[3], k, stride, pad)
    if ho < 1 or wo < 1:
        raise ValueError(f"a {k}x{k} kernel with pad {pad} does not fit a {x_shape[2]}x{x_shape[3]} image")
    return ho, wo


def _taps(xp, k: int, stride: int, n_out: int):
    """(k, n_out): the padded-image row (or column) i + a stride that tap i reads for output a."""
    return xp.arange(k)[:, None] + stride * xp.arange(n_out)[None, :]


def im2col_ref(x, k: int, stride: int, pad: int, batched: bool = True):
    """Patches of x as columns, as hpdl.layers.conv.im2col:

        cols[c, i, j, a, b, n] = x[n, c, a stride + i - pad, b stride + j - pad]  (0 outside x)

    laid out (C k k, Ho Wo N) as conv.im2col, or sample-major (N, C k k, Ho Wo) when batched
    (the layout from which a batched product W @ cols lands in NCHW without a transpose).
    """
    xp = array_module(x)
    n, c = x.shape[:2]
    ho, wo = _check_conv(x.shape, k, stride, pad)
    xpad = xp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
    rows, cols = _taps(xp, k, stride, ho), _taps(xp, k, stride, wo)
    patches = xpad[:, :, rows[:, None, :, None], cols[None, :, None, :]]   # (N, C, k, k, Ho, Wo)
    if batched:
        return patches.reshape(n, c * k * k, ho * wo)
    return patches.transpose(1, 2, 3, 4, 5, 0).reshape(c * k * k, ho * wo * n)


def col2im_ref(cols, x_shape, k: int, stride: int, pad: int, batched: bool = False, batch_inner: bool = False):
    """The adjoint of im2col_ref, as hpdl.layers.conv.col2im (layout (C k k, Ho Wo N), or
    (N, C k k, Ho Wo) when batched): x[n, c, h, w] is the sum of cols[c, i, j, a, b, n] over
    a stride + i - pad = h, b stride + j - pad = w, added in the order i, then j, ascending.
    x is NCHW-contiguous, or an NCHW view of (C, H, W, N) memory when batch_inner.
    """
    xp = array_module(cols)
    n, c, h, w = x_shape
    ho, wo = _check_conv(x_shape, k, stride, pad)
    if batched:
        taps = cols.reshape(n, c, k, k, ho, wo)
    else:
        taps = cols.reshape(c, k, k, ho, wo, n).transpose(5, 0, 1, 2, 3, 4)
    dx = xp.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    for i in range(k):
        for j in range(k):
            dx[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride] += taps[:, :, i, j]
    dx = dx[:, :, pad:pad + h, pad:pad + w]
    if batch_inner:
        return xp.ascontiguousarray(dx.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)
    return xp.ascontiguousarray(dx)


def _conv_args(x_shape, k: int, stride: int, pad: int, ho: int, wo: int, batched: bool) -> tuple:
    return (*(np.int32(v) for v in (*x_shape, k, stride, pad, ho, wo)), np.int32(batched))


def im2col(x, k: int, stride: int, pad: int, batched: bool = True):
    """im2col_ref in one launch on the GPU, reading x through its strides (any layout, no copy)
    and the padding as zeros (no padded copy)."""
    ho, wo = _check_conv(x.shape, k, stride, pad)
    if not _use_kernel(x):
        return im2col_ref(x, k, stride, pad, batched)
    cp = array_module(x)
    if any(s < 0 for s in x.strides):
        x = cp.ascontiguousarray(x)
    n, c = x.shape[:2]
    shape = (n, c * k * k, ho * wo) if batched else (c * k * k, ho * wo * n)
    cols = cp.empty(shape, dtype=x.dtype)
    strides = (np.int64(s // x.itemsize) for s in x.strides)
    load("im2col").get_function("im2col")(
        _grid_flat(cols.size), (ELEMENTWISE_BLOCK,),
        (x, cols, *_conv_args(x.shape, k, stride, pad, ho, wo, batched), *strides))
    return cols


def col2im(cols, x_shape, k: int, stride: int, pad: int, batched: bool = False, batch_inner: bool = False):
    """col2im_ref in one launch on the GPU: a gather, one thread per element of x (see im2col.cu)."""
    ho, wo = _check_conv(x_shape, k, stride, pad)
    n, c, h, w = x_shape
    expected = (n, c * k * k, ho * wo) if batched else (c * k * k, ho * wo * n)
    if cols.shape != expected:
        raise ValueError(f"cols for x {tuple(x_shape)} must be {expected}, got {cols.shape}")
    if not _use_kernel(cols):
        return col2im_ref(cols, x_shape, k, stride, pad, batched, batch_inner)
    cp = array_module(cols)
    cols = cp.ascontiguousarray(cols)
    x = cp.empty((c, h, w, n) if batch_inner else (n, c, h, w), dtype=cols.dtype)
    load("im2col").get_function("col2im")(
        _grid_flat(x.size), (ELEMENTWISE_BLOCK,),
        (cols, x, *_conv_args(x_shape, k, stride, pad, ho, wo, batched), np.int32(batch_inner)))
    return x.transpose(3, 0, 1, 2) if batch_inner else x


# ---- max pooling over disjoint windows: kernels/maxpool.cu ----------------------------------

def _check_pool(x_shape, k: int) -> tuple[int, int]:
    if len(x_shape) != 4 or not 1 <= k * k < 255:
        raise ValueError(f"expected (N, C, H, W) and 1 <= k <= 15, got {tuple(x_shape)} and k={k}")
    ho, wo = x_shape[2] // k, x_shape[3] // k
    if ho < 1 or wo < 1:
        raise ValueError(f"a {k}x{k} window does not fit a {x_shape[2]}x{x_shape[3]} image")
    return ho, wo


def maxpool_forward_ref(x, k: int):
    """Max over disjoint k x k windows, as hpdl.layers.MaxPool2d (stride k):

        y[n, c, a, b] = numpy.maximum over the window's offsets o = i k + j, in order
        win[c, a, b, n] = the first o whose value equals y (255 if none: a window with a NaN)

    x: (N, C, H, W) any layout  ->  (y (N, C, Ho, Wo), a view of (C, Ho, Wo, N) memory; win uint8
    (C, Ho, Wo, N)), Ho = H // k, Wo = W // k.
    """
    xp = array_module(x)
    ho, wo = _check_pool(x.shape, k)
    src = x.transpose(1, 2, 3, 0)
    taps = [src[:, i:i + k * ho:k, j:j + k * wo:k] for i in range(k) for j in range(k)]
    y = xp.array(taps[0], order="C")
    for tap in taps[1:]:
        xp.maximum(y, tap, out=y)
    win = xp.full(y.shape, 255, dtype=np.uint8)
    for o in reversed(range(k * k)):   # the first offset reaching the max writes last
        win[taps[o] == y] = o
    return y.transpose(3, 0, 1, 2), win


def maxpool_backward_ref(dy, win, x_shape, k: int):
    """dx of maxpool_forward_ref: dy * (win == o) at offset o of each window (a multiply: a NaN
    in dy stays NaN), 0 past the last window.  dy: (N, C, Ho, Wo)  ->  dx: (N, C, H, W), a view
    of (C, H, W, N) memory."""
    xp = array_module(dy)
    ho, wo = _check_pool(x_shape, k)
    n, c, h, w = x_shape
    g = dy.transpose(1, 2, 3, 0)
    dx = xp.zeros((c, h, w, n), dtype=dy.dtype)
    for o in range(k * k):
        i, j = divmod(o, k)
        xp.multiply(g, win == o, out=dx[:, i:i + k * ho:k, j:j + k * wo:k])
    return dx.transpose(3, 0, 1, 2)


def _pool_args(x_shape, k: int, ho: int, wo: int) -> tuple:
    n, c, h, w = x_shape
    return tuple(np.int32(v) for v in (c, h, w, n, k, ho, wo))


def maxpool_forward(x, k: int):
    """maxpool_forward_ref in one launch on the GPU (x copied to batch-innermost memory unless it is)."""
    ho, wo = _check_pool(x.shape, k)
    if not _use_kernel(x):
        return maxpool_forward_ref(x, k)
    cp = array_module(x)
    src = cp.ascontiguousarray(x.transpose(1, 2, 3, 0))
    n, c = x.shape[:2]
    y = cp.empty((c, ho, wo, n), dtype=x.dtype)
    win = cp.empty((c, ho, wo, n), dtype=np.uint8)
    load("maxpool").get_function("maxpool_forward")(
        _grid_flat(y.size), (ELEMENTWISE_BLOCK,), (src, y, win, *_pool_args(x.shape, k, ho, wo)))
    return y.transpose(3, 0, 1, 2), win


def maxpool_backward(dy, win, x_shape, k: int):
    """maxpool_backward_ref in one launch on the GPU, one thread per element of dx."""
    ho, wo = _check_pool(x_shape, k)
    n, c, h, w = x_shape
    if dy.shape != (n, c, ho, wo) or win.shape != (c, ho, wo, n):
        raise ValueError(f"dy {dy.shape} and win {win.shape} do not fit x {tuple(x_shape)} with k={k}")
    if not _use_kernel(dy):
        return maxpool_backward_ref(dy, win, x_shape, k)
    cp = array_module(dy)
    g = cp.ascontiguousarray(dy.transpose(1, 2, 3, 0))
    dx = cp.empty((c, h, w, n), dtype=dy.dtype)
    load("maxpool").get_function("maxpool_backward")(
        _grid_flat(dx.size), (ELEMENTWISE_BLOCK,), (g, cp.ascontiguousarray(win), dx, *_pool_args(x_shape, k, ho, wo)))
    return dx.transpose(3, 0, 1, 2)


def on_kernel_path(*arrays) -> bool:
    """Whether these arrays take the fused kernels (CuPy float32), for callers that keep a
    NumPy path of their own rather than the `*_ref` oracle (hpdl.layers.conv)."""
    return _use_kernel(*arrays)


# ---- per-tensor sums of squares: kernels/sum_squares.cu -------------------------------------

SUM_SQUARES_MAX_PARTIALS = 256   # blocks per tensor in stage 1; stage 2 adds them in one block
SUM_SQUARES_PER_THREAD = 4       # elements a stage-1 thread reads at least, so small tensors take few blocks


def _tensor_table(cp, arrays):
    """The rows (device address, element count) of C-contiguous `arrays` on their device, in one
    copy: struct Tensor of sum_squares.cu and finite.cu."""
    return cp.asarray(np.array([(_address(a), a.size) for a in arrays], dtype=np.uint64))


def _blocks_per_tensor(arrays) -> int:
    """Blocks striding over each of a pointer table's tensors: enough for the largest to give each
    thread SUM_SQUARES_PER_THREAD elements, at most SUM_SQUARES_MAX_PARTIALS."""
    largest = max(a.size for a in arrays)
    return max(1, min(math.ceil(largest / (ELEMENTWISE_BLOCK * SUM_SQUARES_PER_THREAD)), SUM_SQUARES_MAX_PARTIALS))


def sum_squares_ref(arrays):
    """s[t] = sum of arrays[t]^2, one entry per tensor, on the arrays' device (no host sync):
    each the dot product that hpdl.backend.sum_of_squares adds up; LARS and LAMB norms are
    the square roots, LENA's per-layer squared norms the sums over each layer's tensors."""
    xp = array_module(arrays[0])
    return xp.stack([xp.dot(a.ravel(), a.ravel()) for a in arrays])


def sum_squares(arrays):
    """sum_squares_ref in two launches on the GPU per MAX_GRID (65535) tensors."""
    arrays = list(arrays)
    if not arrays:
        raise ValueError("sum_squares needs at least one array")
    if len({a.dtype for a in arrays}) > 1:
        raise ValueError(f"arrays must share one dtype, got {sorted({a.dtype.name for a in arrays})}")
    if not _use_kernel(*arrays):
        return sum_squares_ref(arrays)
    cp = array_module(arrays[0])
    if len(arrays) > MAX_GRID:   # one grid row per tensor
        return cp.concatenate([sum_squares(arrays[i:i + MAX_GRID]) for i in range(0, len(arrays), MAX_GRID)])
    # The contiguous copies stay referenced in `arrays` until both launches are queued.
    arrays = [cp.ascontiguousarray(a) for a in arrays]
    tensors = _tensor_table(cp, arrays)
    P = _blocks_per_tensor(arrays)
    T = len(arrays)
    partial = cp.empty((T, P), dtype=cp.float32)
    out = cp.empty(T, dtype=cp.float32)
    load("sum_squares").get_function("sum_squares_partial")((P, T), (ELEMENTWISE_BLOCK,), (tensors, partial))
    load("sum_squares").get_function("sum_squares_finish")((T,), (ELEMENTWISE_BLOCK,), (partial, out, np.int32(P)))
    return out


# ---- any NaN or Inf in many tensors: kernels/finite.cu --------------------------------------

def any_nonfinite_ref(arrays, flag) -> None:
    """flag[0] = 1 where any element of `arrays` is NaN or Inf, else flag is left as it was.

    flag: float32 of shape (1,) on the arrays' device; nothing is read back to the host.
    """
    xp = array_module(flag)
    for a in arrays:
        xp.maximum(flag, ~xp.isfinite(a).all(), out=flag)


def any_nonfinite(arrays, flag) -> None:
    """any_nonfinite_ref in one launch on the GPU, however many tensors."""
    arrays = list(arrays)
    if flag.shape != (1,) or flag.dtype != np.float32:
        raise ValueError(f"flag must be a float32 array of shape (1,), got {flag.dtype} {flag.shape}")
    if not arrays:
        return
    if not _use_kernel(flag, *arrays):
        return any_nonfinite_ref(arrays, flag)
    _written(flag)
    cp = array_module(flag)
    # The contiguous copies stay referenced in `arrays` until the launch is queued.
    arrays = [cp.ascontiguousarray(a) for a in arrays]
    load("finite").get_function("any_nonfinite")(
        (_blocks_per_tensor(arrays), min(len(arrays), MAX_GRID)), (ELEMENTWISE_BLOCK,),
        (_tensor_table(cp, arrays), np.int32(len(arrays)), flag))


def record_refusal_ref(refused, halt, refused_at, step: int) -> None:
    """The optimizer's bookkeeping after any_nonfinite set `refused` (float32 (1,)) for update
    number `step`, with no host read: the first refusal's step goes to refused_at (int64 (1,)),
    and halt (float32 (1,)) is raised for this and every later update."""
    xp = array_module(halt)
    xp.copyto(refused_at, step, where=(refused != 0) & (halt == 0))
    xp.maximum(halt, refused, out=halt)


def record_refusal(refused, halt, refused_at, step: int) -> None:
    """record_refusal_ref in one launch on the GPU (five CuPy launches in the reference)."""
    for name, a, dtype in (("refused", refused, np.float32), ("halt", halt, np.float32),
                           ("refused_at", refused_at, np.int64)):
        if a.shape != (1,) or a.dtype != dtype:
            raise ValueError(f"{name} must be a {np.dtype(dtype).name} array of shape (1,), got {a.dtype} {a.shape}")
    if not _use_kernel(refused, halt):
        return record_refusal_ref(refused, halt, refused_at, step)
    load("finite").get_function("record_refusal")((1,), (1,), (refused, halt, refused_at, np.int64(step)))

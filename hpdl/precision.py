"""Mixed precision: the --precision policy (fp32, tf32, fp16) and the matrix product every layer uses."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .backend import array_module


@dataclass(frozen=True)
class Precision:
    """How matrix products are computed.

    `operands` is the dtype both operands of a product are rounded to (float16 for fp16; None:
    used as they come); products always accumulate and return in the operands' own dtype
    (float32). `loss_scaling` says whether gradients need dynamic loss scaling to stay in
    the operands' range. tf32 differs from fp32 only on a GPU (cuBLAS TF32 math mode).
    """

    name: str
    operands: np.dtype | None
    loss_scaling: bool


POLICIES = {
    "fp32": Precision("fp32", None, False),
    "tf32": Precision("tf32", None, False),
    "fp16": Precision("fp16", np.dtype(np.float16), True),
}
PRECISIONS = tuple(POLICIES)
FP32 = POLICIES["fp32"]
_current = FP32


def parse_precision(name: str) -> Precision:
    """The policy a --precision value names; ValueError (one line) for another."""
    if name not in POLICIES:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    return POLICIES[name]


def current() -> Precision:
    """The policy in force (fp32 outside `use`)."""
    return _current


@contextlib.contextmanager
def use(policy: Precision, gpu: bool = False) -> Iterator[Precision]:
    """Make `policy` the one every `matmul` follows until the block ends; a run sets it once.

    With `gpu`, CuPy's float32 products also switch to TF32 tensor-core math for tf32 and to
    full float32 otherwise (so that fp32 means fp32 even where CUPY_TF32=1 is set).
    """
    global _current
    previous = _current
    restore = _cupy_compute_type(policy.name == "tf32") if gpu else None
    _current = policy
    try:
        yield policy
    finally:
        _current = previous
        if restore is not None:
            restore()


def _cupy_compute_type(tf32: bool):
    """Set CuPy's float32 matmul compute type; returns the function that restores the previous one."""
    # CuPy reads CUPY_TF32 only once, at its first float32 product; this switch is the one it
    # offers at run time (cupy/_core/_routines_linalg.pyx, used by CuPy's own tests).
    from cupy._core import _routines_linalg as linalg
    before = linalg.get_compute_type(np.float32)
    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if tf32 else linalg.COMPUTE_TYPE_DEFAULT)
    return lambda: linalg.set_compute_type(np.float32, before)


def matmul(a, b, out=None):
    """a @ b under the current policy: the one matrix product of Linear and Conv2d; into `out` if given.

    fp32 and tf32: exactly `a @ b` (on a GPU with tf32, cuBLAS rounds the operands to TF32).
    fp16: both operands rounded to float16, the product accumulated and returned in float32.
    On CuPy that is one cuBLAS gemmEx with float16 inputs and float32 compute and output.
    NumPy has no float16 BLAS, so there the rounded operands are widened back to float32 and
    multiplied by the float32 BLAS: widening is exact, so the inputs carry the same float16
    rounding (and overflow to inf past 65504) as on the GPU, and only the order of the float32
    additions may differ.
    """
    dtype = _current.operands
    xp = array_module(a)
    if dtype is None:
        return xp.matmul(a, b, out=out)
    wide = np.result_type(a.dtype, b.dtype)
    # An operand past float16's range becomes inf: that is the overflow loss scaling detects.
    with np.errstate(over="ignore", invalid="ignore"):
        if xp is not np and a.ndim == b.ndim == 2:
            product = _gemm_fp16(xp, a, b)
        else:
            product = a.astype(dtype).astype(wide) @ b.astype(dtype).astype(wide)
    if out is None:
        return product
    out[...] = product
    return out


# cuBLAS enumerators (cublas_api.h, library_types.h): fixed by NVIDIA's ABI.
_OP_N, _R_16F, _R_32F, _COMPUTE_32F, _GEMM_DEFAULT_TENSOR_OP = 0, 2, 0, 68, 99


def _gemm_fp16(cp, a, b):
    """(m, k) @ (k, n) on the GPU: float16 operands, float32 accumulation and result (tensor cores)."""
    from cupy.cuda import cublas, device
    (m, k), n = a.shape, b.shape[1]
    a16 = cp.ascontiguousarray(a, dtype=cp.float16)
    b16 = cp.ascontiguousarray(b, dtype=cp.float16)
    c = cp.zeros((m, n), dtype=cp.float32)
    if c.size == 0 or k == 0:
        return c
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    # cuBLAS is column-major: the row-major product C = A B is the column-major C^T = B^T A^T,
    # whose operands are B and A as they lie in memory.
    cublas.gemmEx(device.get_cublas_handle(), _OP_N, _OP_N, n, m, k,
                  one.ctypes.data, b16.data.ptr, _R_16F, n, a16.data.ptr, _R_16F, k,
                  zero.ctypes.data, c.data.ptr, _R_32F, n, _COMPUTE_32F, _GEMM_DEFAULT_TENSOR_OP)
    return c

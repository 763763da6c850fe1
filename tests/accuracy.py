"""The accuracy contract of the kernels that reduce, as one assertion for every kernel test."""
from __future__ import annotations

import numpy as np

from hpdl import kernels


def assert_as_accurate(kernel, ref32, ref64, what: str, abs_sum=0.0) -> None:
    """Each element's error against the float64 reference is within kernels.float32_allowance."""
    kernel, ref64 = np.asarray(kernel, dtype=np.float64), np.asarray(ref64, dtype=np.float64)
    assert kernel.shape == ref64.shape, f"{what}: shape {kernel.shape}, expected {ref64.shape}"
    err = np.abs(kernel - ref64)
    limit = np.broadcast_to(kernels.float32_allowance(ref32, ref64, abs_sum), err.shape)
    worst = np.unravel_index(np.argmax(err - limit), err.shape) if err.size else ()
    assert (err <= limit).all(), f"{what}: kernel error {err[worst]:.3g} at {worst} > allowed {limit[worst]:.3g}"

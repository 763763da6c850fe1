"""Array backend: NumPy or CuPy behind one `xp`, dtypes, host/device moves, stream sync."""
from __future__ import annotations

from typing import Any

import numpy as np

try:  # CuPy is the optional `gpu` extra; its absence only disables --device gpu.
    import cupy as _cupy
except ImportError:  # pragma: no cover - depends on the machine
    _cupy = None

DEVICES = ("cpu", "gpu", "auto")


class BackendError(RuntimeError):
    """A device was asked for that this machine cannot provide."""


def gpu_available() -> bool:
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device: CuPy raises its own runtime errors
        return False


class Backend:
    """The array module and dtype one run computes with."""

    def __init__(self, device: str = "cpu", dtype: str | np.dtype = "float32"):
        if device not in DEVICES:
            raise BackendError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
        if device == "auto":
            device = "gpu" if gpu_available() else "cpu"
        if device == "gpu" and not gpu_available():
            raise BackendError("--device gpu: no CUDA device found (is the `gpu` extra, cupy, installed?)")
        self.device = device
        self.xp: Any = _cupy if device == "gpu" else np
        self.dtype = np.dtype(dtype)

    @property
    def is_gpu(self) -> bool:
        return self.device == "gpu"

    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype or self.dtype)

    def synchronize(self) -> None:
        """Wait for queued GPU work; MPI must never read a buffer a kernel is still writing."""
        if self.is_gpu:
            _cupy.cuda.get_current_stream().synchronize()

    def __repr__(self) -> str:
        return f"Backend(device={self.device!r}, dtype={self.dtype.name})"


def array_module(a) -> Any:
    """numpy or cupy, whichever owns `a`."""
    if _cupy is not None:
        return _cupy.get_array_module(a)
    return np


def on_device(a) -> bool:
    """Whether `a` is device memory: not a NumPy array, or an array whose module is not NumPy."""
    return not isinstance(a, np.ndarray) or array_module(a) is not np


def to_host(a) -> np.ndarray:
    """A NumPy copy (or view) of `a`, wherever it lives."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy.asnumpy(a)
    return np.asarray(a)


CPU = Backend("cpu")


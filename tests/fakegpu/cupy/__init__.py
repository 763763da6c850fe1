"""A CPU stand-in for the CuPy that hpdl uses, so that `--device gpu` can run end to end without a GPU.

With tests/fakegpu first on PYTHONPATH, `import cupy` finds this package (tests/unit/test_fake_gpu.py
runs hpdl.train so in subprocesses). Its arrays are NumPy memory behind a type of their own that,
like CuPy's, refuses host arrays as operands, keeps reductions and indexed elements as 0-d
arrays and writes a new ufunc result in C order (NumPy would keep its inputs' layout);
`RawModule` builds kernels/*.cu for the host (tests/hostkernels.py); streams, events and
pinned memory do their work at once. It checks hpdl's GPU code paths for API and logic errors;
speed, asynchrony and the GPU's rounding are out of its reach. A NumPy function passes through
only under a name CuPy has (names.txt); its keywords and the array methods are NumPy's, unchecked.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import cuda  # noqa: F401  (cupy.cuda)
from ._core import _routines_linalg  # noqa: F401  (cupy._core._routines_linalg)

launches: Counter = Counter()   # kernel launches by name, across every RawModule
_CUPY_NAMES = frozenset(line for line in (Path(__file__).parent / "names.txt").read_text().splitlines()
                        if line and not line.startswith("#"))
_BUILD = Path(tempfile.mkdtemp(prefix="fakegpu-"))


@atexit.register
def _report() -> None:
    """The launch counts as JSON, into $FAKEGPU_LAUNCHES if set (one process's run)."""
    if os.environ.get("FAKEGPU_LAUNCHES"):
        Path(os.environ["FAKEGPU_LAUNCHES"]).write_text(json.dumps(launches))
    shutil.rmtree(_BUILD, ignore_errors=True)


class ndarray(np.ndarray):
    """A "device" array."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _refuse_host(inputs + (out or ()))
        if out is not None:
            kwargs["out"] = tuple(_host(o) for o in out)
        elif method == "__call__":
            kwargs.setdefault("order", "C")   # CuPy allocates a ufunc's result C-ordered, whatever its inputs' layout
        result = getattr(ufunc, method)(*(_host(x) for x in inputs), **kwargs)
        return out[0] if out is not None and len(out) == 1 else _wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        return _wrap(func(*_host(args), **_host(kwargs)))

    def __getitem__(self, key):
        return _wrap(self.view(np.ndarray)[_host(key)])

    def __setitem__(self, key, value):
        self.view(np.ndarray)[_host(key)] = _host(value)

    @property
    def data(self):
        return SimpleNamespace(ptr=self.ctypes.data)

    def get(self, stream=None, out=None, blocking=True) -> np.ndarray:
        if out is None:
            return np.array(self.view(np.ndarray))
        out[...] = self.view(np.ndarray)
        return out

    def set(self, arr: np.ndarray, stream=None) -> None:
        self.view(np.ndarray)[...] = arr


def _refuse_host(values) -> None:
    for v in values:
        if isinstance(v, np.ndarray) and not isinstance(v, ndarray):
            raise TypeError(f"Unsupported type {type(v)}")


def _host(value):
    """value with device arrays seen as NumPy (the same memory), through lists, tuples and dicts."""
    if isinstance(value, ndarray):
        return value.view(np.ndarray)
    if isinstance(value, (list, tuple)):
        return type(value)(_host(v) for v in value)
    if isinstance(value, dict):
        return {k: _host(v) for k, v in value.items()}
    return value


def _wrap(value):
    """NumPy results as device arrays; scalars as 0-d arrays, as CuPy returns them."""
    if isinstance(value, np.ndarray):
        return value.view(ndarray)
    if isinstance(value, np.generic):
        return np.asarray(value).view(ndarray)
    if isinstance(value, (list, tuple)):
        return type(value)(_wrap(v) for v in value)
    return value


def _device(function):
    def call(*args, **kwargs):
        _refuse_host(args)
        return _wrap(function(*_host(args), **_host(kwargs)))
    return call


def asarray(a, dtype=None, order=None):
    """Host data copied to the device (device arrays as they are, when the dtype fits)."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
    return np.array(a, dtype=dtype, order=order or "K").view(ndarray)


array = asarray


def ascontiguousarray(a, dtype=None):
    _refuse_host([a])
    return _wrap(np.ascontiguousarray(_host(a), dtype=dtype))


def asnumpy(a, stream=None) -> np.ndarray:
    return np.array(_host(a))


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


class RawModule:
    """kernels/*.cu built for the host, launched by hpdl.kernels' own launchers."""

    def __init__(self, code: str, options=()):
        # Imported here: hostkernels imports hpdl.kernels, which imports this module through hpdl.backend.
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # tests/
        import hostkernels
        self._module = hostkernels.module_from_source(code, _BUILD, launches, ndarray)

    def get_function(self, name: str):
        return self._module.get_function(name)


lib = SimpleNamespace(stride_tricks=SimpleNamespace(as_strided=_device(np.lib.stride_tricks.as_strided)))
random = SimpleNamespace(seed=np.random.seed, standard_normal=lambda size=None, dtype=float: asarray(
    np.random.standard_normal(size), dtype=dtype))


def __getattr__(name: str):
    """Everything else CuPy has: NumPy's dtypes and constants as they are, its functions on device arrays."""
    if name not in _CUPY_NAMES:
        raise AttributeError(f"module 'cupy' has no attribute {name!r} (not in tests/fakegpu/cupy/names.txt)")
    value = getattr(np, name)
    return _device(value) if callable(value) and not isinstance(value, type) else value

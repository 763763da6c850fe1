"""kernels/*.cu built for the host with g++ and launched by hpdl.kernels' own launchers, for machines without a GPU.

The shim below compiles the .cu sources as C++ with the CUDA built-ins they use, and
hpdl.kernels' launchers (argument conversion, grid and block sizes) call them through a
stand-in loader. Blocks run one after another, so __shared__ memory is a static array.
Element-wise kernels run their threads one after another too; kernels that cooperate
within a block (__syncthreads, warp shuffles) run each block's threads as OS threads
meeting at pthread barriers, one barrier per block and one per warp. Every launch's
arguments are checked against the kernel's C parameters (count, scalar types, array dtypes),
as a GPU would misread what the host's calling convention lets through, and its grid and
block against CUDA's limits (an empty grid is an error there, not a launch of nothing).

`patch` makes hpdl.kernels take the kernel path for NumPy float32 arrays (host addresses
in pointer tables, a 3-block grid cap so every grid-stride loop wraps) and counts the
launches of each kernel, so a test can run hpdl's own layers and optimizers on the
kernels and check which ran.
"""
from __future__ import annotations

import ctypes
import hashlib
import itertools
import math
import re
import shutil
import subprocess
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hpdl import kernels

SHIM = r"""
#include <cmath>
#include <cstddef>
#include <cstring>
#include <pthread.h>
struct Dim { unsigned x, y, z; };
extern "C" { Dim blockIdx, blockDim, gridDim; }
static thread_local Dim threadIdx;
#define __global__
#define __device__
#define __shared__ static
// volatile rounds every result to float: no FMA contraction, as the _rn intrinsics on the GPU.
static inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
static inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
static inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
static inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, sizeof f); return f; }
static inline float __fsqrt_rn(float a) { volatile float r = std::sqrt(a); return r; }
static pthread_barrier_t block_barrier, warp_barrier[32];
static float lanes[1024];
extern "C" void emu_block(unsigned threads) {  // threads: a multiple of 32, at most 1024
    pthread_barrier_init(&block_barrier, nullptr, threads);
    for (unsigned w = 0; w < threads / 32; ++w) pthread_barrier_init(&warp_barrier[w], nullptr, 32);
}
extern "C" void emu_thread(unsigned x) { threadIdx = {x, 0, 0}; }
static inline void __syncthreads() { pthread_barrier_wait(&block_barrier); }
static inline float __shfl_xor_sync(unsigned, float v, int offset) {
    const unsigned t = threadIdx.x;
    lanes[t] = v;
    pthread_barrier_wait(&warp_barrier[t / 32]);
    const float r = lanes[t ^ offset];
    pthread_barrier_wait(&warp_barrier[t / 32]);
    return r;
}
"""
HOST_FILES = ("bias_act", "optim_update", "im2col", "norm", "sum_squares", "softmax_xent", "finite", "maxpool")
CXX = shutil.which("g++")
_CTYPES = {np.float32: ctypes.c_float, np.int32: ctypes.c_int, np.int64: ctypes.c_longlong,
           np.uint64: ctypes.c_size_t}
# The NumPy scalar each C parameter type takes, and the dtype each pointer's array must have (a
# table of structs: any). A GPU packs the arguments in order at their own sizes, where the host's
# calling convention would forgive a wrong width or an int and a float in swapped places.
_SCALARS = {"int": np.int32, "long long": np.int64, "size_t": np.uint64, "unsigned long long": np.uint64,
            "float": np.float32}
_POINTEES = {"float": np.float32, "int": np.int32, "long long": np.int64, "unsigned char": np.uint8}
_ENTRY = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(([^)]*)\)')


def signatures(code: str) -> dict[str, list[tuple[str, bool]]]:
    """Each extern "C" kernel's parameters as (C type, is a pointer), in order."""
    def parse(param: str) -> tuple[str, bool]:
        words = [w for w in param.replace("*", " * ").split() if w not in ("const", "__restrict__")]
        return " ".join(w for w in words[:-1] if w != "*"), "*" in words
    return {m.group(1): [parse(p) for p in m.group(2).split(",")] for m in _ENTRY.finditer(code)}


def check_launch(name: str, grid, block) -> None:
    """Raise ValueError unless grid and block are a launch CUDA accepts: whole numbers from 1 up to
    the grid's (2^31 - 1, 65535, 65535) and at most 1024 threads a block (the host runs an empty grid)."""
    for what, dims, limits in (("grid", tuple(grid), (2**31 - 1, 65535, 65535)), ("block", tuple(block), (1024,) * 3)):
        if not 1 <= len(dims) <= 3 or not all(isinstance(d, int) and 1 <= d <= lim for d, lim in zip(dims, limits)):
            raise ValueError(f"{name}: {what} {dims} is not a valid CUDA launch")
    if math.prod(block) > 1024:
        raise ValueError(f"{name}: block {tuple(block)} has more than 1024 threads")


def check_arguments(name: str, params: list[tuple[str, bool]], args, device_array: type = np.ndarray) -> None:
    """Raise TypeError unless `args` are what kernel `name`'s parameters take, one by one; a
    pointer takes a `device_array` (CuPy refuses a host array)."""
    if len(args) != len(params):
        raise TypeError(f"{name} takes {len(params)} arguments, launched with {len(args)}")
    for k, ((ctype, pointer), a) in enumerate(zip(params, args)):
        if pointer:
            want = _POINTEES.get(ctype)
            ok = isinstance(a, device_array) and (want is None or a.dtype == want)
        else:
            ok = type(a) is _SCALARS[ctype]
        if not ok:
            got = f"{type(a).__name__} of {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
            raise TypeError(f"{name}: argument {k} is {ctype}{' *' if pointer else ''}, launched with {got}")


class _Dim(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint), ("y", ctypes.c_uint), ("z", ctypes.c_uint)]


class HostModule:
    """A cupy.RawModule stand-in whose kernels run on the CPU; `launches` counts them by name."""

    def __init__(self, lib: ctypes.CDLL, code: str, launches: Counter, device_array: type = np.ndarray):
        self.lib, self.launches, self.device_array = lib, launches, device_array
        self.cooperative = "__syncthreads" in code or "__shfl" in code
        self.signatures = signatures(code)
        self.dims = {name: _Dim.in_dll(lib, name) for name in ("blockIdx", "blockDim", "gridDim")}

    def get_function(self, name: str):
        fn, params = getattr(self.lib, name), self.signatures[name]

        def thread(tx: int, cargs) -> None:
            self.lib.emu_thread(tx)
            fn(*cargs)

        def launch(grid, block, args):
            check_launch(name, grid, block)
            check_arguments(name, params, args, self.device_array)
            self.launches[name] += 1
            cargs = [ctypes.c_void_p(a.ctypes.data) if isinstance(a, np.ndarray) else _CTYPES[type(a)](a)
                     for a in args]
            (gx, gy), bx = (tuple(grid) + (1,))[:2], block[0]
            self.dims["gridDim"].x, self.dims["gridDim"].y, self.dims["blockDim"].x = gx, gy, bx
            for by_, bx_ in itertools.product(range(gy), range(gx)):
                self.dims["blockIdx"].x, self.dims["blockIdx"].y = bx_, by_
                if not self.cooperative:
                    for tx in range(bx):
                        thread(tx, cargs)
                    continue
                self.lib.emu_block(bx)
                threads = [threading.Thread(target=thread, args=(tx, cargs)) for tx in range(bx)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
        return launch


def _compile(source: Path, target: Path, shim: Path) -> subprocess.Popen:
    return subprocess.Popen([CXX, "-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread",
                             "-include", str(shim), "-x", "c++", str(source), "-o", str(target)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def build(out: Path) -> dict[str, Path]:
    """Compile every HOST_FILES source into a shared library under `out` (in parallel)."""
    (out / "shim.h").write_text(SHIM)
    procs = {name: _compile(kernels.KERNEL_DIR / f"{name}.cu", out / f"{name}.so", out / "shim.h")
             for name in HOST_FILES}
    for name, proc in procs.items():
        _, stderr = proc.communicate()
        assert proc.returncode == 0, f"g++ failed on {name}.cu:\n{stderr}"
    return {name: out / f"{name}.so" for name in HOST_FILES}


def module_from_source(code: str, out: Path, launches: Counter, device_array: type) -> HostModule:
    """A HostModule built from CUDA source text (what cupy.RawModule receives), for tests/fakegpu,
    whose kernels take only `device_array`s for pointers."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "shim.h").write_text(SHIM)
    name = hashlib.sha256(code.encode()).hexdigest()[:16]
    (out / f"{name}.cu").write_text(code)
    _, stderr = _compile(out / f"{name}.cu", out / f"{name}.so", out / "shim.h").communicate()
    if stderr and not (out / f"{name}.so").exists():
        raise RuntimeError(f"g++ failed on a RawModule source:\n{stderr}")
    return HostModule(ctypes.CDLL(str(out / f"{name}.so")), code, launches, device_array)


def patch(libraries: dict[str, Path]) -> tuple[pytest.MonkeyPatch, Counter]:
    """Route hpdl.kernels to the host builds; returns the patch (undo it after) and the launch counter."""
    launches: Counter = Counter()
    modules = {name: HostModule(ctypes.CDLL(str(path)), (kernels.KERNEL_DIR / f"{name}.cu").read_text(), launches)
               for name, path in libraries.items()}
    monkey = pytest.MonkeyPatch()
    monkey.setattr(kernels, "load", modules.__getitem__)
    monkey.setattr(kernels, "_use_kernel", lambda *arrays: all(a.dtype == np.float32 for a in arrays))
    monkey.setattr(kernels, "_address", lambda a: a.ctypes.data)
    monkey.setattr(kernels, "MAX_GRID", 3)
    return monkey, launches


class Patched:
    """hpdl.kernels, patched: attribute access goes to the module; `launches` counts kernel runs."""

    def __init__(self, launches: Counter):
        self.launches = launches

    def __getattr__(self, name: str):
        return getattr(kernels, name)


"""kernels/*.cu built for the host with g++ and launched by hpdl.kernels' own launchers, for machines without a GPU.

The shim below compiles the .cu sources as C++ with the CUDA built-ins they use, and
hpdl.kernels' launchers (argument conversion, grid and block sizes) call them through a
stand-in loader. Blocks run one after another, so __shared__ memory is a static array.
Element-wise kernels run their threads one after another too; kernels that cooperate
within a block (__syncthreads, warp shuffles) run each block's threads as fibers on one OS
thread, a fiber at a barrier (one per block, one per warp) yielding to the next. A launch is
one call into the library: the kernel's arguments go as CUDA's kernelParams, a pointer to
each value, to an entry point generated from the kernel's signature. Every launch's
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
import math
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hpdl import kernels

SHIM = r"""
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <csetjmp>
#include <ucontext.h>
struct Dim { unsigned x, y, z; };
static Dim threadIdx, blockIdx, blockDim, gridDim;
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

// A cooperative block's threads are fibers on one OS thread: a thread waiting at a barrier yields
// to the scheduler, which resumes the block's threads in turn until all have finished. A fiber
// starts on its own stack through makecontext; after that, switches are _setjmp/_longjmp, which
// (unlike swapcontext) make no system call to save the signal mask.
typedef void (*EmuBody)(void **args);
static EmuBody emu_body;
static void **emu_args;
static ucontext_t emu_start[1024];
static jmp_buf emu_scheduler, emu_fiber[1024];
static bool emu_started[1024], emu_finished[1024];
static unsigned long emu_progress;  // arrivals at barriers and finished threads: a pass without any is a deadlock
static char *emu_stacks;
static const size_t EMU_STACK = 1 << 16;
struct EmuBarrier { unsigned arrived, generation; };
static EmuBarrier block_barrier, warp_barrier[32];
static void emu_wait(EmuBarrier &b, unsigned count) {
    const unsigned generation = b.generation;
    ++emu_progress;
    if (++b.arrived == count) { b.arrived = 0; ++b.generation; return; }
    const unsigned t = threadIdx.x;
    while (b.generation == generation)
        if (!_setjmp(emu_fiber[t])) _longjmp(emu_scheduler, 1);
}
static inline void __syncthreads() { emu_wait(block_barrier, blockDim.x); }
static float lanes[1024];
static inline float __shfl_xor_sync(unsigned, float v, int offset) {
    const unsigned t = threadIdx.x;
    lanes[t] = v;
    emu_wait(warp_barrier[t / 32], 32);
    const float r = lanes[t ^ offset];
    emu_wait(warp_barrier[t / 32], 32);
    return r;
}
static void emu_thread_main(unsigned t) {
    emu_body(emu_args);
    emu_finished[t] = true;
    ++emu_progress;
    _longjmp(emu_scheduler, 1);
}
// false where the block's threads wait at a barrier that the others never reach (undefined in CUDA)
static bool emu_cooperative_block(unsigned threads) {  // threads: a multiple of 32, at most 1024
    if (!emu_stacks) emu_stacks = static_cast<char *>(std::malloc(EMU_STACK * 1024));
    block_barrier = {};
    for (unsigned w = 0; w < 32; ++w) warp_barrier[w] = {};
    for (unsigned t = 0; t < threads; ++t) {
        getcontext(&emu_start[t]);
        emu_start[t].uc_stack = {emu_stacks + t * EMU_STACK, 0, EMU_STACK};
        emu_start[t].uc_link = nullptr;
        makecontext(&emu_start[t], reinterpret_cast<void (*)()>(emu_thread_main), 1, t);
        emu_started[t] = emu_finished[t] = false;
    }
    ucontext_t here;
    for (unsigned live = threads; live > 0;) {
        const unsigned long before = emu_progress;
        live = 0;
        for (unsigned t = 0; t < threads; ++t) {
            if (emu_finished[t]) continue;
            threadIdx = {t, 0, 0};
            if (!_setjmp(emu_scheduler)) {
                if (emu_started[t]) _longjmp(emu_fiber[t], 1);
                emu_started[t] = true;
                swapcontext(&here, &emu_start[t]);
            }
            live += !emu_finished[t];
        }
        if (live > 0 && emu_progress == before) return false;
    }
    return true;
}
// One launch: every block in turn, each running its threads one after another, or as fibers.
static int emu_launch(EmuBody body, void **args, unsigned gx, unsigned gy, unsigned bx, int cooperative) {
    emu_body = body, emu_args = args;
    gridDim = {gx, gy, 1}, blockDim = {bx, 1, 1};
    for (unsigned by = 0; by < gy; ++by)
        for (unsigned b = 0; b < gx; ++b) {
            blockIdx = {b, by, 0};
            if (cooperative) {
                if (!emu_cooperative_block(bx)) return 1;
                continue;
            }
            for (unsigned t = 0; t < bx; ++t) { threadIdx = {t, 0, 0}; body(args); }
        }
    return 0;
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


def entry_points(code: str) -> str:
    """C++ to append to a kernel source: for each kernel, `emu_launch_<name>(args, gx, gy, bx,
    cooperative)`, where args holds a pointer to each argument's value, as CUDA's kernelParams."""
    def entry(name: str, params: list[tuple[str, bool]]) -> str:
        unpack = ", ".join(f"*({ctype}{' *' if pointer else ''} *)a[{k}]" for k, (ctype, pointer) in enumerate(params))
        return (f'extern "C" int emu_launch_{name}(void **args, unsigned gx, unsigned gy, unsigned bx, int coop) '
                f'{{ return emu_launch([](void **a) {{ {name}({unpack}); }}, args, gx, gy, bx, coop); }}')
    return "\n".join(entry(name, params) for name, params in signatures(code).items()) + "\n"


class HostModule:
    """A cupy.RawModule stand-in whose kernels run on the CPU; `launches` counts them by name."""

    def __init__(self, lib: ctypes.CDLL, code: str, launches: Counter, device_array: type = np.ndarray):
        self.lib, self.launches, self.device_array = lib, launches, device_array
        self.cooperative = "__syncthreads" in code or "__shfl" in code
        self.signatures = signatures(code)

    def get_function(self, name: str):
        fn, params = getattr(self.lib, f"emu_launch_{name}"), self.signatures[name]
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]

        def launch(grid, block, args):
            check_launch(name, grid, block)
            check_arguments(name, params, args, self.device_array)
            self.launches[name] += 1
            values = [ctypes.c_void_p(a.ctypes.data) if isinstance(a, np.ndarray) else _CTYPES[type(a)](a)
                      for a in args]
            kernel_params = (ctypes.c_void_p * len(values))(*map(ctypes.addressof, values))
            gx, gy = (tuple(grid) + (1,))[:2]
            if fn(kernel_params, gx, gy, block[0], self.cooperative):
                raise RuntimeError(f"{name}: some threads of a block wait at a barrier the others never reach")
        return launch


def _compile(code: str, out: Path, name: str) -> subprocess.Popen:
    """g++ building `code` and its entry points into out/name.so, out/shim.h included first."""
    (out / f"{name}.cu").write_text(code + entry_points(code))
    # -U_FORTIFY_SOURCE: a fortified longjmp aborts on a jump to a lower stack, as onto a fiber's.
    return subprocess.Popen([CXX, "-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-U_FORTIFY_SOURCE",
                             "-include", str(out / "shim.h"), "-x", "c++", str(out / f"{name}.cu"),
                             "-o", str(out / f"{name}.so")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def build(out: Path) -> dict[str, Path]:
    """Compile every HOST_FILES source into a shared library under `out` (in parallel)."""
    (out / "shim.h").write_text(SHIM)
    procs = {name: _compile((kernels.KERNEL_DIR / f"{name}.cu").read_text(), out, name) for name in HOST_FILES}
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
    _, stderr = _compile(code, out, name).communicate()
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


"""Host memory: keep the blocks a training step frees for the next step instead of unmapping them."""
from __future__ import annotations

import ctypes

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# glibc serves blocks up to this from its heaps at most (HEAP_MAX_SIZE / 2 on 64-bit).
MMAP_THRESHOLD_MAX = 32 * 2**20
TRIM_THRESHOLD = 2**31 - 1


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 32 MiB for reuse; True where it applied.

    By default glibc hands every freed block above a threshold (128 KiB, rising with use)
    back to the kernel, and a training step frees and reallocates tens of megabytes of
    activations and temporaries: the next step then page-faults all of them in again, about
    9000 faults per cnn step of 64 rows, which was half the step's time on one core. Kept in
    the heap, the same blocks are reused step after step. Peak memory is unchanged; the
    process just does not shrink between steps. Elsewhere (musl, macOS) this does nothing.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))

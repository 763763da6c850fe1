"""How a device (CuPy) array reaches MPI: read in place by CUDA-aware MPI, else staged through pinned host memory."""
from __future__ import annotations

import ctypes
import functools
import os
from collections import defaultdict
from typing import Any, Callable, Mapping

import numpy as np

from ..backend import BackendError

# 1: the MPI library reads and writes device memory itself; 0: stage through host memory;
# unset: ask the library (MPIX_Query_cuda_support), and stage when it cannot say.
CUDA_AWARE_ENV = "HPDL_CUDA_AWARE_MPI"
# Open MPI (>= 2.0, its CUDA extension) and MPICH (4.x, with GPU support enabled at run time)
# both export this, with the same signature: int MPIX_Query_cuda_support(void).
QUERY_SYMBOL = "MPIX_Query_cuda_support"


def loaded_mpi_libraries(maps: str = "/proc/self/maps") -> list[str]:
    """Paths of the MPI libraries mapped into this process (Linux), in load order.

    mpi4py dlopens libmpi with RTLD_LOCAL, so its symbols are not in the global namespace:
    the library has to be found by path and opened again.
    """
    try:
        with open(maps) as f:
            paths = [line.split()[-1] for line in f if "/libmpi" in line]
    except OSError:  # not Linux: no query, the caller stages
        return []
    return [p for p in dict.fromkeys(paths) if ".so" in os.path.basename(p)]


def library_query(paths: list[str] | None = None) -> bool | None:
    """MPIX_Query_cuda_support() of the loaded MPI library; None when it has no such query.

    Must run after MPI_Init (the query reads the run-time setting, e.g. MPICH's MPIR_CVAR_ENABLE_GPU).
    """
    from mpi4py import MPI
    if not MPI.Is_initialized():
        return None
    # RTLD_NOLOAD: a handle to a library already loaded, never a second copy of MPI.
    mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 1)
    for path in loaded_mpi_libraries() if paths is None else paths:
        try:
            lib = ctypes.CDLL(path, mode=mode)
        except OSError:
            continue
        query = getattr(lib, QUERY_SYMBOL, None)
        if query is not None:
            query.restype, query.argtypes = ctypes.c_int, []
            return bool(query())
    return None


def detect(env: Mapping[str, str], query: Callable[[], bool | None]) -> bool:
    """Whether MPI takes device buffers: the env override if set, else the library's answer, else False."""
    value = env.get(CUDA_AWARE_ENV, "")
    if value in ("0", "1"):
        return value == "1"
    if value:
        raise BackendError(f"{CUDA_AWARE_ENV} must be 0 (stage through host memory) or 1 (CUDA-aware MPI), "
                           f"or unset to ask the MPI library; got {value!r}")
    return bool(query())


@functools.cache
def cuda_aware() -> bool:
    """This process's answer, decided once (on the first device transfer, after MPI_Init)."""
    return detect(os.environ, library_query)


class Outgoing:
    """A device array on its way to MPI: MPI may read `buffer` once `ready()`, or after `wait()`."""

    def __init__(self, stager: Stager, buffer, copied=None, source=None):
        self.stager, self.buffer = stager, buffer
        self.copied = copied    # event: the download into `buffer` is done (None: nothing in flight)
        self.source = source    # the device array, alive until then so its memory is not reused

    def ready(self) -> bool:
        return self.copied is None or self.copied.done

    def wait(self):
        """The buffer, once the copy into it has finished: only now may MPI read it."""
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = self.source = None
        return self.buffer

    def release(self) -> None:
        """MPI has finished with the buffer: a pinned one goes back to the pool."""
        if not self.stager.aware:
            self.stager.give(self.buffer)


class Stager:
    """One process's path between device arrays and MPI.

    CUDA-aware (`aware`): MPI gets device arrays themselves, after the current stream is
    synchronized (MPI reads and writes outside any stream). Otherwise each transfer goes
    through a pinned host buffer, reused by (shape, dtype) like p2p's BufferPool, copied on
    a dedicated non-blocking stream: a download waits on an event recorded on the compute
    stream, so compute goes on while it runs and MPI waits only for the copy; an upload
    makes the compute stream wait on its event, so later kernels see the received data.
    Two copy streams, one per direction: a GPU has a DMA engine for each, and a received
    activation's upload need not queue behind a gradient's download.
    """

    def __init__(self, xp, aware: bool | None = None):
        self.xp = xp
        self.aware = cuda_aware() if aware is None else aware
        self.down = xp.cuda.Stream(non_blocking=True)
        self.up = xp.cuda.Stream(non_blocking=True)
        self._free: dict[tuple, list[np.ndarray]] = defaultdict(list)
        self._uploading: list[tuple[Any, np.ndarray]] = []  # (event, pinned buffer an upload still reads)
        self.allocated = 0

    # -- pinned host buffers ---------------------------------------------------------------
    def host(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A pinned host buffer of this shape and dtype, lent until `give`."""
        self._reap()
        shape, dtype = tuple(shape), np.dtype(dtype)
        free = self._free[(shape, dtype)]
        if free:
            return free.pop()
        # What cupyx.empty_pinned does, through xp so that tests can pass a fake module.
        memory = self.xp.cuda.alloc_pinned_memory(max(int(np.prod(shape)) * dtype.itemsize, 1))
        self.allocated += 1
        return np.ndarray(shape, dtype, buffer=memory)  # the allocation may be rounded up: its first bytes

    def give(self, buf: np.ndarray, after=None) -> None:
        """Return a pinned buffer to the pool, once event `after` (an upload reading it) is done."""
        if after is None:
            self._free[(buf.shape, buf.dtype)].append(buf)
        else:
            self._uploading.append((after, buf))

    def _reap(self) -> None:
        still = []
        for event, buf in self._uploading:
            if event.done:
                self._free[(buf.shape, buf.dtype)].append(buf)
            else:
                still.append((event, buf))
        self._uploading = still

    # -- copies on the copy streams --------------------------------------------------------
    def download(self, array, out: np.ndarray):
        """Queue the copy of device `array` into host `out` behind the work queued so far on the
        current stream; returns the event that marks its end (synchronize it before MPI reads `out`)."""
        self.down.wait_event(self.xp.cuda.get_current_stream().record())
        array.get(stream=self.down, out=out, blocking=False)
        return self.down.record()

    def upload(self, host: np.ndarray, out):
        """Queue the copy of `host` into device `out`; work queued later on the current stream waits for it.
        Returns the event that marks its end (`host` must not change before it)."""
        compute = self.xp.cuda.get_current_stream()
        # out's memory may have belonged to an array that queued kernels still read.
        self.up.wait_event(compute.record())
        out.set(host, stream=self.up)
        done = self.up.record()
        compute.wait_event(done)
        return done

    # -- what MPI reads and writes ---------------------------------------------------------
    def outgoing(self, array) -> Outgoing:
        """Start moving device `array` where MPI can read it."""
        if self.aware:
            contiguous = self.xp.ascontiguousarray(array)
            # After ascontiguousarray, whose copy (if any) is queued on this stream too.
            self.xp.cuda.get_current_stream().synchronize()
            return Outgoing(self, contiguous)
        host = self.host(array.shape, array.dtype)
        return Outgoing(self, host, self.download(array, host), array)

    def incoming(self, shape: tuple[int, ...], dtype):
        """A buffer for MPI to receive into: device memory when MPI writes it, else a pinned host buffer."""
        if not self.aware:
            return self.host(shape, dtype)
        buf = self.xp.empty(shape, dtype)
        # The memory may be a freed array's that queued kernels still use; MPI writes outside the stream.
        self.xp.cuda.get_current_stream().synchronize()
        return buf

    def to_device(self, buf, out=None):
        """What MPI wrote into `buf` (from `incoming`, or `Outgoing.buffer` after a reduction), as a device
        array (`out` if given) that work queued on the current stream may use. The pool takes `buf` back."""
        if self.aware:
            if out is None or out is buf:
                return buf
            out[...] = buf  # queued on the current stream, after MPI's write (its Wait has returned)
            return out
        out = self.xp.empty(buf.shape, buf.dtype) if out is None else out
        self.give(buf, after=self.upload(buf, out))
        return out


@functools.cache
def default_stager() -> Stager:
    """The process's Stager for CuPy arrays: one pair of copy streams and one pinned pool for every channel."""
    import cupy
    return Stager(cupy)


def stager_for(xp) -> Stager | None:
    """The process's Stager when `xp` is CuPy; None for NumPy, whose arrays MPI reads as they are."""
    return None if xp is np else default_stager()

"""How one process's threads share a training step: all to BLAS, or the batch split into row blocks."""
from __future__ import annotations

import contextvars
import os
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Sequence, TypeVar

from threadpoolctl import threadpool_limits

from .config import ConfigError
from .layers import Conv2d, Layer

SPLITS = ("auto", "rows", "blas")
# Rows per block at least: thinner blocks make matrix products too thin to pay for a thread.
MIN_BLOCK_ROWS = 8

T = TypeVar("T")


def default_threads(local_ranks: int = 1) -> int:
    """Cores shared evenly by the ranks on this node."""
    return max(1, (os.cpu_count() or 1) // local_ranks)


def row_blocks(split: str, layers: Sequence[Layer], threads: int, device: str = "cpu") -> int:
    """Into how many row blocks, one per thread, each batch is split (1: none, BLAS takes the threads).

    NumPy runs its element-wise and copy work (im2col, col2im, pooling, activations) on one
    core whatever BLAS is given, and in a convolutional net that work is about half the step;
    split by rows, every thread runs its block's whole step, that work included. A net of
    matrix products alone gains nothing over BLAS threads and would pay the gradient sum, so
    "auto" splits convolutional nets only. A layer with batch statistics (BatchNorm) would
    see a block instead of the batch: it rules the split out.
    """
    coupled = next((layer for layer in layers if layer.couples_rows), None)
    if split == "rows" and coupled is not None:
        raise ConfigError(f"--thread-split rows: {type(coupled).__name__} normalizes over the whole "
                          "batch, which a block of rows would change; use --thread-split blas")
    if split == "rows" and device != "cpu":
        raise ConfigError("--thread-split rows shares CPU cores; the GPU runs a batch whole")
    if split == "blas" or threads < 2 or coupled is not None or device != "cpu":
        return 1
    if split == "auto" and not any(isinstance(layer, Conv2d) for layer in layers):
        return 1
    return threads


class RowThreads:
    """Runs a function over a batch in row blocks, one per thread; the calling thread takes the first."""

    def __init__(self, blocks: int = 1):
        self.blocks = blocks
        self._pool = ThreadPoolExecutor(blocks - 1, thread_name_prefix="hpdl-rows") if blocks > 1 else None

    def bounds(self, rows: int) -> list[tuple[int, int]]:
        """(first, stop) of each block of `rows`: as even as can be, none thinner than MIN_BLOCK_ROWS
        (so a small batch takes fewer blocks), in order."""
        n = max(1, min(self.blocks, rows // MIN_BLOCK_ROWS))
        edges = [rows * b // n for b in range(n + 1)]
        return list(zip(edges[:-1], edges[1:]))

    def map(self, fn: Callable[[int, int], T], rows: int) -> list[T]:
        """[fn(first, stop) for each block], the blocks run at once."""
        first, *rest = self.bounds(rows)
        if not rest:
            return [fn(*first)]
        # Each task runs in a copy of this thread's context: NumPy's error state lives there.
        context = contextvars.copy_context()
        futures = [self._pool.submit(context.copy().run, fn, *b) for b in rest]
        try:
            mine = fn(*first)
        finally:
            wait(futures)
        return [mine] + [f.result() for f in futures]

    def blas_limit(self) -> AbstractContextManager:
        """One BLAS thread per block while blocks run side by side; the caller's limit otherwise."""
        return threadpool_limits(1) if self.blocks > 1 else nullcontext()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

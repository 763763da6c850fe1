"""pytest plugin for running tests/gpu on tests/fakegpu's stand-in for CuPy (`make test-gpu-fake`).

The host runs a kernel's blocks one after another, so grids are capped: 3 blocks per grid row
(grid-stride loops cover the rest) and 2 partial sums per tensor in sum_squares.
"""
from __future__ import annotations

import hpdl.kernels as kernels


def pytest_configure(config) -> None:
    kernels.MAX_GRID = 3
    kernels.SUM_SQUARES_MAX_PARTIALS = 2

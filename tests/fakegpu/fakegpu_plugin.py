"""pytest plugin for running tests/gpu on tests/fakegpu's stand-in for CuPy (`make test-gpu-fake`).

The host runs a kernel's blocks one after another, so grids are capped: 3 blocks per grid row
(grid-stride loops cover the rest) and 2 partial sums per tensor in sum_squares.

Skipped, with the reason shown: what the stand-in cannot do. It needs g++, and it has no cuBLAS
(the float16 and TF32 products).
"""
from __future__ import annotations

import shutil

import pytest

import hpdl.kernels as kernels

NEEDS_CUBLAS = {"test_fp16_gemm_matches_the_numpy_policy", "test_tf32_rounds_operands_and_fp32_does_not",
                "test_fp16_linear_layer_matches_the_numpy_policy"}


def pytest_configure(config) -> None:
    kernels.MAX_GRID = 3
    kernels.SUM_SQUARES_MAX_PARTIALS = 2


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        name = getattr(item, "originalname", item.name)
        if shutil.which("g++") is None:
            item.add_marker(pytest.mark.skip(reason="g++ not on PATH: the stand-in builds kernels/*.cu with it"))
        elif name in NEEDS_CUBLAS:
            item.add_marker(pytest.mark.skip(reason="the CuPy stand-in has no cuBLAS"))

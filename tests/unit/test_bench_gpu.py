"""benchmarks/gpu.py's pieces that run without a GPU: its FLOP count, its peak table, and its refusal."""
from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.gpu import fp32_peak, train_flops
from hpdl.backend import gpu_available
from hpdl.models import build_model


def test_train_flops_counts_forward_weight_and_input_gradients():
    """A training step's product FLOPs are forward, dW and dx of every Linear, minus the first layer's dx."""
    forward = [2 * 784 * 1024, 2 * 1024 * 1024, 2 * 1024 * 10]
    assert train_flops(build_model("mlp")) == 3 * sum(forward) - forward[0]


def test_fp32_peak_matches_the_most_specific_name():
    """'H100 PCIe' is not read as 'H100', and an unknown device has no peak."""
    assert fp32_peak("NVIDIA H100 PCIe") == 51.0
    assert fp32_peak("NVIDIA H100 80GB HBM3") == 67.0
    assert fp32_peak("Some Future GPU") is None


@pytest.mark.skipif(gpu_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_benchmark_is_a_one_line_error():
    """`python -m benchmarks.gpu` with no cupy or device exits 2 with one line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--skip-training"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("benchmarks.gpu needs cupy and a CUDA device") and "Traceback" not in proc.stderr

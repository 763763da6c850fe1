"""benchmarks/gpu.py's pieces that run without a GPU: its FLOP count, its peak table, its refusal, and
what a stopped run keeps."""
from __future__ import annotations

import os
import signal
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


# The benchmark's main on tests/fakegpu, its reports in argv[1], each training measurement a
# half-second sleep: what is under test is what main keeps when stopped, not the measuring.
STOPPABLE = """
import functools, sys, time
from pathlib import Path
import benchmarks.gpu as g
g.REPORTS = Path(sys.argv[1])
g.write_report = functools.partial(g.write_report, reports=g.REPORTS)
g.gemm_tflops = lambda cp: 1.0
g.synthetic_batches = lambda model, batch: batch
def runner(model, batch, steps, share):
    def run():
        time.sleep(0.5)
        share.append(0.5)
        return 100.0 * batch
    return run
g.hpdl_runner = runner
sys.argv = ["gpu", "--models", "mlp,cnn,resnet", "--batch-sizes", "8,16", "--repeats", "1"]
sys.exit(g.main())
"""


def test_a_stopped_run_still_writes_what_it_measured(tmp_path):
    """SIGTERM (what `timeout` and Slurm send) after the first training measurement ends the run
    with exit 1 and a report holding the rows measured so far, marked as stopped early."""
    from test_fake_gpu import fake_gpu_env
    proc = subprocess.Popen([sys.executable, "-c", STOPPABLE, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=fake_gpu_env())
    try:
        for line in proc.stdout:
            if line.startswith("mlp batch 8"):
                os.kill(proc.pid, signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    report = (tmp_path / "gpu.md").read_text()
    assert "**Stopped early**" in report and "| mlp | 8 | 800 |" in report and "| resnet |" not in report
    assert "Fused kernels" not in report

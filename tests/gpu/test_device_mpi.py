"""Two ranks exchange CuPy arrays over MPI, staged through pinned memory and by the library's own choice."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("cupy")

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = Path(__file__).with_name("device_exchange.py")
# The repository first, and whatever path the caller's packages came from (pip --target installs).
PYTHONPATH = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def exchange(aware: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HPDL_CUDA_AWARE_MPI"}
    if aware is not None:
        env["HPDL_CUDA_AWARE_MPI"] = aware
    env["PYTHONPATH"] = PYTHONPATH
    mpirun = Path(sys.executable).with_name("mpirun")
    return subprocess.run(["timeout", "-k", "5", "240", str(mpirun), "-n", "2", sys.executable, str(PROGRAM)],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(320)
def test_staged_exchange_through_pinned_host_buffers():
    """HPDL_CUDA_AWARE_MPI=0: activations, gradients, allreduces and a push arrive intact via pinned staging."""
    run = exchange("0")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK aware=0" in run.stdout


@pytest.mark.timeout(320)
def test_exchange_with_detected_support():
    """Unset: whatever the library reports (device buffers straight to MPI when CUDA-aware), the values arrive."""
    run = exchange(None)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK aware=" in run.stdout


@pytest.mark.timeout(320)
def test_forced_cuda_aware_exchange_when_the_library_supports_it():
    """HPDL_CUDA_AWARE_MPI=1 on a library that says it is CUDA-aware: device arrays go to MPI directly."""
    probe = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; from hpdl.comm.device import "
                            "library_query; print(library_query())"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": PYTHONPATH}, timeout=60)
    if probe.stdout.strip() != "True":
        pytest.skip(f"the MPI library is not CUDA-aware (query: {probe.stdout.strip() or probe.stderr[-200:]})")
    run = exchange("1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK aware=1" in run.stdout

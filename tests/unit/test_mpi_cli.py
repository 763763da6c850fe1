"""`mpirun ... python -m hpdl.train` end to end: layouts, errors, faults and traces, each under a timeout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MPIRUN = Path(sys.executable).parent / "mpirun"
pytestmark = pytest.mark.skipif(not MPIRUN.exists(), reason="mpirun (the mpich wheel) is not installed")


def mpirun(n: int, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run hpdl.train on n ranks, one BLAS thread each; a hang fails the test at `timeout`."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **(env or {})}
    cmd = [str(MPIRUN), "-n", str(n), sys.executable, "-m", "hpdl.train", "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    return json.loads(last.removeprefix("RESULT "))


def test_32_ranks_with_default_options_reach_the_result_line(mnist_h5):
    """Plain `mpirun -np 32 python -m hpdl.train` picks a fitting layout, prints it and finishes (20 steps here)."""
    proc = mpirun(32, "--data", str(mnist_h5), "--max-steps", "20", timeout=600)
    res = result(proc)
    assert res["layout"] == "4 stages x 8 replicas + 0 PS = 32 ranks"
    assert "layout: 4 stages x 8 replicas" in proc.stdout
    assert res["steps"] == 20 and 0.0 < res["test_acc"] <= 1.0


def test_too_many_stages_is_a_one_line_error(mnist_h5):
    """--stages beyond the model's layer count exits 2 with one line naming the limit."""
    proc = mpirun(8, "--data", str(mnist_h5), "--stages", "8", timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["hpdl.train: error: the model has 6 layers; --stages must be at most 6"]


def test_a_layout_that_does_not_fit_names_one_that_does(mnist_h5):
    """3 ranks cannot hold 2 stages: the error proposes a layout that fits."""
    proc = mpirun(3, "--data", str(mnist_h5), "--stages", "2", timeout=120)
    assert proc.returncode == 2
    assert "try --stages 3 --replicas 1" in proc.stderr and "Traceback" not in proc.stderr


def test_an_exception_on_one_rank_ends_the_whole_job(mnist_h5):
    """A failure on rank 2 mid-run makes every rank exit, non-zero, with the rank and error on stderr."""
    proc = mpirun(4, "--data", str(mnist_h5), "--max-steps", "600", "--batch-size", "200",
                  env={"HPDL_INJECT_FAULT": "2:1"}, timeout=120)
    assert proc.returncode != 0
    assert "hpdl.train: rank 2:" in proc.stderr and "fault injected" in proc.stderr


def test_trace_has_every_rank_and_action(mnist_h5, tmp_path):
    """--trace writes one Chrome trace with forward/backward/send/recv/step events from every rank."""
    trace = tmp_path / "trace.json"
    result(mpirun(2, "--data", str(mnist_h5), "--max-steps", "3", "--trace", str(trace), timeout=120))
    events = json.loads(trace.read_text())["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X"]
    assert {e["pid"] for e in spans} == {0, 1}
    names = {e["name"] for e in spans}
    assert {"forward", "backward", "send_act", "recv_act", "send_grad", "recv_grad", "step"} <= names

"""A rank SIGKILLed mid-run ends the whole job, non-zero, within a bound, with the rank named; never a hang."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_mpi_cli import MPIRUN, mpirun, result

from hpdl.checkpoint_sharded import complete_steps
from hpdl.guard import death_line

pytestmark = pytest.mark.skipif(not MPIRUN.exists(), reason="mpirun (the mpich wheel) is not installed")

# From the kill to the job's exit: hydra notices the death at once and SIGKILLs the others;
# the bound leaves room for a loaded two-core machine.
EXIT_BOUND_S = 30.0


def start(tmp_path: Path, n: int, guarded: bool, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    """A long run on n ranks (each under hpdl.guard or not); returns it with its rank table and metrics paths."""
    table, metrics = tmp_path / "ranks.json", tmp_path / "metrics.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "HPDL_RANK_TABLE": str(table)}
    guard = [sys.executable, "-m", "hpdl.guard"] if guarded else []
    cmd = [str(MPIRUN), "-n", str(n), *guard, sys.executable, "-m", "hpdl.train", "--no-progress", "--max-steps", "1000000",
           "--metrics", str(metrics), "--log-every", "1", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), table, metrics


def pid_of(proc: subprocess.Popen, table: Path, metrics: Path, role: str) -> tuple[int, int]:
    """(rank, pid) of the rank whose role is `role`, once the run has trained a few steps."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if table.exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            rows = [r for r in json.loads(table.read_text()) if r["role"] == role]
            assert len(rows) == 1, table.read_text()
            return rows[0]["rank"], rows[0]["pid"]
        time.sleep(0.2)
    proc.kill()
    pytest.fail("the run did not start training within 120 s")


def kill_and_wait(proc: subprocess.Popen, pid: int) -> tuple[int, str, float]:
    """SIGKILL pid; (exit code, all output, seconds from the kill to the job's exit)."""
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=EXIT_BOUND_S * 4)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job hung after a rank was killed")
    return proc.returncode, out + err, time.monotonic() - t0


@pytest.mark.parametrize("n, role, args", [
    (4, "worker stage 0 replica 1", ["--stages", "2", "--replicas", "2"]),    # a data-parallel replica
    (4, "worker stage 1 replica 0", ["--stages", "2", "--replicas", "2"]),    # a pipeline stage
    (3, "ps 0", ["--stages", "1", "--ps", "1", "--algorithm", "asgd"]),       # the parameter server
])
def test_a_killed_rank_ends_the_job_naming_the_rank(mnist_h5, tmp_path, n, role, args):
    """Under hpdl.guard, SIGKILL of one rank mid-run: exit code non-zero within EXIT_BOUND_S and one line naming
    that rank, its role, pid and the signal."""
    proc, table, metrics = start(tmp_path, n, True, "--data", str(mnist_h5), "--batch-size", "16", *args)
    rank, pid = pid_of(proc, table, metrics, role)
    code, output, seconds = kill_and_wait(proc, pid)
    assert code != 0
    assert seconds < EXIT_BOUND_S
    named = [line for line in output.splitlines() if line.startswith("hpdl.guard:")]
    assert len(named) == 1, output[-3000:]
    assert named[0].startswith(f"hpdl.guard: rank {rank} ({role}, pid {pid} on ")
    assert named[0].endswith(") was killed by SIGKILL; ending the job")


def test_plain_mpirun_ends_the_job(mnist_h5, tmp_path):
    """Without the guard, hydra itself ends the job within the bound, non-zero, with its banner (a pid, no rank)."""
    proc, table, metrics = start(tmp_path, 3, False, "--data", str(mnist_h5), "--batch-size", "16", "--stages", "3")
    _, pid = pid_of(proc, table, metrics, "worker stage 1 replica 0")
    code, output, seconds = kill_and_wait(proc, pid)
    assert code != 0 and seconds < EXIT_BOUND_S
    assert "BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES" in output


def test_the_death_line_without_a_rank_table():
    """Without HPDL_RANK_TABLE the line still names the rank, pid, host and signal."""
    assert death_line("5", 4242, "node7", signal.SIGSEGV) == ("hpdl.guard: rank 5 (pid 4242 on node7) was killed by "
                                                               "SIGSEGV; ending the job")


def test_a_job_killed_mid_run_resumes_from_its_last_complete_checkpoint(mnist_h5, tmp_path):
    """SIGKILL of a stage while the run checkpoints every 5 steps; --resume continues from the newest complete
    checkpoint (whatever the kill interrupted is ignored) and finishes."""
    ck = tmp_path / "ck"
    opts = ["--data", str(mnist_h5), "--batch-size", "16", "--stages", "2", "--lr-schedule", "constant",
            "--checkpoint-dir", str(ck), "--checkpoint-every", "5"]
    proc, table, metrics = start(tmp_path, 2, True, *opts)
    _, pid = pid_of(proc, table, metrics, "worker stage 1 replica 0")
    deadline = time.monotonic() + 60
    while not complete_steps(ck) and time.monotonic() < deadline:
        time.sleep(0.1)
    code, _, _ = kill_and_wait(proc, pid)
    assert code != 0
    last = complete_steps(ck)[-1]
    resumed = mpirun(2, *opts, "--max-steps", str(last + 3), "--resume", timeout=120)
    assert f"resumed from step {last}" in resumed.stdout
    assert result(resumed)["steps"] == last + 3

"""The batch scripts in jobs/ submitted with sbatch to a local one-node Slurm cluster, shrunk to seconds."""
from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"
pytestmark = pytest.mark.slurm


def submit(slurm, script: str, workdir: Path, *options: str, args: tuple[str, ...] = (),
           env: dict[str, str] | None = None, minutes: int = 5) -> int:
    """sbatch jobs/<script> from the repository root, as the scripts' comments say, writing into workdir."""
    job_env = {"HPDL_ROOT": str(ROOT), "HPDL_VENV": sys.prefix, **(env or {})}
    return slurm.sbatch(JOBS / script, f"--chdir={workdir}", f"--time={minutes}", "--cpus-per-task=1", *options,
                        args=args, env=job_env, cwd=ROOT)


def finished(slurm, job: int, timeout: float = 300) -> dict[str, str]:
    """The job's final scontrol record, which must say it completed with exit code 0."""
    (record,) = slurm.wait(job, timeout)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), record
    return record


def results(log: str) -> list[dict]:
    return [json.loads(line.removeprefix("RESULT ")) for line in log.splitlines() if line.startswith("RESULT ")]


def metrics(path: Path) -> list[dict]:
    """The complete lines of a metrics file (a running job may be writing the last one)."""
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]]


def test_single_node_job_trains_and_reports(slurm, mnist_h5, tmp_path):
    """single_node.sbatch completes with exit code 0, its log ends with RESULT, and metrics land in runs/<jobid>."""
    job = submit(slurm, "single_node.sbatch", tmp_path,
                 args=("--data", str(mnist_h5), "--max-steps", "30", "--log-every", "10"))
    finished(slurm, job)
    log = (tmp_path / f"hpdl-{job}.out").read_text()
    (result,) = results(log)
    assert log.strip().splitlines()[-1].startswith("RESULT ")
    assert result["steps"] == 30 and result["test_acc"] > 0.5, log[-2000:]
    steps = [m["step"] for m in metrics(tmp_path / "runs" / str(job) / "metrics.jsonl") if m["kind"] == "train"]
    assert steps == [10, 20, 30]


def test_pipeline_ps_job_places_stages_on_nodes_and_one_gpu_per_local_rank(slurm, mnist_h5, tmp_path):
    """pipeline_ps.sbatch at -n 5 (2 stages x 2 replicas + 1 PS, nodes of 2 ranks emulated) trains to RESULT;
    each stage's replicas share a node, the server comes last, and local rank i gets the i-th GPU Slurm gave."""
    job = submit(slurm, "pipeline_ps.sbatch", tmp_path, "--nodes=1", "--ntasks-per-node=5", "--gpus-per-node=0",
                 args=("--data", str(mnist_h5), "--max-steps", "20"),
                 env={"HPDL_STAGES": "2", "HPDL_REPLICAS": "2", "HPDL_PS": "1", "HPDL_DEVICE": "cpu",
                      "HPDL_RANKS_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "3,5"})
    finished(slurm, job)
    log = (tmp_path / f"hpdl-pipeline-ps-{job}.out").read_text()
    (result,) = results(log)
    assert result["layout"] == "2 stages x 2 replicas + 1 PS = 5 ranks", log[-2000:]
    assert result["algorithm"] == "pipelined-dcasgd" and result["steps"] == 20 and result["pushes"] > 0
    table = re.findall(r"^\s+(\d)\s+(\d)\s+(worker\s+\d\s+\d|ps \d)", log, re.MULTILINE)
    roles = {int(rank): (int(node), " ".join(role.split())) for rank, node, role in table}
    assert roles == {0: (0, "worker 0 0"), 1: (0, "worker 0 1"), 2: (2, "worker 1 0"), 3: (2, "worker 1 1"),
                     4: (4, "ps 0")}, log[:3000]
    gpus = dict(re.findall(r"^gpu_bind: rank (\d) \(local rank \d on \S+\): CUDA_VISIBLE_DEVICES=(\d)$", log,
                           re.MULTILINE))
    assert gpus == {"0": "3", "1": "5", "2": "3", "3": "5", "4": "3"}, log[:3000]


def test_sweep_array_runs_one_grid_point_per_task_and_rejects_tasks_past_the_grid(slurm, mnist_h5, tmp_path):
    """sweep.sbatch as an array of 3 over a 2 x 1 grid: tasks 0 and 1 train with their own learning rate
    (seen in their metrics); task 2 fails with exit code 2 and says which --array fits."""
    job = submit(slurm, "sweep.sbatch", tmp_path, "--array=0-2",
                 args=("--data", str(mnist_h5), "--max-steps", "20", "--log-every", "10",
                       "--lr-schedule", "constant"),
                 env={"HPDL_SWEEP_LR": "0.05 0.2", "HPDL_SWEEP_BATCH": "32"})
    records = {int(r["ArrayTaskId"]): r for r in slurm.wait(job, 300)}
    assert sorted(records) == [0, 1, 2]
    for task, lr in ((0, 0.05), (1, 0.2)):
        log = (tmp_path / f"hpdl-sweep-{job}_{task}.out").read_text()
        assert (records[task]["JobState"], records[task]["ExitCode"]) == ("COMPLETED", "0:0"), log[-2000:]
        assert f"SWEEP task={task} lr={lr} batch_size=32" in log
        assert results(log)[0]["steps"] == 20
        lrs = {m["lr"] for m in metrics(tmp_path / "runs" / f"sweep-{job}" / f"task-{task}" / "metrics.jsonl")
               if m["kind"] == "train"}
        assert lrs == {lr}
    assert (records[2]["JobState"], records[2]["ExitCode"]) == ("FAILED", "2:0")
    log = (tmp_path / f"hpdl-sweep-{job}_2.out").read_text()
    assert "array task 2 is past the 2 x 1 grid; submit with --array=0-1" in log
    assert not results(log)


def test_a_rank_killed_by_a_signal_is_named_in_the_job_log(slurm, mnist_h5, tmp_path):
    """single_node.sbatch on 2 tasks runs each rank under hpdl.guard with the rank table in runs/<jobid>: SIGKILL
    of rank 1 mid-run fails the job, and its log has one guard line naming rank 1, its role and its pid."""
    job = submit(slurm, "single_node.sbatch", tmp_path, "--ntasks=2",
                 args=("--data", str(mnist_h5), "--stages", "1", "--max-steps", "100000", "--log-every", "10"))
    run = tmp_path / "runs" / str(job)
    slurm.wait(job, 120, until=lambda _: (run / "ranks.json").exists() and (run / "metrics.jsonl").exists()
               and len(metrics(run / "metrics.jsonl")) >= 2)
    (row,) = [r for r in json.loads((run / "ranks.json").read_text()) if r["rank"] == 1]
    assert row["role"] == "worker stage 0 replica 1", row
    os.kill(row["pid"], signal.SIGKILL)
    (record,) = slurm.wait(job, 60)
    log = (tmp_path / f"hpdl-{job}.out").read_text()
    assert record["JobState"] == "FAILED" and record["ExitCode"] != "0:0", (record, log[-2000:])
    named = [line for line in log.splitlines() if line.startswith("hpdl.guard:")]
    assert len(named) == 1, log[-3000:]
    assert named[0].startswith(f"hpdl.guard: rank 1 (worker stage 0 replica 1, pid {row['pid']} on "), named
    assert named[0].endswith(") was killed by SIGKILL; ending the job"), named
    assert not results(log)


def resumed_steps(log: str) -> list[int]:
    """The steps that the attempts in a job log resumed from (rank 0 says it once per attempt)."""
    return [int(s) for s in re.findall(r"^resumed from step (\d+) \(", log, re.MULTILINE)]


def test_resume_job_requeues_itself_at_the_time_limit_signal_and_resumes_from_its_checkpoint(
        slurm, mnist_h5, tmp_path):
    """resume.sbatch on 3 ranks (1 stage x 3 replicas): the time-limit warning (SIGUSR1 to the batch shell, what
    --signal=B:USR1@T sends) stops the first attempt; the job requeues itself, the second attempt resumes from a
    sharded checkpoint past step 0 and finishes the run; one job id, one restart, exit code 0, one RESULT with
    every step, and the second attempt's training metrics from past the resumed step to the last."""
    steps, every = 400, 100
    job = submit(slurm, "resume.sbatch", tmp_path, "--ntasks=3",
                 args=("--data", str(mnist_h5), "--stages", "1", "--max-steps", str(steps), "--log-every", "50"),
                 env={"HPDL_CKPT_EVERY": str(every)})
    log_path = tmp_path / f"hpdl-resume-{job}.out"
    metrics_path = tmp_path / "runs" / str(job) / "metrics.jsonl"

    def logged_step() -> int:
        return max((m["step"] for m in metrics(metrics_path)), default=0) if metrics_path.exists() else 0

    # Signal once step 150 is logged, so a checkpoint (step 100) exists and the run is far from done.
    slurm.wait(job, 120, until=lambda _: logged_step() >= 150)
    slurm.run("scancel", "--batch", "--signal=USR1", str(job))
    record = finished(slurm, job)
    log = log_path.read_text()
    assert record["Restarts"] == "1", log
    assert "3 tasks" in log and "attempt 0" in log and "attempt 1" in log, log
    assert f"requeueing job {job} (restart 1)" in log, log
    (resumed,) = resumed_steps(log)
    assert every <= resumed < steps, log
    assert "written by 1 stages x 3 replicas" in log, log
    (result,) = results(log)
    assert result["steps"] == steps and result["layout"] == "1 stages x 3 replicas + 0 PS = 3 ranks", log[-2000:]
    train_steps = [m["step"] for m in metrics(metrics_path) if m["kind"] == "train"]
    assert train_steps[-1] == steps and set(range(50, steps + 1, 50)) - set(range(resumed + 1)) <= set(train_steps)


def test_resume_job_gets_the_warning_from_the_real_time_limit_and_resumes_after_requeue(slurm, mnist_h5, tmp_path):
    """resume.sbatch on 2 ranks with a 1-minute limit and --signal=B:USR1@10 on a run far longer than that: Slurm
    itself warns the batch shell before the limit, the job requeues itself instead of ending in TIMEOUT, and the
    next attempt resumes from a checkpoint (the test cancels it there)."""
    job = submit(slurm, "resume.sbatch", tmp_path, "--ntasks=2", "--signal=B:USR1@10", minutes=1,
                 args=("--data", str(mnist_h5), "--stages", "1", "--epochs", "50", "--log-every", "100"),
                 env={"HPDL_CKPT_EVERY": "50"})  # a checkpoint well before the warning, even on a loaded machine
    log_path = tmp_path / f"hpdl-resume-{job}.out"
    slurm.wait(job, 240, until=lambda _: log_path.exists() and bool(resumed_steps(log_path.read_text())))
    slurm.run("scancel", str(job))
    (record,) = slurm.wait(job, 60)
    log = log_path.read_text()
    assert record["JobState"] == "CANCELLED" and record["Restarts"] == "1", (record, log)
    assert "SIGUSR1 (time limit near)" in log and f"requeueing job {job} (restart 1)" in log, log
    (resumed,) = resumed_steps(log)
    assert resumed >= 50, log

"""`mpirun ... hpdl.train --checkpoint-dir D [--resume]`: exact resume, resume on another layout, user errors."""
from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
from test_mpi_cli import MPIRUN, mpirun, result

from hpdl.checkpoint_sharded import MANIFEST, file_sha256, read_manifest, step_dir

pytestmark = pytest.mark.skipif(not MPIRUN.exists(), reason="mpirun (the mpich wheel) is not installed")

# A small CNN with dropout, so that a resumed run must also repeat the dropout masks.
DROPOUT_CNN = "model: cnn\nmodel_options: {channels: [3, 4], hidden: 16, dropout: 0.5}\n"


def options(mnist_h5, tmp_path, yaml: str, *args: str) -> list[str]:
    path = tmp_path / "model.yaml"
    path.write_text(yaml)
    # The schedule must not depend on --max-steps, which differs between the interrupted and the whole run.
    return ["--data", str(mnist_h5), "--config", str(path), "--lr-schedule", "constant", *args]


def final_params(directory, step: int) -> dict[str, np.ndarray]:
    """Every layer's parameters, by global layer index, from the checkpoint of `step`."""
    path = step_dir(directory, step)
    out = {}
    for entry in read_manifest(path)["shards"]:
        with h5py.File(path / entry.file) as f:
            for j, layer in f["params"].items():
                for name, ds in layer.items():
                    out[f"{entry.first + int(j)}/{name}"] = ds[()]
    return out


def test_interrupted_and_resumed_equals_uninterrupted(mnist_h5, tmp_path):
    """2 stages: 7 steps straight, or 3 steps, stop, resume to 7 (checkpoints every 2 steps and at the end): the
    same parameters bit for bit, the same test loss, so the same batches, dropout masks and momentum."""
    opts = options(mnist_h5, tmp_path, DROPOUT_CNN, "--stages", "2", "--batch-size", "16", "--checkpoint-every", "2")
    whole, part = tmp_path / "whole", tmp_path / "part"
    straight = result(mpirun(2, *opts, "--max-steps", "7", "--checkpoint-dir", str(whole), timeout=120))
    result(mpirun(2, *opts, "--max-steps", "3", "--checkpoint-dir", str(part), timeout=120))
    assert sorted(p.name for p in part.iterdir()) == ["step-00000002", "step-00000003"]
    proc = mpirun(2, *opts, "--max-steps", "7", "--checkpoint-dir", str(part), "--resume", timeout=120)
    resumed = result(proc)
    assert "resumed from step 3" in proc.stdout
    a, b = final_params(whole, 7), final_params(part, 7)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert resumed["test_loss"] == straight["test_loss"] and resumed["steps"] == 7
    again = result(mpirun(2, *opts, "--max-steps", "7", "--checkpoint-dir", str(part), "--resume", timeout=120))
    assert again["test_loss"] == straight["test_loss"]  # resumed at the end: nothing to train, still evaluated


def test_resume_on_another_layout_continues_the_same_run(mnist_h5, tmp_path):
    """A checkpoint of 2 stages x 1 replica resumed on 2 stages x 2 replicas with half the per-replica batch (the
    same global batches) ends where the uninterrupted run does, up to float64 rounding of the replicas' sum."""
    opts = options(mnist_h5, tmp_path, "model_options: {hidden: [32]}\n", "--stages", "2", "--dtype", "float64",
                   "--microbatches", "2")
    whole, part = tmp_path / "whole", tmp_path / "part"
    result(mpirun(2, *opts, "--batch-size", "16", "--max-steps", "6", "--checkpoint-dir", str(whole), timeout=120))
    result(mpirun(2, *opts, "--batch-size", "16", "--max-steps", "3", "--checkpoint-dir", str(part), timeout=120))
    proc = mpirun(4, *opts, "--batch-size", "8", "--replicas", "2", "--max-steps", "6", "--checkpoint-dir",
                  str(part), "--resume", timeout=120)
    result(proc)
    assert "written by 2 stages x 1 replicas" in proc.stdout
    a, b = final_params(whole, 6), final_params(part, 6)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-13, err_msg=k)


def test_a_resumed_run_reaches_the_uninterrupted_accuracy(mnist_h5, tmp_path):
    """400 steps on 2 stages, or 200 there and 200 more on 1 stage x 4 replicas (batch 32 = 4 x 8), in float32.

    Tolerance: 0.002 test accuracy (20 of the 10 000 test images). Only the order of float32 sums differs (one
    replica's gradient, or four replicas' summed by allreduce), a relative 1e-7 per step; that moves the test loss
    by about 1e-7 and can flip only images sitting on a decision boundary (measured: equal accuracy)."""
    opts = options(mnist_h5, tmp_path, "model_options: {hidden: [128]}\n")
    whole, part = tmp_path / "whole", tmp_path / "part"
    straight = result(mpirun(2, *opts, "--stages", "2", "--batch-size", "32", "--max-steps", "400",
                             "--checkpoint-dir", str(whole), timeout=180))
    result(mpirun(2, *opts, "--stages", "2", "--batch-size", "32", "--max-steps", "200", "--checkpoint-dir", str(part),
                  timeout=180))
    resumed = result(mpirun(4, *opts, "--stages", "1", "--batch-size", "8", "--max-steps", "400", "--checkpoint-dir",
                            str(part), "--resume", timeout=180))
    assert straight["test_acc"] > 0.85
    assert abs(resumed["test_acc"] - straight["test_acc"]) <= 0.002
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-4)


@pytest.mark.parametrize("damage, needle", [
    ("nan", "holds NaN or Inf"),
    ("truncate", "SHA-256 differs from the manifest's"),
    ("manifest", "unreadable manifest"),
])
def test_a_damaged_checkpoint_is_a_one_line_error_on_resume(mnist_h5, tmp_path, damage, needle):
    """--resume from a damaged sharded checkpoint: exit code 2 and one line on stderr naming the damage."""
    opts = options(mnist_h5, tmp_path, "model_options: {hidden: [32]}\n", "--stages", "2", "--batch-size", "16",
                   "--checkpoint-dir", str(tmp_path / "ck"))
    result(mpirun(2, *opts, "--max-steps", "2", timeout=120))
    path = step_dir(tmp_path / "ck", 2)
    shard = path / read_manifest(path)["shards"][0].file
    if damage == "nan":  # a diverged run's checkpoint, with a correct digest
        with h5py.File(shard, "r+") as f:
            f["params/1/W"][0, 0] = np.nan
        text = (path / MANIFEST).read_text()
        old = read_manifest(path)["shards"][0].sha256
        (path / MANIFEST).write_text(text.replace(old, file_sha256(shard).hex()))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:1000])
    else:
        (path / MANIFEST).write_text("{not json")
    proc = mpirun(2, *opts, "--max-steps", "4", "--resume", timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpdl.train: error: ") and needle in lines[0], proc.stderr


def test_a_nan_single_process_checkpoint_is_a_one_line_error(mnist_h5, tmp_path):
    """The one-process path rejects a NaN-filled checkpoint the same way: exit 2, one line."""
    ck = tmp_path / "ck"
    base = [sys.executable, "-m", "hpdl.train", "--no-progress", "--data", str(mnist_h5), "--batch-size", "16",
            "--checkpoint-dir", str(ck)]
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model_options: {hidden: [32]}\n")
    assert subprocess.run([*base, "--config", str(cfg), "--max-steps", "2"], capture_output=True).returncode == 0
    (file,) = ck.glob("step-*.h5")
    with h5py.File(file, "r+") as f:
        f["optim/1/W/momentum"][...] = np.inf
    proc = subprocess.run([*base, "--config", str(cfg), "--max-steps", "4", "--resume"], capture_output=True, text=True)
    assert proc.returncode == 2
    want = f"hpdl.train: error: {file}: optimizer state '1/W/momentum' holds NaN or Inf"
    assert proc.stderr.strip().splitlines() == [want]


@pytest.mark.parametrize("args, needle", [
    (["--schedule", "pipedream", "--checkpoint-every", "5"], "drains its pipeline only at epoch ends"),
    (["--stages", "1", "--algorithm", "avg"], "multi-rank checkpoints cover --algorithm sync"),
])
def test_checkpoint_options_that_cannot_work_are_one_line_errors(mnist_h5, tmp_path, args, needle):
    """Options the checkpoints cannot honour fail at once with exit code 2 and one line."""
    proc = mpirun(2, "--data", str(mnist_h5), "--checkpoint-dir", str(tmp_path / "ck"), *args, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr


# -- parameter-server runs ----------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", [["asgd"], ["eamsgd", "--tau", "3"]])
def test_a_resumed_parameter_server_run_equals_the_uninterrupted_one(mnist_h5, tmp_path, algorithm):
    """One worker and one server (a deterministic order) in float64: 10 steps straight, or 6 (checkpoint at 4),
    then resumed to 10, end with the same server weights bit for bit (the servers' and the worker's state)."""
    opts = options(mnist_h5, tmp_path, "model_options: {hidden: [32]}\n", "--stages", "1", "--ps", "1",
                   "--batch-size", "16", "--dtype", "float64", "--checkpoint-every", "4", "--algorithm", *algorithm)
    straight = result(mpirun(2, *opts, "--max-steps", "10", "--checkpoint-dir", str(tmp_path / "a"), timeout=120))
    result(mpirun(2, *opts, "--max-steps", "6", "--checkpoint-dir", str(tmp_path / "b"), timeout=120))
    proc = mpirun(2, *opts, "--max-steps", "10", "--checkpoint-dir", str(tmp_path / "b"), "--resume", timeout=120)
    assert "resumed from step 4" in proc.stdout
    assert result(proc)["params_sha256"] == straight["params_sha256"]


def test_a_parameter_server_run_resumes_on_fewer_workers_from_the_servers_weights(mnist_h5, tmp_path):
    """2 workers train dcasgd-a 120 steps (checkpoint at 100); 1 worker resumes for one step: its test accuracy is
    the trained model's (well above a fresh model's 10%), so the servers' weights carried over."""
    opts = options(mnist_h5, tmp_path, "model_options: {hidden: [32]}\n", "--stages", "1", "--ps", "1",
                   "--batch-size", "16", "--checkpoint-every", "100", "--algorithm", "dcasgd-a",
                   "--checkpoint-dir", str(tmp_path / "ck"))
    trained = result(mpirun(3, *opts, "--max-steps", "120", timeout=120))
    proc = mpirun(2, *opts, "--max-steps", "101", "--resume", timeout=120)
    assert "resumed from step 100" in proc.stdout and "written by 2 replicas" in proc.stdout
    assert trained["test_acc"] > 0.8 and result(proc)["test_acc"] > 0.8

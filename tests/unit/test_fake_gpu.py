"""`python -m hpdl.train --device gpu` end to end without a GPU, on tests/fakegpu: a stand-in for CuPy
whose kernels are kernels/*.cu built for the host. The GPU code paths (CuPy arrays, the fused
kernels, the device-side gradient check, staging through pinned buffers between ranks) run,
launch the kernels they should, and train as the CPU path does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_mpi_cli import MPIRUN

ROOT = Path(__file__).resolve().parents[2]
FAKEGPU = ROOT / "tests" / "fakegpu"
# The host runs a kernel's blocks one after another: 3 blocks per grid row keeps that quick, and
# every grid-stride loop wraps.
BOOT = "import sys, hpdl.kernels as k; k.MAX_GRID = 3; from hpdl.train import main; sys.exit(main(sys.argv[1:]))"
MODELS = {"mlp": "{hidden: [16]}", "cnn": "{channels: [2, 3], hidden: 8, dropout: 0.5}",
          "resnet": "{channels: [2, 2, 2]}", "mlp-gelu": "{hidden: [16], activation: gelu}"}
# Both paths are float32 and add in different orders (kernel reductions, cuBLAS vs BLAS being
# the same NumPy here): a few steps leave them this close; a wrong update or layer would not.
RTOL = 1e-4


def fake_gpu_env() -> dict:
    """The environment of a process whose `import cupy` finds the stand-in, one BLAS thread."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAKEGPU), str(ROOT)]), "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1"}


REFUSALS = """
import numpy as np, cupy, hpdl.kernels as k
print(hasattr(cupy, "zeros"), hasattr(cupy, "fromregex"))
relu = k.load("bias_act").get_function("relu_forward")
y = cupy.zeros(4, dtype=cupy.float32)
relu((1,), (32,), (cupy.ones(4, dtype=cupy.float32), y, np.uint64(4)))
try:
    relu((1,), (32,), (np.ones(4, np.float32), y, np.uint64(4)))
except TypeError as e:
    print("refused:", e)
"""


def test_the_stand_in_refuses_what_cupy_refuses():
    """The stand-in has `cupy.zeros` but not `cupy.fromregex` (NumPy has it, CuPy 14.2 does not), and
    its kernels take device arrays and refuse a host one: a NumPy-only call or a host array in
    hpdl's GPU path fails here as it would on a GPU."""
    proc = subprocess.run([sys.executable, "-c", REFUSALS], capture_output=True, text=True, timeout=120,
                          env=fake_gpu_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "True False"
    assert lines[1] == "refused: relu_forward: argument 0 is float *, launched with ndarray of float32"


def train(device: str, args: list[str], ranks: int = 1, launches: Path | None = None, env: dict | None = None) -> dict:
    """hpdl.train's RESULT record; tests/fakegpu stands in for CuPy on both devices."""
    env = {**fake_gpu_env(), "FAKEGPU_LAUNCHES": str(launches or ""), **(env or {})}
    cmd = [sys.executable, "-c", BOOT, "--device", device, "--no-progress", "--eval-every", "0", *args]
    if ranks > 1:
        cmd = [str(MPIRUN), "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def options(tiny_h5, tmp_path, model: str) -> list[str]:
    config = tmp_path / f"{model}.yaml"
    config.write_text(f"model: {model.split('-')[0]}\nmodel_options: {MODELS[model]}\n")
    return ["--data", str(tiny_h5), "--config", str(config), "--batch-size", "8", "--max-steps", "3"]


@pytest.mark.parametrize("model, kernels", [
    ("mlp", {"softmax_xent", "sgd_update", "any_nonfinite", "bias_relu_forward", "bias_relu_backward"}),
    ("mlp-gelu", {"softmax_xent", "sgd_update", "any_nonfinite", "bias_gelu_forward", "bias_gelu_backward"}),
    ("cnn", {"softmax_xent", "sgd_update", "any_nonfinite", "im2col", "col2im", "bias_relu_forward", "relu_forward",
             "bias_relu_backward", "maxpool_forward", "maxpool_backward"}),
    ("resnet", {"softmax_xent", "sgd_update", "any_nonfinite", "im2col", "col2im", "batchnorm_forward", "relu_forward",
                "batchnorm_backward", "bias_relu_backward"})])
def test_one_process_gpu_run_uses_the_kernels_and_trains_as_the_cpu(tiny_h5, tmp_path, model, kernels):
    """Three SGD steps and the evaluation on the fake GPU launch the model's kernels and end with
    the CPU run's train and test loss (dropout masks included: both draw them on the host)."""
    args = options(tiny_h5, tmp_path, model)
    counts = tmp_path / "launches.json"
    gpu, cpu = train("gpu", args, launches=counts), train("cpu", args)
    assert kernels <= set(json.loads(counts.read_text()))
    assert gpu["steps"] == cpu["steps"] == 3
    for key in ("train_loss", "test_loss"):
        assert gpu[key] == pytest.approx(cpu[key], rel=RTOL), key


COUNT = ("import json, sys, cupy, hpdl.kernels as k; k.MAX_GRID = 3; from benchmarks.launches import count_step; "
         "print(json.dumps({m: [dict(c) for c in count_step(cupy, m, int(sys.argv[1]))] for m in sys.argv[2:]}))")


def count_steps(batch: int, *models: str) -> dict:
    """{model: [kernels, array operations]} of one float32 GPU step at `batch`, on the stand-in."""
    proc = subprocess.run([sys.executable, "-c", COUNT, str(batch), *models], capture_output=True, text=True,
                          timeout=300, env=fake_gpu_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_gpu_step_takes_one_update_launch_and_no_winograd_products_or_layout_copies():
    """benchmarks.launches counts one float32 GPU step on the stand-in: the mlp's is exactly its 8
    hpdl kernels (fused Linear+ReLU, one batched update) and its 8 products; the cnn's wide
    convolution takes im2col on the GPU, so its step has 11 products, not Winograd's 16 per pass;
    neither the cnn nor the resnet copies an activation to another layout or falls back from a
    kernel for want of one (the stand-in, like CuPy, writes a ufunc's result C-ordered); and a batch
    of one, a pipeline's micro-batch of 1, whose batch axis may carry any stride, takes the same
    launches as a batch of 32."""
    counts = count_steps(32, "mlp", "cnn", "resnet")
    assert counts["mlp"][0] == {"bias_relu_forward": 2, "bias_relu_backward": 2, "softmax_xent": 1, "any_nonfinite": 1,
                                "record_refusal": 1, "sgd_update": 1}
    assert counts["mlp"][1]["matmul"] == 8   # 3 Linear layers: 3 forward, 3 dW, 2 dx
    assert counts["cnn"][1]["matmul"] == 11 and counts["cnn"][0]["col2im"] == 1
    for model in ("cnn", "resnet"):   # a ReLU backward off its kernel would show as a `greater`
        ops = counts[model][1]
        assert "ascontiguousarray (a copy)" not in ops and "greater" not in ops, (model, ops)
    assert counts["resnet"][1]["setitem (a copy or fill)"] == 1   # GlobalAvgPool's dx, nothing else
    assert count_steps(1, "cnn", "resnet") == {m: counts[m] for m in ("cnn", "resnet")}


needs_mpirun = pytest.mark.skipif(not MPIRUN.exists(), reason="mpirun (the mpich wheel) is not installed")


@needs_mpirun
@pytest.mark.parametrize("aware", ["0", "1"], ids=["staged", "cuda-aware"])
@pytest.mark.parametrize("layout", [["--stages", "2"], ["--stages", "1", "--algorithm", "sync"]],
                         ids=["pipeline", "data-parallel"])
def test_two_rank_gpu_runs_move_device_arrays_and_train_as_the_cpu(tiny_h5, tmp_path, layout, aware):
    """A 2-stage pipeline and 2-replica synchronous SGD on the fake GPU move activations, gradients
    and allreduce buckets through pinned host buffers (HPDL_CUDA_AWARE_MPI=0) or hand MPI the device
    arrays (=1), and end with the CPU runs' losses."""
    args = [*options(tiny_h5, tmp_path, "mlp"), *layout]
    gpu, cpu = train("gpu", args, ranks=2, env={"HPDL_CUDA_AWARE_MPI": aware}), train("cpu", args, ranks=2)
    assert gpu["steps"] == cpu["steps"] == 3
    assert gpu["test_loss"] == pytest.approx(cpu["test_loss"], rel=RTOL)


@needs_mpirun
@pytest.mark.parametrize("ranks, layout", [
    (2, ["--stages", "1", "--algorithm", "sync", "--lr-method", "lena"]),
    (2, ["--stages", "1", "--algorithm", "avg", "--tau", "2"]),
    (2, ["--stages", "1", "--algorithm", "bmuf", "--tau", "2"]),
    (2, ["--stages", "1", "--algorithm", "easgd-sync"]),
    (3, ["--stages", "2", "--algorithm", "pipelined-easgd", "--ps", "1"]),
    (3, ["--stages", "2", "--algorithm", "pipelined-dcasgd", "--ps", "1"]),
    (4, ["--stages", "2", "--replicas", "2", "--algorithm", "sync"])],
    ids=["sync-lena", "avg", "bmuf", "easgd-sync", "pipelined-easgd", "pipelined-dcasgd", "2x2"])
def test_deterministic_algorithms_on_the_gpu_train_as_the_cpu(tiny_h5, tmp_path, ranks, layout):
    """Every algorithm whose result does not depend on message timing ends, on the fake GPU, with the
    CPU run's test loss: LENA over replicas, model averaging, BMUF, synchronous EASGD, both pipelined
    parameter-server rules, and stages x replicas."""
    args = [*options(tiny_h5, tmp_path, "mlp"), *layout]
    gpu, cpu = train("gpu", args, ranks=ranks), train("cpu", args, ranks=ranks)
    assert gpu["test_loss"] == pytest.approx(cpu["test_loss"], rel=RTOL)


@needs_mpirun
@pytest.mark.parametrize("ranks, layout", [
    (3, ["--algorithm", "easgd", "--ps", "1", "--tau", "1"]), (3, ["--algorithm", "dcasgd-a", "--ps", "1"]),
    (2, ["--algorithm", "hogwild"])], ids=["easgd", "dcasgd-a", "hogwild"])
def test_asynchronous_algorithms_on_the_gpu_finish(tiny_h5, tmp_path, ranks, layout):
    """Parameter-server EASGD and DC-ASGD (workers push and take replies through pinned buffers) and
    Hogwild on the fake GPU run their steps to a finite loss; their order depends on timing, so
    there is no CPU twin to equal."""
    res = train("gpu", [*options(tiny_h5, tmp_path, "mlp"), "--stages", "1", *layout], ranks=ranks)
    assert np.isfinite(res["test_loss"]) and res["steps"] == 3


@pytest.mark.parametrize("flags", [["--optimizer", "adamw"], ["--lr-method", "lars"], ["--lr-method", "lamb"],
                                   ["--lr-method", "lena", "--accumulate", "2"], ["--precision", "tf32"]],
                         ids=["adamw", "lars", "lamb", "lena", "tf32"])
def test_optimizers_and_lr_methods_on_the_gpu_train_as_the_cpu(tiny_h5, tmp_path, flags):
    """AdamW, LARS and LAMB trust ratios and LENA's layer norms (sum_squares over device arrays, the
    micro-batch statistics summed on the device) and TF32 products on the fake GPU end with the CPU
    run's losses."""
    args = [*options(tiny_h5, tmp_path, "mlp"), *flags]
    gpu, cpu = train("gpu", args), train("cpu", args)
    for key in ("train_loss", "test_loss"):
        assert gpu[key] == pytest.approx(cpu[key], rel=RTOL), key


def test_a_gpu_run_resumes_exactly(tiny_h5, tmp_path):
    """Checkpoints written from device arrays (through the device check's settle) and read back onto
    the device: 2 steps, then a resume to 4, end exactly where 4 uninterrupted steps do."""
    # A constant rate: --max-steps sets the length of a decaying schedule, which would differ.
    base = [*options(tiny_h5, tmp_path, "cnn")[:-2], "--lr-schedule", "constant"]
    args = [*base, "--checkpoint-dir", str(tmp_path / "ckpt")]
    train("gpu", [*args, "--max-steps", "2"])
    resumed = train("gpu", [*args, "--max-steps", "4", "--resume"])
    straight = train("gpu", [*base, "--max-steps", "4"])
    assert resumed["steps"] == straight["steps"] == 4
    assert resumed["test_loss"] == straight["test_loss"] and resumed["train_loss"] == straight["train_loss"]

"""NaN and Inf in an update: detected in Optimizer.step, reported with step and layer, or skipped by option."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpdl.data.loader import Loader
from hpdl.models import build_model
from hpdl.nonfinite import NonFiniteError, nonfinite_layers
from hpdl.optim import OPTIMIZERS, make_optimizer
from hpdl.train import main as train_main

MPIRUN = Path(sys.executable).parent / "mpirun"
TIMEOUT_S = 120

# -- the optimizer: detection, naming, stop and skip ----------------------------------------------

def setup(name: str):
    """A small mlp (Flatten, Linear, ReLU, Linear), its parameters and an optimizer over it."""
    model = build_model("mlp", hidden=[8])
    params = model.init(0, np, np.float32)
    return model.layers, params, make_optimizer(name, model.layers)


def gradients(layers, params, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{n: rng.standard_normal(p[n].shape).astype(np.float32) for n in layer.trainable}
            for layer, p in zip(layers, params)]


def snapshot(params, opt) -> tuple[list[dict], dict]:
    return [{k: v.copy() for k, v in p.items()} for p in params], opt.state_dict()


def assert_same(a, b) -> None:
    """Equal parameters and optimizer state, bitwise, apart from the count of skipped steps."""
    (pa, sa), (pb, sb) = a, b
    for x, y in zip(pa, pb):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    sa, sb = ({k: v for k, v in s.items() if k != "skipped"} for s in (sa, sb))
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_stop_names_step_and_layer_and_applies_nothing(name):
    """A NaN in one tensor raises NonFiniteError naming the 1-based step and that layer only; nothing changes."""
    layers, params, opt = setup(name)
    opt.step(params, gradients(layers, params, 0), 0.01)
    grads = gradients(layers, params, 1)
    grads[3]["W"][2, 1] = np.nan
    before = snapshot(params, opt)
    with pytest.raises(NonFiniteError) as info:
        opt.step(params, grads, 0.01)
    assert str(info.value) == "non-finite update at step 2: NaN or Inf in layer 3 Linear (gradient of W)"
    assert_same(snapshot(params, opt), before)


def test_inf_and_several_layers_are_all_named():
    """+Inf and -Inf are caught like NaN; every offending layer and tensor is listed."""
    layers, params, opt = setup("sgd")
    grads = gradients(layers, params, 0)
    grads[1]["b"][0] = np.inf
    grads[3]["W"][0, 0] = -np.inf
    grads[3]["b"][0] = np.nan
    with pytest.raises(NonFiniteError, match=r"step 1: NaN or Inf in layer 1 Linear \(gradient of b\); "
                                             r"layer 3 Linear \(gradient of W, b\)$"):
        opt.step(params, grads, 0.01)


def test_skip_leaves_state_counts_and_continues_as_if_never_seen(capsys):
    """'skip' drops the update (parameters and state bitwise unchanged), warns with step and layer, counts it,
    and later steps equal those of an optimizer that never saw the bad gradient."""
    layers, params, opt = setup("sgd")
    _, twin_params, twin = setup("sgd")
    opt.on_nonfinite = "skip"
    for o, p in ((opt, params), (twin, twin_params)):
        o.step(p, gradients(layers, p, 0), 0.01)
    bad = gradients(layers, params, 1)
    bad[1]["W"][0, 0] = np.nan
    before = snapshot(params, opt)
    opt.step(params, bad, 0.01)
    assert_same(snapshot(params, opt), before)
    assert opt.skipped == 1 and opt.steps == 1
    warning = capsys.readouterr().err.strip()
    assert warning == ("warning: non-finite update at step 2: NaN or Inf in layer 1 Linear (gradient of W); "
                       "update skipped (1 so far)")
    for o, p in ((opt, params), (twin, twin_params)):
        o.step(p, gradients(layers, p, 2), 0.01)
    for a, b in zip(params, twin_params):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    opt.step(params, bad, 0.01)  # step numbers count the skipped steps: this is the 4th
    assert "at step 4:" in capsys.readouterr().err
    state = opt.state_dict()
    assert int(state["skipped"]) == 2 and int(state["step"]) == 2
    _, _, resumed = setup("sgd")
    resumed.load_state_dict(state)
    assert (resumed.steps, resumed.skipped) == (2, 2)


def test_finite_gradients_whose_sum_overflows_are_applied():
    """Finite float32 gradients near the maximum overflow the detecting sum, yet the scan clears them."""
    layers, params, opt = setup("sgd")
    grads = [{n: np.full_like(g, 3e38) for n, g in layer_grads.items()}
             for layer_grads in gradients(layers, params, 0)]
    w_before = params[1]["W"].copy()
    opt.step(params, grads, 1e-40)
    assert opt.steps == 1 and not np.array_equal(params[1]["W"], w_before)


def test_nonfinite_learning_rate_is_named():
    """A NaN per-layer learning rate (a large-batch rule gone wrong) stops the step like a NaN gradient."""
    layers, params, opt = setup("sgd")
    with pytest.raises(NonFiniteError, match=r"layer 3 Linear \(learning rate nan\)"):
        opt.step(params, gradients(layers, params, 0), [0.1, 0.1, 0.1, float("nan")])


def test_layers_are_named_by_model_index():
    """A pipeline stage's optimizer names its layers by their index in the whole model."""
    layers, params, _ = setup("sgd")
    grads = gradients(layers, params, 0)
    grads[1]["W"][0, 0] = np.nan
    assert nonfinite_layers(layers, grads, [0.1] * 4, first=5) == ["layer 6 Linear (gradient of W)"]


# -- whole runs: one process, through the CLI and in-process ---------------------------------------

def run_args(data: Path, *extra: str) -> list[str]:
    """Six steps of batch 8 at a constant learning rate on the tiny data set."""
    return ["--data", str(data), "--batch-size", "8", "--max-steps", "6", "--lr-schedule", "constant",
            "--no-progress", *extra]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# 1e20 makes the first update's weights so large that the second forward pass overflows.
OVERFLOWING_LR = "1e20"
STOP_LINE = ("error: non-finite update at step 2: NaN or Inf in layer 1 Linear (gradient of W, b); "
             "layer 3 Linear (gradient of W, b); layer 5 Linear (gradient of W, b)")


def test_overflowing_lr_stops_the_cli_naming_step_and_layers(tiny_h5):
    """`python -m hpdl.train --lr 1e20`: exit 2, one error line naming step 2 and the Linear layers, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "hpdl.train", *run_args(tiny_h5, "--lr", OVERFLOWING_LR)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env())
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == ["hpdl.train: " + STOP_LINE]


def poison(monkeypatch, step: int) -> None:
    """Make one training batch (0-based `step`) hold a NaN pixel."""
    original = Loader._batch
    seen = {"train": 0}

    def batch(self, indices):
        x, y = original(self, indices)
        if self.split == "train":
            if seen["train"] == step:
                x[0, 0, 0, 0] = np.nan
            seen["train"] += 1
        return x, y

    monkeypatch.setattr(Loader, "_batch", batch)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_in_the_data_stops_the_run_at_its_step(tiny_h5, monkeypatch, capsys):
    """A NaN pixel in the 4th batch stops a one-process run with exit 2 at step 4, naming the first Linear layer."""
    poison(monkeypatch, 3)
    code = train_main(run_args(tiny_h5))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("hpdl.train: error: non-finite update at step 4: NaN or Inf in layer 1 Linear")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_skip_drops_the_poisoned_update_and_finishes(tiny_h5, tmp_path, monkeypatch, capsys):
    """--on-nonfinite skip: the run completes all 6 steps, warns once naming step 4, and its parameters stay finite."""
    from hpdl.checkpoint import latest_checkpoint, load_checkpoint
    poison(monkeypatch, 3)
    code = train_main(run_args(tiny_h5, "--on-nonfinite", "skip", "--checkpoint-dir", str(tmp_path)))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1].removeprefix("RESULT "))["steps"] == 6
    warnings = [line for line in err.splitlines() if line.startswith("warning: non-finite")]
    assert len(warnings) == 1 and "at step 4:" in warnings[0] and "update skipped (1 so far)" in warnings[0]
    params, _, _ = load_checkpoint(latest_checkpoint(tmp_path))
    assert all(np.isfinite(v).all() for p in params for v in p.values())


# -- synchronous multi-rank runs: the same check in the stages' optimizers --------------------------

needs_mpirun = pytest.mark.skipif(not MPIRUN.exists(), reason="mpirun (the mpich wheel) is not installed")


def mpirun(n: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(MPIRUN), "-n", str(n), sys.executable, "-m", "hpdl.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env())


@needs_mpirun
@pytest.mark.parametrize("layout", [["--stages", "1", "--replicas", "2"], ["--stages", "2", "--replicas", "1"]],
                         ids=["2-replicas", "2-stages"])
def test_overflow_stops_a_synchronous_mpi_run(layout, tiny_h5):
    """mpirun -n 2 (replicas averaging gradients, or a 2-stage pipeline): the job exits 2 naming step 2."""
    proc = mpirun(2, *run_args(tiny_h5, "--lr", OVERFLOWING_LR, *layout))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "error: non-finite update at step 2: NaN or Inf in layer " in proc.stderr


@needs_mpirun
def test_skip_keeps_replicas_in_step(tiny_h5):
    """With 2 replicas the reduced gradient is NaN on both, so both skip the same steps and the run finishes."""
    proc = mpirun(2, *run_args(tiny_h5, "--lr", OVERFLOWING_LR, "--stages", "1", "--replicas", "2",
                               "--on-nonfinite", "skip"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("RESULT "))["steps"] == 6
    # Counted in the whole text: two ranks' lines can interleave within one line of mpirun's output.
    assert proc.stderr.count("warning: non-finite") == proc.stderr.count("update skipped") == 2 * 5


# -- the check on the device (GPU runs): no read-back per step, the verdict read in settle() --------

@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_device_check_halts_every_update_from_the_refused_one(name):
    """With check_on_device, a NaN gradient at step 3 leaves parameters and state as after step 2 for
    that and every later step, and settle() (and state_dict) then raise naming step 3."""
    layers, params, opt = setup(name)
    _, ref_params, ref = setup(name)
    opt.check_on_device()
    for step in range(5):
        grads = gradients(layers, params, step)
        if step == 2:
            grads[1]["W"][0, 0] = np.nan
        opt.step(params, grads, 0.01)
        if step < 2:
            ref.step(ref_params, grads, 0.01)
            opt.settle()   # nothing refused yet
    assert_same((params, {k: v for k, v in opt.state.items()}), (ref_params, dict(ref.state)))
    for read in (opt.settle, opt.state_dict):
        with pytest.raises(NonFiniteError, match=r"^non-finite update at step 3: NaN or Inf in the gradients"):
            read()


def test_device_check_needs_a_halting_rule_and_stop():
    """LARS and LAMB (their updates are not the halting kernels) and --on-nonfinite skip refuse check_on_device."""
    for name, policy in (("lars", "stop"), ("lamb", "stop"), ("sgd", "skip")):
        layers, params, opt = setup(name)
        opt.on_nonfinite = policy
        with pytest.raises(ValueError, match="cannot halt"):
            opt.check_on_device()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_device_checks_stop_the_cli_at_the_refused_step(tiny_h5, monkeypatch, capsys):
    """A run whose optimizer checks on the device (as on a GPU) stops with exit 2 at the NaN batch's step,
    read at the next host sync (here the final evaluation), without a traceback."""
    import hpdl.trainer
    monkeypatch.setattr(hpdl.trainer, "device_checks", lambda run: True)
    poison(monkeypatch, 3)
    code = train_main(run_args(tiny_h5))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == ("hpdl.train: error: non-finite update at step 4: NaN or Inf in the gradients "
                   "(checked on the device: layers not named)")


def test_device_checks_only_in_float32_gpu_runs_whose_updates_can_halt():
    """hpdl.train checks on the device exactly for GPU float32 runs with SGD or AdamW, no fp16 scaler
    and --on-nonfinite stop; every other run keeps the host check that names the layers."""
    from types import SimpleNamespace as NS

    from hpdl.trainer import device_checks
    layers = build_model("mlp", hidden=[8]).layers

    def run(gpu=True, dtype="float32", scaler=None, optimizer="sgd", policy="stop"):
        return NS(backend=NS(is_gpu=gpu, dtype=np.dtype(dtype)), scaler=scaler,
                  optimizer=make_optimizer(optimizer, layers), cfg=NS(on_nonfinite=policy))

    assert device_checks(run()) and device_checks(run(optimizer="adamw"))
    for change in ({"gpu": False}, {"dtype": "float64"}, {"scaler": object()}, {"optimizer": "lars"},
                   {"optimizer": "lamb"}, {"policy": "skip"}):
        assert not device_checks(run(**change)), change

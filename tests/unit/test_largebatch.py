"""Large-batch learning-rate methods: each rule on hand-computed cases, S = 1 reductions, accumulation."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpdl.comm.collectives import BucketAllreduce
from hpdl.flat import Flat
from hpdl.layers import Flatten, Linear, ReLU
from hpdl.optim import LAMB, LARS, make_lr_method
from hpdl.optim.largebatch import EPS
from hpdl.train import main

MPIRUN = Path(sys.executable).parent / "mpirun"
TWO = [Linear(2, 1), Linear(1, 1)]  # two layers: W (1, 2) + b (1,), and W (1, 1) + b (1,)


def grads(w0, b0, w1, b1):
    return [{"W": np.array([w0], float), "b": np.array([b0], float)},
            {"W": np.array([[w1]], float), "b": np.array([b1], float)}]


# Two micro-batches. Layer 0: g = (3, 0, 0) and (1, 0, 0): top = (9 + 1) / 2 = 5, bot = |(2, 0, 0)|^2 = 4.
# Layer 1: g = (1, 0) and (-1, 0): top = 1, bot = 0, so its ratio hits the cap S = 2.
# The whole model: top = 6, bot = 4.
MICRO = [grads([3, 0], 0, 1, 0), grads([1, 0], 0, -1, 0)]
MEAN = grads([2, 0], 0, 0, 0)
MICRO_SQ = np.array([9.0 + 1.0, 1.0 + 1.0])   # per layer: sum over micro-batches of |g_l^(i)|^2
R0, R1, WHOLE = (5 + EPS) / (4 + EPS), 2.0, (6 + EPS) / (4 + EPS)


def method(name, S=2, warmup=0, lr=0.1):
    return make_lr_method(name, TWO, lr, "constant", 100, S, warmup)


def test_lena_scales_each_layer_by_its_own_gain_ratio():
    """LENA: lr_l = min(r_l, S) x base lr; the capped layer's progress advances by the whole model's ratio."""
    lena = method("lena")
    np.testing.assert_allclose(lena.rates(MEAN, MICRO_SQ), [0.1 * R0, 0.1 * R1], rtol=1e-12)
    np.testing.assert_allclose(lena.last["gain"], [R0, R1], rtol=1e-12)
    np.testing.assert_allclose(lena.progress, [R0, WHOLE], rtol=1e-12)


def test_lena_warms_each_layer_up_by_its_progress():
    """With warm-up W, lr_l = scale_l x base x progress_l / W, progress counted before this update."""
    lena = method("lena", warmup=4)
    assert lena.rates(MEAN, MICRO_SQ) == [0.0, 0.0]
    # Same statistics again: the averages stay put, progress is one update's worth.
    np.testing.assert_allclose(lena.rates(MEAN, MICRO_SQ), [0.1 * R0 * R0 / 4, 0.1 * R1 * WHOLE / 4], rtol=1e-12)


def test_gain_ratios_are_smoothed_with_weight_S_over_1000():
    """A second update moves the averages of top and bot by S/1000 of the way to the new values."""
    lena = method("lena")
    lena.rates(MEAN, MICRO_SQ)
    # Second update: layer 0's micro-batches agree, g = (2, 0, 0) twice: top = bot = 4; layer 1 unchanged.
    lena.rates(MEAN, np.array([8.0, 2.0]))
    theta = 2 / 1000
    top0, bot0 = 5 + theta * (4 - 5), 4.0
    np.testing.assert_allclose(lena.last["gain"][0], (top0 + EPS) / (bot0 + EPS), rtol=1e-12)


def test_a_chosen_smoothing_weight_replaces_S_over_1000():
    """--gain-smoothing 0.5 moves the averages half way to each new value."""
    lena = make_lr_method("lena", TWO, 0.1, "constant", 100, 2, 0, smoothing=0.5)
    lena.rates(MEAN, MICRO_SQ)
    lena.rates(MEAN, np.array([8.0, 2.0]))
    np.testing.assert_allclose(lena.last["gain"][0], (4.5 + EPS) / (4 + EPS), rtol=1e-12)


def test_adascale_uses_one_gain_ratio_for_the_whole_model():
    """AdaScale: every layer gets r x base lr with r from the summed top and bot."""
    ada = method("adascale")
    np.testing.assert_allclose(ada.rates(MEAN, MICRO_SQ), [0.1 * WHOLE] * 2, rtol=1e-12)


def test_linear_scaling_ramps_from_base_to_S_times_base():
    """lsw (and lars): base x S after warm-up, ramped linearly from base; lamb scales by sqrt(S)."""
    lsw = method("lsw", S=4, warmup=10)
    lrs = [lsw.rates(MEAN, None)[0] for _ in range(11)]
    np.testing.assert_allclose([lrs[0], lrs[5], lrs[10]], [0.1, 0.4 * (0.25 + 0.75 * 0.5), 0.4], rtol=1e-12)
    lamb = method("lamb", S=4, warmup=0, lr=1e-3)
    assert lamb.rates(MEAN, None) == [pytest.approx(1e-3 * math.sqrt(4))] * 2


@pytest.mark.parametrize("name", ["lena", "adascale"])
def test_one_micro_batch_is_the_base_schedule(name):
    """With S = 1 every method gives the base schedule (with its warm-up) exactly, whatever the gradients."""
    m = make_lr_method(name, TWO, 0.1, "cosine", 20, 1, 5)
    base = make_lr_method("none", TWO, 0.1, "cosine", 20, 1, 5)
    for t in range(20):
        g = grads([t, 1], 2, -t, 0.5)
        assert m.rates(g, MICRO_SQ) == base.rates(g, None), t


def test_lars_scales_weights_by_the_trust_ratio_and_leaves_biases():
    """LARS step on w = (3, 4), g = (0.6, 0.8): local = eta 5 / (1 + wd 5); the bias gets plain SGD."""
    layer = Linear(2, 1)
    params = [{"W": np.array([[3.0, 4.0]]), "b": np.array([1.0])}]
    g = [{"W": np.array([[0.6, 0.8]]), "b": np.array([0.5])}]
    opt = LARS([layer], momentum=0.9, eta=0.01, weight_decay=0.1)
    opt.step(params, g, 1.0)
    local = 0.01 * 5 / (1 + 0.1 * 5 + 1e-8)
    d1 = local * (np.array([0.6, 0.8]) + 0.1 * np.array([3.0, 4.0]))
    np.testing.assert_allclose(params[0]["W"][0], [3.0, 4.0] - d1, rtol=1e-12)
    np.testing.assert_allclose(params[0]["b"], [0.5], rtol=1e-12)  # 1 - 1.0 x 0.5, no decay, no trust
    w = params[0]["W"][0].copy()
    opt.step(params, g, 1.0)  # momentum: b = 0.9 b + lr local (g + wd w)
    wn = np.linalg.norm(w)
    d2 = 0.01 * wn / (1 + 0.1 * wn + 1e-8) * (np.array([0.6, 0.8]) + 0.1 * w)
    np.testing.assert_allclose(params[0]["W"][0], w - (0.9 * d1 + d2), rtol=1e-12)


def test_lamb_first_step_by_hand():
    """LAMB step 1: m^ = g, v^ = g^2, r = g / (|g| + eps) + wd w, w -= lr ||w|| / ||r|| r; bias: trust 1, no decay."""
    layer = Linear(2, 1)
    params = [{"W": np.array([[3.0, 4.0]]), "b": np.array([1.0])}]
    g = [{"W": np.array([[0.6, 0.8]]), "b": np.array([-0.5])}]
    LAMB([layer], weight_decay=0.1).step(params, g, 0.01)
    r = np.array([0.6, 0.8]) / (np.array([0.6, 0.8]) + 1e-6) + 0.1 * np.array([3.0, 4.0])
    np.testing.assert_allclose(params[0]["W"][0], [3.0, 4.0] - 0.01 * 5 / np.linalg.norm(r) * r, rtol=1e-12)
    np.testing.assert_allclose(params[0]["b"], [1.0 + 0.01 * 0.5 / (0.5 + 1e-6)], rtol=1e-12)


def test_trust_ratio_is_one_for_a_zero_tensor():
    """A zero weight (or zero update) has no norm to trust: LARS then takes the plain step."""
    params = [{"W": np.zeros((1, 2)), "b": np.zeros(1)}]
    LARS([Linear(2, 1)], momentum=0.0, eta=0.01).step(params, [{"W": np.ones((1, 2)), "b": np.ones(1)}], 0.5)
    np.testing.assert_allclose(params[0]["W"], [[-0.5, -0.5]])


def test_statistics_ride_in_the_last_allreduce_bucket():
    """With leading statistics the buckets still tile the whole vector, and the stats go with layer 0's bucket."""
    layers = [Flatten(), ReLU(), Linear(300, 200), ReLU(), Linear(200, 100), Linear(100, 10)]
    params = [layer.init(np.random.default_rng(0), np, np.float32) for layer in layers]
    flat = Flat(layers, params, np, np.float32, stats=len(layers))
    reducer = BucketAllreduce(None, flat, bucket_bytes=64 * 1024)
    spans = sorted((s.start, s.stop) for _, s in reducer.buckets)
    assert spans[0][0] == 0 and spans[-1][1] == flat.vector.size
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    first, span = reducer.buckets[-1]
    assert first == 2 and span.start == 0  # started when the lowest layer with parameters is done


def checkpoint_params(directory: Path) -> dict[str, np.ndarray]:
    path = sorted(directory.glob("step-*.h5"))[-1]
    out = {}
    with h5py.File(path) as f:
        f["params"].visititems(lambda n, d: out.__setitem__(n, d[()]) if isinstance(d, h5py.Dataset) else None)
    return out


def small_mlp(tmp_path) -> list[str]:
    """Flags of a small float64 mlp, quick to train and to evaluate."""
    config = tmp_path / "small.yaml"
    config.write_text("model: mlp\nmodel_options: {hidden: [64, 32]}\ndtype: float64\n")
    return ["--config", str(config)]


def train(mnist_h5, tmp_path, name, *flags, capsys):
    out = tmp_path / name
    argv = ["--data", str(mnist_h5), *small_mlp(tmp_path), "--no-progress", "--max-steps", "8", "--epochs", "1",
            "--checkpoint-dir", str(out), "--metrics", str(out / "m.jsonl"), *flags]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    return checkpoint_params(out), [json.loads(line) for line in (out / "m.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["lena", "adascale"])
def test_S_1_training_is_plain_sgd(mnist_h5, tmp_path, capsys, name):
    """One process without accumulation: lena and adascale train bitwise like plain SGD on the base schedule."""
    flags = ["--warmup-steps", "4"]
    plain, _ = train(mnist_h5, tmp_path, "plain", *flags, capsys=capsys)
    scaled, lines = train(mnist_h5, tmp_path, name, "--lr-method", name, *flags, capsys=capsys)
    for key in plain:
        np.testing.assert_array_equal(plain[key], scaled[key], err_msg=key)
    records = [r for r in lines if r["kind"] == "lr"]
    assert len(records) == 8 and records[0]["layers"] == ["1:Linear", "3:Linear", "5:Linear"]
    assert all(g == 1.0 for r in records for g in r["gain"])


def test_accumulation_equals_the_larger_batch(mnist_h5, tmp_path, capsys):
    """4 accumulated micro-batches of 32 take the step of one batch of 128 (float64, < 1e-12)."""
    big, _ = train(mnist_h5, tmp_path, "big", "--batch-size", "128", capsys=capsys)
    acc, _ = train(mnist_h5, tmp_path, "acc", "--batch-size", "32", "--accumulate", "4", capsys=capsys)
    for key in big:
        np.testing.assert_allclose(acc[key], big[key], rtol=0, atol=1e-12, err_msg=key)


@pytest.mark.skipif(not MPIRUN.exists(), reason="mpirun (the mpich wheel) is not installed")
def test_replicas_fold_micro_norms_into_the_allreduce(mnist_h5, tmp_path, capsys):
    """LENA on 2 sync replicas x 2 accumulation steps (S = 4) sees the gain ratios and takes the steps
    of one process accumulating 4: the micro-batch norms travel in the gradient allreduce."""
    flags = ["--data", str(mnist_h5), *small_mlp(tmp_path), "--max-steps", "6", "--epochs", "1",
             "--batch-size", "64", "--lr-method", "lena", "--warmup-steps", "8", "--no-progress"]
    one = tmp_path / "one.jsonl"
    assert main([*flags, "--accumulate", "4", "--metrics", str(one)]) == 0
    ref = json.loads(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("RESULT "))
    two = tmp_path / "two.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run([str(MPIRUN), "-n", "2", sys.executable, "-m", "hpdl.train", *flags, "--stages", "1",
                           "--accumulate", "2", "--metrics", str(two)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
    assert res["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-10)

    def lr_records(path):
        return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "lr"]
    a, b = lr_records(one), lr_records(two)
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(rb["gain"], ra["gain"], rtol=1e-9)
        np.testing.assert_allclose(rb["lr"], ra["lr"], rtol=1e-9)
    assert max(max(r["gain"]) for r in a) > 1.05  # the ratios measured something


@pytest.mark.parametrize("argv, needle", [
    (["--accumulate", "0"], "accumulate must be at least 1"),
    (["--lr-method", "lars", "--optimizer", "adamw"], "--lr-method lars is its own update rule"),
    (["--lr-method", "lena", "--accumulate", "1000"], "exceeds the training set"),
    (["--trust-coefficient", "0"], "trust_coefficient must be positive"),
])
def test_bad_large_batch_options_are_one_line_errors(mnist_h5, capsys, argv, needle):
    """Misfit accumulation and method options exit 2 with one line, no traceback."""
    assert main(["--data", str(mnist_h5), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("ranks", [1, 2])
def test_lena_resumes_exactly(mnist_h5, tmp_path, ranks):
    """Stopped at step 4 and resumed to 8, a LENA run (mid warm-up) ends with the straight run's test loss:
    its gain averages and layer progress are in the checkpoint (one process, and sharded on 2 replicas)."""
    if ranks > 1 and not MPIRUN.exists():
        pytest.skip("mpirun (the mpich wheel) is not installed")
    launch = [str(MPIRUN), "-n", str(ranks)] if ranks > 1 else []
    base = [*launch, sys.executable, "-m", "hpdl.train", "--data", str(mnist_h5), *small_mlp(tmp_path),
            "--lr-method", "lena", "--accumulate", str(4 // ranks), "--batch-size", "32", "--warmup-steps", "20",
            "--epochs", "1", "--lr-schedule", "constant", "--no-progress", *(["--stages", "1"] if ranks > 1 else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

    def test_loss(*flags):
        proc = subprocess.run([*base, *flags], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("RESULT "))["test_loss"]
    straight = test_loss("--max-steps", "8")
    ckpt = str(tmp_path / "ckpt")
    test_loss("--max-steps", "4", "--checkpoint-dir", ckpt, "--checkpoint-every", "4")
    assert test_loss("--max-steps", "8", "--checkpoint-dir", ckpt, "--resume") == straight

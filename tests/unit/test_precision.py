"""--precision: the policy, fp16 products, dynamic loss scaling, and fp16 training runs (one process and MPI)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpdl.checkpoint import latest_checkpoint, load_checkpoint
from hpdl.layers import Conv2d, Linear
from hpdl.layers.conv import im2col
from hpdl.models import build_model
from hpdl.nonfinite import NonFiniteError
from hpdl.optim import make_optimizer
from hpdl.optim import loss_scale
from hpdl.optim.loss_scale import LossScaler
from hpdl.precision import FP32, POLICIES, current, matmul, parse_precision, use
from hpdl.trainer import loss_and_grads
from hpdl.train import main as train_main

FP16, TF32 = POLICIES["fp16"], POLICIES["tf32"]
U16 = 2.0 ** -11   # float16's unit roundoff (11-bit significand)
U32 = 2.0 ** -24   # float32's
MPIRUN = Path(sys.executable).parent / "mpirun"
TIMEOUT_S = 120


def rounded(a: np.ndarray) -> np.ndarray:
    """a rounded to float16 and widened back to float32 (exactly)."""
    with np.errstate(over="ignore"):
        return a.astype(np.float16).astype(np.float32)


def away_from_zero(rng, shape, scale: float) -> np.ndarray:
    """float32 values of random sign with magnitudes in [scale/2, 2 scale]: no float16 subnormals after scaling."""
    return (rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 2.0, shape) * scale).astype(np.float32)


# -- the policy -------------------------------------------------------------------------------------

def test_policies_parse_and_an_unknown_name_is_one_line():
    """Each --precision value names its policy; fp16 alone rounds operands and needs loss scaling."""
    assert [parse_precision(n).name for n in ("fp32", "tf32", "fp16")] == ["fp32", "tf32", "fp16"]
    assert parse_precision("fp16").operands == np.float16 and parse_precision("fp16").loss_scaling
    assert parse_precision("fp32").operands is None and not parse_precision("tf32").loss_scaling
    with pytest.raises(ValueError) as e:
        parse_precision("fp8")
    assert str(e.value) == "unknown precision 'fp8'; choose one of fp32, tf32, fp16"


def test_use_sets_the_policy_for_its_block_only():
    """`use` makes a policy current inside its block and restores the previous one, also after an exception."""
    assert current() is FP32
    with use(FP16):
        assert current() is FP16
        with pytest.raises(RuntimeError):
            with use(TF32):
                assert current() is TF32
                raise RuntimeError
        assert current() is FP16
    assert current() is FP32


# -- products ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shapes", [((33, 70), (70, 21)), ((4, 5, 6), (6, 7))], ids=["2d", "batched"])
def test_fp16_matmul_is_the_float32_product_of_rounded_operands(shapes):
    """Under fp16, matmul equals bitwise the float32 product of the float16-rounded operands (transposed
    views too), returns float32, and differs from the plain float32 product."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    with use(FP16):
        got = matmul(a, b)
        got_t = matmul(b.T, a.T) if a.ndim == 2 else None
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, rounded(a) @ rounded(b))
    assert not np.array_equal(got, a @ b)
    if got_t is not None:
        np.testing.assert_array_equal(got_t, rounded(b).T @ rounded(a).T)


def test_fp16_operand_past_65504_overflows_to_inf():
    """A float16 operand overflows as on the GPU: the rows it touches become inf (what loss scaling detects)."""
    a, b = np.ones((3, 4), np.float32), np.ones((4, 2), np.float32)
    a[1, 2] = 7e4
    with use(FP16):
        out = matmul(a, b)
    assert np.isinf(out[1]).all() and np.isfinite(out[[0, 2]]).all()
    with use(FP32):
        assert np.isfinite(matmul(a, b)).all()


def linear_and_conv_cases(rng):
    """(layer, params, input, output gradient) of a Linear and a Conv2d."""
    lin, conv = Linear(20, 7), Conv2d(3, 4, 3, stride=1, pad=1)
    lp, cp = lin.init(rng, np, np.float32), conv.init(rng, np, np.float32)
    x_lin, x_conv = rng.standard_normal((5, 20)).astype(np.float32), rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    return [(lin, lp, x_lin, rng.standard_normal((5, 7)).astype(np.float32)),
            (conv, cp, x_conv, rng.standard_normal((2, 4, 6, 6)).astype(np.float32))]


@pytest.mark.parametrize("policy", [FP32, TF32], ids=["fp32", "tf32"])
def test_fp32_and_cpu_tf32_are_the_plain_float32_products(policy):
    """fp32 (and tf32 on the CPU) leave Linear and Conv2d bitwise as their `@` formulas: y, dx, dW."""
    rng = np.random.default_rng(1)
    (lin, lp, xl, dyl), (conv, cp, xc, dyc) = linear_and_conv_cases(rng)
    with use(policy):
        y, cache = lin.forward(lp, xl)
        dx, g = lin.backward(lp, cache, dyl)
        yc, ccache = conv.forward(cp, xc)
        dxc, gc = conv.backward(cp, ccache, dyc)
    np.testing.assert_array_equal(y, xl @ lp["W"] + lp["b"])
    np.testing.assert_array_equal(dx, dyl @ lp["W"].T)
    np.testing.assert_array_equal(g["W"], xl.T @ dyl)
    cols = im2col(xc, 3, 1, 1)
    W2 = cp["W"].reshape(4, -1)
    ref = (W2 @ cols + cp["b"][:, None]).reshape(4, 6, 6, 2).transpose(3, 0, 1, 2)
    np.testing.assert_array_equal(yc, ref)
    dy2 = dyc.transpose(1, 2, 3, 0).reshape(4, -1)
    np.testing.assert_array_equal(gc["W"], (dy2 @ cols.T).reshape(cp["W"].shape))
    with use(FP16):  # and fp16 does change them
        assert not np.array_equal(lin.forward(lp, xl)[0], y)
        assert not np.array_equal(conv.backward(cp, ccache, dyc)[1]["W"], gc["W"])


# -- loss scaling -----------------------------------------------------------------------------------

def linear_weight_gradient(x, dy, scale: float) -> np.ndarray:
    """Linear's fp16 weight gradient of output gradient dy, computed at loss scale `scale` and unscaled."""
    layer = Linear(x.shape[1], dy.shape[1])
    params = layer.init(np.random.default_rng(0), np, np.float32)
    with use(FP16):
        _, grads = layer.backward(params, x, dy * np.float32(scale))
    LossScaler(scale).unscale([grads])
    return grads["W"]


def test_unscaled_fp16_gradient_is_within_the_float16_rounding_bound():
    """Tiny output gradients (1e-6, as late in training), scaled by 2^15, unscaled: each weight-gradient
    entry is within the bound of rounding both operands to float16 and summing in float32.

    Bound: the entry is sum_b x_b dy_b. Each operand rounds with relative error <= u = 2^-11 while it
    is a normal float16 (the scale keeps dy there; x is drawn away from zero), so each product term
    is off by <= (2u + u^2)|x_b dy_b|, is exact in float32 (11 x 11 significand bits), and the float32
    sum of B terms adds <= gamma_B = B 2^-24 / (1 - B 2^-24) of sum |terms|; scaling and unscaling by
    a power of two are exact. Without the scale the same gradients are float16 subnormals (< 2^-14),
    whose rounding error is absolute (2^-25), not relative: the bound then fails, which is why the
    scale is there.
    """
    rng = np.random.default_rng(2)
    batch = 64
    x, dy = away_from_zero(rng, (batch, 30), 1.0), away_from_zero(rng, (batch, 9), 1e-6)
    exact = x.astype(np.float64).T @ dy.astype(np.float64)
    magnitude = np.abs(x).astype(np.float64).T @ np.abs(dy).astype(np.float64)
    gamma = batch * U32 / (1 - batch * U32)
    bound = ((2 * U16 + U16 ** 2) * (1 + gamma) + gamma) * magnitude
    scaled = linear_weight_gradient(x, dy, loss_scale.INITIAL_SCALE)
    assert (np.abs(scaled - exact) <= bound).all()
    unscaled = linear_weight_gradient(x, dy, 1.0)
    assert (np.abs(unscaled - exact) > bound).any()


def test_whole_model_fp16_gradients_match_fp32(mnist_h5):
    """Every gradient of a 784-256-256-10 MLP on an MNIST batch, in fp16 at scale 2^15 then unscaled, is
    within 48 u (2.3e-2) of the fp32 gradient in relative norm.

    First order, the first layer's weight gradient passes through 6 products (3 forward, 3 backward)
    with 2 rounded operands each: 12 u relative to the sums of absolute terms. The norm of a gradient
    is smaller than that of its absolute terms where terms cancel; a factor 4 covers that here
    (measured: 21 u for the worst tensor, the first layer's W; 0.6 u for the last layer's).
    """
    from hpdl.data import Loader
    model = build_model("mlp", hidden=[256, 256])
    params = model.init(0, np, np.float32)
    x, y = next(Loader(mnist_h5, "train", 64, seed=0).epoch(0))
    _, g32 = loss_and_grads(model.layers, params, x, y, (0,), 1.0)
    scaler = LossScaler()
    with use(FP16):
        _, g16 = loss_and_grads(model.layers, params, x, y, (0,), scaler.scale)
    scaler.unscale(g16)
    for i, (a, b) in enumerate(zip(g32, g16)):
        for name in a:
            error = np.linalg.norm(a[name] - b[name]) / np.linalg.norm(a[name])
            assert 0 < error <= 48 * U16, (i, name, error)


def small_step_setup():
    """An MLP, its SGD optimizer (momentum, so that skipped state is visible) and one batch's gradients."""
    model = build_model("mlp", hidden=[16])
    params = model.init(0, np, np.float32)
    opt = make_optimizer("sgd", model.layers, momentum=0.9)
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((8, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 8)
    return model.layers, params, opt, lambda: loss_and_grads(model.layers, params, x, y, (0,), 1.0)[1]


def copy_params(params):
    return [{k: v.copy() for k, v in p.items()} for p in params]


def test_overflow_skips_the_update_and_halves_the_scale():
    """An inf gradient: nothing changes (weights, optimizer state), the scale halves, the clean count
    restarts, and the optimizer counts a skipped step, so its later step numbers stay the caller's."""
    layers, params, opt, grads = small_step_setup()
    scaler = LossScaler(1024.0)
    assert scaler.step(opt, params, grads(), 0.1)
    before, state = copy_params(params), opt.state_dict()
    bad = grads()
    bad[1]["W"][0, 0] = np.inf
    assert not scaler.step(opt, params, bad, 0.1)
    for p, q in zip(params, before):
        for k in p:
            np.testing.assert_array_equal(p[k], q[k])
    after = opt.state_dict()
    assert all(np.array_equal(after[k], state[k]) for k in state) and int(after["skipped"]) == 1
    assert (scaler.scale, scaler.clean, scaler.overflows) == (512.0, 0, 1)
    bad = grads()
    bad[1]["b"][0] = np.nan
    opt.on_nonfinite = "stop"
    scaler.scale = 1.0  # at the floor an overflow is the optimizer's to report, numbered from the caller's steps
    with pytest.raises(NonFiniteError, match="non-finite update at step 3: NaN or Inf in layer 1 Linear"):
        scaler.step(opt, params, bad, 0.1)


def test_a_clean_scaled_step_checks_its_gradients_once(monkeypatch):
    """Above the floor the scaler's overflow check is the step's only pass over the gradients (the
    optimizer then checks just the learning rates, and still refuses a NaN one); at the floor the
    optimizer's own check is the only one."""
    import hpdl.nonfinite
    layers, params, opt, grads = small_step_setup()
    passes = []
    real = hpdl.nonfinite.any_nonfinite
    monkeypatch.setattr(hpdl.nonfinite, "any_nonfinite", lambda tensors, flag: (passes.append(1), real(tensors, flag)))
    for scale in (1024.0, 1.0):
        passes.clear()
        assert LossScaler(scale).step(opt, params, grads(), 0.1)
        assert len(passes) == 1, scale
    with pytest.raises(NonFiniteError, match="learning rate nan"):
        LossScaler(1024.0).step(opt, params, grads(), float("nan"))


def test_scale_doubles_after_interval_clean_updates():
    """The scale doubles after `interval` clean updates in a row; an overflow in between restarts the count."""
    layers, params, opt, grads = small_step_setup()
    scaler = LossScaler(8.0, interval=3)
    for _ in range(2):
        scaler.step(opt, params, grads(), 0.01)
    bad = grads()
    bad[1]["W"][...] = np.inf
    scaler.step(opt, params, bad, 0.01)
    assert (scaler.scale, scaler.clean) == (4.0, 0)
    for expected in (4.0, 4.0, 8.0, 8.0, 8.0, 16.0):
        assert scaler.step(opt, params, grads(), 0.01)
        assert scaler.scale == expected
    assert (opt.steps, opt.skipped, scaler.overflows) == (8, 1, 1)


def test_scaler_state_round_trips_and_rejects_bad_state():
    """state_dict/load_state_dict restore scale, clean count and overflows; wrong keys or values raise ValueError."""
    a = LossScaler(64.0)
    a.clean, a.overflows = 5, 2
    b = LossScaler()
    b.load_state_dict(a.state_dict())
    assert (b.scale, b.clean, b.overflows) == (64.0, 5, 2)
    with pytest.raises(ValueError, match="keys"):
        b.load_state_dict({"scale": np.array(2.0)})
    with pytest.raises(ValueError, match="out of range"):
        b.load_state_dict({**a.state_dict(), "scale": np.array(0.5)})


# -- training runs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_yaml(tmp_path_factory, mnist_h5) -> Path:
    path = tmp_path_factory.mktemp("precision") / "small.yaml"
    path.write_text(f"data: {mnist_h5}\nmodel_options: {{hidden: [128]}}\nthreads: 1\n")
    return path


def run_cli(argv, capsys) -> tuple[int, dict | None, str]:
    code = train_main(argv)
    out, err = capsys.readouterr()
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return code, json.loads(last[len("RESULT "):]) if last.startswith("RESULT ") else None, err


def test_fp16_training_reaches_the_fp32_loss(small_yaml, capsys):
    """25 steps of batch 16 (400 MNIST samples): the fp16 run's test loss is within 5% of the fp32 run's
    (measured 0.5%), both well below the untrained ln 10 = 2.30, and fp16 really computed differently."""
    common = ["--config", str(small_yaml), "--max-steps", "25", "--batch-size", "16", "--no-progress",
              "--lr", "0.02", "--lr-schedule", "constant"]
    code32, r32, _ = run_cli(common, capsys)
    code16, r16, _ = run_cli(common + ["--precision", "fp16"], capsys)
    assert code32 == code16 == 0
    assert r32["test_loss"] < 1.0 and r16["test_loss"] < 1.0
    assert abs(r16["test_loss"] - r32["test_loss"]) <= 0.05 * r32["test_loss"]
    assert r16["test_loss"] != r32["test_loss"]
    assert (r16["loss_scale"], r16["overflow_skips"]) == (loss_scale.INITIAL_SCALE, 0) and "loss_scale" not in r32


def test_fp16_overflow_skips_and_lowers_the_scale_instead_of_stopping(small_yaml, capsys):
    """--lr 1e20 blows the weights up after step 1, so every later fp16 product overflows: under the default
    --on-nonfinite stop the run still finishes, each such update skipped and the scale halved (2^15 -> 2^10
    over steps 2-6); once the scale is 1, at step 17, the overflow is the optimizer's to report (exit 2)."""
    common = ["--config", str(small_yaml), "--batch-size", "8", "--no-progress", "--lr", "1e20",
              "--lr-schedule", "constant", "--precision", "fp16"]
    code, result, _ = run_cli(common + ["--max-steps", "6"], capsys)
    assert code == 0 and (result["loss_scale"], result["overflow_skips"]) == (2.0 ** 10, 5)
    code, _, err = run_cli(common + ["--max-steps", "20"], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "hpdl.train: error: non-finite update at step 17: NaN or Inf in layer 1 Linear (gradient of W, b); "
        "layer 3 Linear (gradient of W, b)"]


def test_resume_keeps_the_scaler_state(small_yaml, tmp_path, capsys, monkeypatch):
    """From 2^20 the first updates overflow and, with growth every 3 clean updates, the scale moves both
    ways; stopping at step 7 and resuming to 15 gives bitwise the uninterrupted run's parameters and
    scaler state (scale, clean count, overflows), which the checkpoint holds."""
    monkeypatch.setattr(loss_scale, "INITIAL_SCALE", 2.0 ** 20)
    monkeypatch.setattr(loss_scale, "GROWTH_INTERVAL", 3)
    common = ["--config", str(small_yaml), "--batch-size", "16", "--no-progress", "--lr-schedule", "constant",
              "--precision", "fp16"]
    a, b = tmp_path / "a", tmp_path / "b"
    code, straight, _ = run_cli(common + ["--max-steps", "15", "--checkpoint-dir", str(a)], capsys)
    assert code == 0 and straight["overflow_skips"] > 0
    assert run_cli(common + ["--max-steps", "7", "--checkpoint-dir", str(b), "--checkpoint-every", "7"],
                   capsys)[0] == 0
    _, state, _ = load_checkpoint(latest_checkpoint(b))
    assert {"loss_scale/scale", "loss_scale/clean", "loss_scale/overflows"} <= set(state)
    code, resumed, _ = run_cli(common + ["--max-steps", "15", "--checkpoint-dir", str(b), "--resume"], capsys)
    assert code == 0
    assert (resumed["loss_scale"], resumed["overflow_skips"]) == (straight["loss_scale"], straight["overflow_skips"])
    pa, sa, _ = load_checkpoint(latest_checkpoint(a))
    pb, sb, _ = load_checkpoint(latest_checkpoint(b))
    for la, lb in zip(pa, pb):
        for k in la:
            np.testing.assert_array_equal(la[k], lb[k])
    for k in ("loss_scale/scale", "loss_scale/clean", "loss_scale/overflows", "skipped", "step"):
        assert int(sa[k]) == int(sb[k]), k


@pytest.mark.parametrize("argv, needle", [
    (["--precision", "fp16", "--dtype", "float64"], "--precision fp16 sets how float32 products are computed"),
    (["--precision", "tf32", "--dtype", "float64"], "--precision tf32 sets how float32 products are computed"),
    (["--precision", "fp16", "--algorithm", "avg"], "dynamic loss scaling supports --algorithm sync"),
])
def test_bad_combinations_are_one_line_and_exit_2(argv, needle, small_yaml, capsys):
    """Precision options that cannot run exit 2 with one error line naming the problem, no traceback."""
    code, _, err = run_cli(["--config", str(small_yaml), "--max-steps", "1", "--no-progress", *argv], capsys)
    assert code == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_precision_in_yaml_is_one_line(tmp_path, capsys):
    """`precision: fp8` in a YAML file: exit 2 and one line listing the choices."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("precision: fp8\n")
    code, _, err = run_cli(["--config", str(cfg)], capsys)
    assert code == 2 and err.strip() == "hpdl.train: error: precision must be one of fp32, tf32, fp16, got 'fp8'"


# -- MPI: sync data parallelism ---------------------------------------------------------------------

needs_mpirun = pytest.mark.skipif(not MPIRUN.exists(), reason="mpirun (the mpich wheel) is not installed")


def mpirun(n: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [str(MPIRUN), "-n", str(n), sys.executable, "-m", "hpdl.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)


@needs_mpirun
def test_two_fp16_replicas_train_as_one_process(small_yaml, capsys):
    """mpirun -n 2 --stages 1 in fp16, batch 8 per replica, ends 20 steps at the test loss of one fp16 process
    with batch 16 to 1e-3 (measured 1.1e-5): the replicas scale the loss and unscale the reduced gradient as
    one process does; only the order of the gradient sums differs. A replica that skipped the scale would
    step 2^15 times too short and stay near the untrained loss."""
    common = ["--config", str(small_yaml), "--max-steps", "20", "--lr", "0.02", "--lr-schedule", "constant",
              "--precision", "fp16", "--no-progress"]
    code, one, _ = run_cli(common + ["--batch-size", "16"], capsys)
    proc = mpirun(2, *common, "--batch-size", "8", "--stages", "1")
    assert code == 0 and proc.returncode == 0, proc.stderr[-2000:]
    two = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
    assert abs(two["test_loss"] - one["test_loss"]) <= 1e-3 * one["test_loss"]
    assert two["loss_scale"] == one["loss_scale"]


@needs_mpirun
def test_replicas_skip_the_same_overflows(small_yaml):
    """2 replicas in fp16 with --lr 1e20: the reduced gradient overflows on both, so both skip steps 2-6 and
    halve alike; --debug-checksum 1 checks after every step that their weights are bitwise equal."""
    proc = mpirun(2, "--config", str(small_yaml), "--stages", "1", "--batch-size", "8", "--max-steps", "6",
                  "--lr", "1e20", "--lr-schedule", "constant", "--precision", "fp16", "--debug-checksum", "1",
                  "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
    assert (result["loss_scale"], result["overflow_skips"], result["steps"]) == (2.0 ** 10, 5, 6)


@needs_mpirun
def test_fp16_pipeline_is_refused_with_one_line(small_yaml):
    """fp16 over 2 pipeline stages (no agreement on overflows between stages): exit 2, one error line."""
    proc = mpirun(2, "--config", str(small_yaml), "--stages", "2", "--max-steps", "1", "--precision", "fp16",
                  "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == ["hpdl.train: error: --precision fp16: dynamic loss scaling supports --stages 1 with "
                      "--schedule gpipe or 1f1b, not 2 stages with 1f1b; use --precision fp32 or tf32"]

"""The training CLI: RESULT line, user errors, exact resume, and that training learns."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from hpdl.backend import gpu_available
from hpdl.train import main


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def result_of(out: str) -> dict:
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    return json.loads(last[len("RESULT "):])


def test_short_run_learns_and_reports(mnist_h5, tmp_path, capsys):
    """300 SGD steps of the mlp reach > 95% test accuracy; RESULT has the documented fields."""
    metrics = tmp_path / "m.jsonl"
    code, out, _ = run(["--data", str(mnist_h5), "--max-steps", "300", "--no-progress",
                        "--metrics", str(metrics), "--log-every", "100"], capsys)
    assert code == 0
    res = result_of(out)
    for key in ("test_acc", "test_loss", "epochs", "steps", "samples_per_s", "wall_s"):
        assert key in res
    assert res["steps"] == 300 and res["test_acc"] > 0.95
    lines = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [l["step"] for l in lines if l["kind"] == "train"] == [100, 200, 300]
    assert lines[-1]["kind"] == "eval"


def test_resume_gives_the_uninterrupted_parameters(mnist_h5, tmp_path, capsys):
    """Stopping at step 7 and resuming to 15 gives bitwise the parameters of a straight 15-step run."""
    common = ["--data", str(mnist_h5), "--model", "cnn", "--batch-size", "32", "--no-progress",
              "--epochs", "1", "--lr-schedule", "constant"]  # the schedule must not depend on --max-steps
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(common + ["--max-steps", "15", "--checkpoint-dir", str(a), "--checkpoint-every", "15"], capsys)[0] == 0
    assert run(common + ["--max-steps", "7", "--checkpoint-dir", str(b), "--checkpoint-every", "7"], capsys)[0] == 0
    code, out, _ = run(common + ["--max-steps", "15", "--checkpoint-dir", str(b), "--checkpoint-every", "15",
                                 "--resume"], capsys)
    assert code == 0 and "resumed from step 7" in out
    with h5py.File(a / "step-00000015.h5") as fa, h5py.File(b / "step-00000015.h5") as fb:
        names = []
        fa["params"].visit(lambda n: names.append(n) if isinstance(fa["params"][n], h5py.Dataset) else None)
        assert names
        for n in names:
            np.testing.assert_array_equal(fa["params"][n][()], fb["params"][n][()], err_msg=n)


@pytest.mark.parametrize("argv, needle", [
    (["--data", "/nonexistent/mnist.h5"], "/nonexistent/mnist.h5"),
    (["--lr", "-1"], "lr must be positive"),
    (["--config", "/nonexistent.yaml"], "cannot read config"),
    (["--resume"], "--resume needs --checkpoint-dir"),
])
def test_user_errors_are_one_line_and_exit_2(argv, needle, capsys):
    """A user mistake exits 2 with a single error line naming the problem, no traceback."""
    code, _, err = run(argv + ["--max-steps", "1", "--no-progress"], capsys)
    assert code == 2
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_yaml_config_and_flag_override(mnist_h5, tmp_path, capsys):
    """YAML sets options, flags override them, and unknown YAML keys are rejected."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {mnist_h5}\nmax_steps: 3\nbatch_size: 16\nmodel_options: {{hidden: [32]}}\n")
    code, out, _ = run(["--config", str(cfg), "--max-steps", "2", "--no-progress"], capsys)
    assert code == 0 and result_of(out)["steps"] == 2
    cfg.write_text("learning_rate: 0.1\n")
    code, _, err = run(["--config", str(cfg)], capsys)
    assert code == 2 and "unknown option 'learning_rate'" in err


@pytest.mark.skipif(gpu_available(), reason="checks the error of --device gpu on a machine without a GPU")
def test_hpdl_device_replaces_the_default_device(mnist_h5, tmp_path, monkeypatch, capsys):
    """HPDL_DEVICE sets --device's default (a bad value is a one-line error); YAML and flags still win."""
    args = ["--data", str(mnist_h5), "--max-steps", "1", "--no-progress"]
    monkeypatch.setenv("HPDL_DEVICE", "bogus")
    code, _, err = run(args, capsys)
    assert code == 2 and err.strip() == "hpdl.train: error: HPDL_DEVICE must be one of cpu, gpu, auto, got 'bogus'"
    monkeypatch.setenv("HPDL_DEVICE", "gpu")
    code, _, err = run(args, capsys)
    assert code == 2 and err.strip().startswith("hpdl.train: error: --device gpu: no CUDA device found")
    yaml_file = tmp_path / "cpu.yaml"
    yaml_file.write_text("device: cpu\n")
    for override in (["--device", "cpu"], ["--config", str(yaml_file)]):
        code, out, _ = run(args + override, capsys)
        assert code == 0 and result_of(out)["steps"] == 1

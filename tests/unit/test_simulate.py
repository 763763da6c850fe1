"""The staleness simulator and delay logs: exact reproducibility, replay, and the identities between algorithms."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from hpdl.data import Loader
from hpdl.delaylog import DelayLog, DelayLogError
from hpdl.flat import Flat
from hpdl.models import build_model
from hpdl.optim import SGD, make_schedule
from hpdl.simulate import SimConfig, SimulationError, main, simulate
from hpdl.trainer import loss_and_grads

TINY = {"hidden": [32]}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: BLAS threads only add overhead (and fight other processes for cores)."""
    with threadpool_limits(1):
        yield


def sim(mnist_h5, algorithm: str, **kw):
    kw = {"workers": 4, "steps": 8, "batch_size": 32, "model_options": TINY, "dtype": "float64"} | kw
    return simulate(SimConfig(algorithm, data=str(mnist_h5), **kw))


def same_numbers(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "wall_s"} == {k: v for k, v in b.items() if k != "wall_s"}


def test_one_worker_without_delay_is_sequential_sgd(mnist_h5):
    """asgd, 1 worker, constant:0 gives bitwise the parameters of the single-process SGD loop (momentum 0)."""
    steps, lr, seed = 12, 0.1, 3
    out = sim(mnist_h5, "asgd", workers=1, delay="constant:0", steps=steps, lr=lr, seed=seed,
              lr_schedule="cosine")
    model = build_model("mlp", **TINY)
    params = model.init(seed, np, np.float64)
    opt, schedule = SGD(model.layers, momentum=0.0), make_schedule("cosine", lr, steps)
    loader = Loader(str(mnist_h5), "train", 32, seed=seed, dtype=np.float64)
    for k, (x, y) in zip(range(steps), loader.epoch(0)):
        _, grads = loss_and_grads(model.layers, params, x, y, (seed, k, 0))
        opt.step(params, grads, schedule(k))
    np.testing.assert_array_equal(out.final, Flat.adopt(model.layers, params, np, np.float64).vector)
    assert out.result["updates"] == steps and out.result["mean_delay"] == 0.0


def test_same_arguments_same_result(mnist_h5):
    """Two runs with equal arguments give equal RESULT numbers and parameters (random delays included)."""
    a = sim(mnist_h5, "dcasgd-a", delay="uniform:0,3", dtype="float32")
    b = sim(mnist_h5, "dcasgd-a", delay="uniform:0,3", dtype="float32")
    assert same_numbers(a.result, b.result)
    np.testing.assert_array_equal(a.final, b.final)
    assert a.final.dtype == np.float32


@pytest.mark.parametrize("delay", [0, 1, 3])
def test_realized_delays_are_the_requested_constant(mnist_h5, delay):
    """constant:D: push t has delay min(D, t) (nothing is older than version 0), round-robin over workers."""
    out = sim(mnist_h5, "asgd", delay=f"constant:{delay}", steps=5)
    t = np.arange(20)
    np.testing.assert_array_equal(out.log.column("delay"), np.minimum(delay, t))
    np.testing.assert_array_equal(out.log.column("worker"), t % 4)
    assert out.result["max_delay"] == delay


def test_uniform_delays_stay_in_range(mnist_h5):
    """uniform:A,B for asgd: every delay after the first round lies in A..B, and both ends occur."""
    out = sim(mnist_h5, "dcasgd-c", delay="uniform:1,3", steps=10)
    d = out.log.column("delay")[4:]
    assert d.min() == 1 and d.max() == 3
    assert out.result["mean_delay"] == pytest.approx(out.log.column("delay").mean())


@pytest.mark.parametrize("algorithm, hyper", [("asgd", {}), ("dcasgd-a", {}), ("easgd", {"tau": 2}),
                                              ("eamsgd", {"tau": 3})])
def test_record_then_replay_is_bitwise(mnist_h5, tmp_path, algorithm, hyper):
    """Replaying a recorded push order reproduces the final parameters and the log exactly."""
    path = tmp_path / "order.h5"
    first = sim(mnist_h5, algorithm, delay="uniform:0,3", hyper=hyper, record=str(path))
    again = sim(mnist_h5, algorithm, delay=f"log:{path}", hyper=hyper)
    np.testing.assert_array_equal(again.final, first.final)
    assert list(again.log) == list(first.log) == list(DelayLog.read(path))
    assert same_numbers(first.result | {"delay": None}, again.result | {"delay": None})


def test_replay_of_a_reply_driven_order(mnist_h5, tmp_path):
    """An order like a real server's (each push computed from the reply to the previous one, irregular
    arrivals) replays, and the server's measured delays are the logged ones."""
    order = [0, 1, 1, 2, 0, 2, 1, 0, 2, 2, 0, 1]
    log, last, steps = DelayLog(3), [-1, -1, -1], [0, 0, 0]
    for t, m in enumerate(order):
        log.append(t, m, steps[m], t - last[m] - 1)
        last[m], steps[m] = t, steps[m] + 1
    log.write(tmp_path / "mpi.h5")
    out = sim(mnist_h5, "dcasgd-c", workers=3, steps=4, delay=f"log:{tmp_path / 'mpi.h5'}")
    assert list(out.log) == list(log)


def test_dcasgd_with_lambda_zero_is_asgd_in_the_simulator(mnist_h5):
    """dcasgd-c with λ = 0 trains exactly like asgd under the same random delays."""
    asgd = sim(mnist_h5, "asgd", delay="uniform:0,3")
    dc = sim(mnist_h5, "dcasgd-c", delay="uniform:0,3", hyper={"lambda_dc": 0.0})
    np.testing.assert_array_equal(dc.final, asgd.final)


@pytest.mark.parametrize("nesterov", [True, False])
def test_bmuf_without_momentum_is_averaging_in_the_simulator(mnist_h5, nesterov):
    """bmuf with η_b = 0, ζ = 1 ends with bitwise avg's parameters (a partial last block included)."""
    avg = sim(mnist_h5, "avg", steps=7, hyper={"tau": 3}, dtype="float32")
    bmuf = sim(mnist_h5, "bmuf", steps=7, dtype="float32",
               hyper={"tau": 3, "eta_b": 0.0, "zeta": 1.0, "nesterov_bm": nesterov})
    np.testing.assert_array_equal(bmuf.final, avg.final)
    assert avg.result["updates"] == 3


def test_averaging_every_step_is_sync_sgd(mnist_h5):
    """avg with τ = 1 from identical starts follows synchronous SGD (equal up to rounding)."""
    avg = sim(mnist_h5, "avg", hyper={"tau": 1})
    sync = sim(mnist_h5, "sync")
    np.testing.assert_allclose(avg.final, sync.final, rtol=1e-10, atol=1e-12)
    assert sync.result["updates"] == 8 and sync.result["samples"] == 8 * 4 * 32


def test_synchronous_easgd_runs_and_learns(mnist_h5):
    """easgd-sync trains: its centre beats chance after a few steps."""
    out = sim(mnist_h5, "easgd-sync", steps=20, lr=0.1)
    assert out.result["test_acc"] > 0.5 and out.log is None


def test_cli_prints_result(mnist_h5, tmp_path, capsys):
    """The CLI ends with a RESULT line holding the documented fields, and writes the record and metrics."""
    record, metrics = tmp_path / "r.h5", tmp_path / "m.jsonl"
    code = main(["--algorithm", "easgd", "--workers", "2", "--steps", "6", "--tau", "2", "--batch-size", "16",
                 "--model-options", "{hidden: [16]}", "--data", str(mnist_h5), "--record", str(record),
                 "--metrics", str(metrics), "--log-every", "2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and out[-1].startswith("RESULT ")
    result = json.loads(out[-1][len("RESULT "):])
    for key in ("test_acc", "test_loss", "updates", "mean_delay", "max_delay", "wall_s"):
        assert key in result
    assert result["updates"] == 6 and len(DelayLog.read(record)) == 6
    kinds = [json.loads(line)["kind"] for line in metrics.read_text().splitlines()]
    assert kinds == ["train"] * 3 + ["eval"]


@pytest.mark.parametrize("argv, needle", [
    (["--algorithm", "asgd", "--delay", "sometimes"], "--delay must be"),
    (["--algorithm", "asgd", "--delay", "uniform:3,1"], "0 <= A <= B"),
    (["--algorithm", "asgd", "--delay", "constant:4"], "at most workers-1 = 3"),
    (["--algorithm", "hogwild"], "simulate it with --algorithm asgd"),
    (["--algorithm", "sync", "--delay", "constant:0"], "sync is synchronous"),
    (["--algorithm", "avg", "--lambda-dc", "1"], "--lambda-dc does not apply to avg"),
    (["--algorithm", "asgd", "--n-fetch", "2"], "--n-fetch equal to --n-push"),
    (["--algorithm", "asgd", "--model", "resnet"], "--model must be mlp or cnn"),
    (["--algorithm", "asgd", "--model-options", "{hidden: [32"], "--model-options is not YAML"),
    (["--algorithm", "asgd", "--delay", "log:/nonexistent/log.h5"], "/nonexistent/log.h5"),
    (["--algorithm", "asgd", "--data", "/nonexistent/mnist.h5"], "/nonexistent/mnist.h5"),
    (["--algorithm", "nope"], "unknown algorithm"),
])
def test_user_errors_are_one_line(mnist_h5, capsys, argv, needle):
    """Bad options end with exit code 2 and one line naming the problem, never a traceback."""
    if "--data" not in argv:
        argv = argv + ["--data", str(mnist_h5)]
    code = main(argv + ["--steps", "2", "--model-options", "{hidden: [8]}"] if "--model-options" not in argv
                else argv + ["--steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_replay_must_fit_the_run(mnist_h5, tmp_path):
    """A log from another worker count or push period is refused with a message naming the file."""
    path = tmp_path / "four.h5"
    sim(mnist_h5, "asgd", steps=4, record=str(path))
    with pytest.raises(SimulationError, match="recorded with 4 workers, not --workers 2"):
        sim(mnist_h5, "asgd", workers=2, steps=4, delay=f"log:{path}")
    with pytest.raises(SimulationError, match=f"{path}: row 0: worker 0 pushed after step 0 there but after step 1"):
        sim(mnist_h5, "asgd", steps=4, delay=f"log:{path}", hyper={"n_push": 2, "n_fetch": 2})
    sim(mnist_h5, "easgd", steps=4, hyper={"tau": 1}, delay="constant:1", record=str(path))  # reply-driven
    with pytest.raises(SimulationError, match="continues from the reply"):
        log = DelayLog(4)
        for t in range(8):
            log.append(t, t % 4, t // 4, min(t, 2))
        log.write(path)
        sim(mnist_h5, "easgd", steps=2, hyper={"tau": 1}, delay=f"log:{path}")


# -- delay logs ------------------------------------------------------------------------

def test_delay_log_round_trip(tmp_path):
    """A written log reads back equal, with its metadata and statistics."""
    log = DelayLog(2, {"algorithm": "asgd"})
    for record in [(0, 0, 0, 0), (1, 1, 0, 1), (2, 0, 1, 1), (3, 0, 2, 0)]:
        log.append(*record)
    back = DelayLog.read(log.write(tmp_path / "log.h5"))
    assert list(back) == list(log) and back.meta == {"algorithm": "asgd"} and back.n_workers == 2
    assert back.stats() == {"mean_delay": 0.5, "max_delay": 1}


def write_columns(path, n_workers=2, **columns):
    base = {"version": [0, 1, 2], "worker": [0, 1, 0], "worker_step": [0, 0, 1], "delay": [0, 1, 1]}
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "hpdl-delaylog", "format_version": 1, "n_workers": n_workers, "meta": "{}"})
        for name, values in (base | columns).items():
            f.create_dataset(name, data=np.array(values, dtype=np.int64))


@pytest.mark.parametrize("columns, needle", [
    ({"version": [0, 2, 3]}, "versions are not consecutive"),
    ({"worker": [0, 2, 0]}, "worker outside 0..1"),
    ({"delay": [0, 2, 1]}, "delay outside 0..version"),
    ({"worker_step": [1, 0, 1]}, "worker 0's steps do not rise"),
    ({"delay": [0, 1]}, "differ in length"),
])
def test_delay_log_validation(tmp_path, columns, needle):
    """Logs that break an invariant are refused with one line naming the file."""
    path = tmp_path / "bad.h5"
    write_columns(path, **columns)
    with pytest.raises(DelayLogError, match=needle) as e:
        DelayLog.read(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_delay_log_unreadable_files(tmp_path):
    """A missing file, a non-HDF5 file and an HDF5 file of another kind each get a one-line error."""
    with pytest.raises(DelayLogError, match="no such delay log"):
        DelayLog.read(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(DelayLogError, match="unreadable delay log"):
        DelayLog.read(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(DelayLogError, match="not a delay log"):
        DelayLog.read(tmp_path / "other.h5")

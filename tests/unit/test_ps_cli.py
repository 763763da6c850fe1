"""`mpirun ... python -m hpdl.train --algorithm ...` end to end: replay, identities, exactly-once counts, pipelines."""
from __future__ import annotations

import hashlib

import pytest
from test_mpi_cli import MPIRUN, mpirun, result
from threadpoolctl import threadpool_limits

from hpdl.delaylog import DelayLog
from hpdl.simulate import SimConfig, simulate

pytestmark = pytest.mark.skipif(not MPIRUN.exists(), reason="mpirun (the mpich wheel) is not installed")

TINY = {"hidden": [32]}
# A small CNN whose first layer has parameters, without dropout (sync and avg draw different masks).
SMALL_CNN = "model: cnn\nmodel_options: {channels: [3, 4], hidden: 16, dropout: 0.0}\n"


@pytest.fixture
def tiny(mnist_h5, tmp_path) -> list[str]:
    """Options of a short run of the mlp with one hidden layer of 32."""
    path = tmp_path / "tiny.yaml"
    path.write_text("model_options: {hidden: [32]}\n")
    return ["--data", str(mnist_h5), "--config", str(path), "--batch-size", "16", "--lr-schedule", "constant"]


def train(n: int, options: list[str], *args: str, env: dict | None = None, timeout: float = 120) -> dict:
    return result(mpirun(n, *options, *args, env=env, timeout=timeout))


# -- replay ---------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm, hyper", [("asgd", {}), ("dcasgd-a", {}), ("eamsgd", {"tau": 2})])
def test_replay_of_a_recorded_run_gives_its_parameters_bit_for_bit(tiny, mnist_h5, tmp_path, algorithm, hyper):
    """4 workers of uneven speed and one server in float64; the simulator replaying the recorded
    order ends with parameters whose SHA-256 is the run's, and logs the same order."""
    log = tmp_path / "order.h5"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in hyper.items()]
    res = train(5, tiny, "--algorithm", algorithm, "--ps", "1", "--stages", "1", "--max-steps", "8",
                "--dtype", "float64", "--lr-schedule", "cosine", "--record", str(log), *flags,
                env={"HPDL_SLOW_WORKERS": "1:0.01,3:0.02"})
    recorded = DelayLog.read(log)
    assert len(recorded) == res["updates"] == res["pushes"]
    assert recorded.meta["params_sha256"] == res["params_sha256"][0]
    with threadpool_limits(1):
        replay = simulate(SimConfig(algorithm, workers=4, delay=f"log:{log}", steps=8, batch_size=16, lr=0.05,
                                    lr_schedule="cosine", dtype="float64", model_options=TINY, hyper=hyper,
                                    data=str(mnist_h5)))
    assert hashlib.sha256(replay.final.tobytes()).hexdigest() == res["params_sha256"][0]
    assert list(replay.log) == list(recorded)
    assert replay.result["test_loss"] == res["test_loss"]


# -- identities between algorithms ------------------------------------------------------------

def test_averaging_every_step_is_sync_sgd(mnist_h5, tmp_path):
    """avg with tau 1 and sync with plain SGD (no momentum, no decay) end equal up to rounding (float64)."""
    path = tmp_path / "cnn.yaml"
    path.write_text(SMALL_CNN)
    options = ["--data", str(mnist_h5), "--config", str(path), "--stages", "1", "--batch-size", "8", "--max-steps", "5",
               "--dtype", "float64", "--momentum", "0", "--weight-decay", "0", "--debug-checksum", "1"]
    sync = train(4, options, "--algorithm", "sync")
    avg = train(4, options, "--algorithm", "avg", "--tau", "1")
    assert avg["updates"] == 5
    assert avg["test_loss"] == pytest.approx(sync["test_loss"], rel=1e-12)


def test_bmuf_without_block_momentum_is_averaging(tiny):
    """bmuf with eta_b 0, zeta 1 ends with bitwise avg's parameters (tau 3 over 7 steps: a short last block)."""
    options = [*tiny, "--stages", "1", "--max-steps", "7", "--tau", "3"]
    avg = train(3, options, "--algorithm", "avg")
    bmuf = train(3, options, "--algorithm", "bmuf", "--eta-b", "0", "--zeta", "1")
    assert bmuf["params_sha256"] == avg["params_sha256"] and avg["updates"] == 3


# -- exactly once -----------------------------------------------------------------------------

@pytest.mark.parametrize("workers, servers, algorithm, extra, pushes_per_worker", [
    (4, 1, "asgd", [], 6),
    (8, 2, "dcasgd-c", [], 6 * 2),          # two shards: each push goes to both servers
    (16, 1, "easgd", ["--tau", "2"], 3),    # 16 workers + 1 server on 2 cores
])
def test_server_updates_equal_pushes(tiny, workers, servers, algorithm, extra, pushes_per_worker):
    """Every push is applied once, workers of different speeds included (two sleep after each step)."""
    res = train(workers + servers, tiny, "--algorithm", algorithm, "--stages", "1", "--ps", str(servers),
                "--max-steps", "6", *extra, timeout=240, env={"HPDL_SLOW_WORKERS": "0:0.03,2:0.01"})
    assert res["pushes"] == res["updates"] == workers * pushes_per_worker
    assert res["stage_delays"][0]["updates"] == res["updates"] and res["mean_delay"] > 0


# -- the hyper-parallel combination ------------------------------------------------------------

@pytest.mark.parametrize("algorithm, extra, pushes_per_worker", [
    ("pipelined-dcasgd", [], 160), ("pipelined-easgd", ["--tau", "4"], 40)])
def test_pipelined_algorithms_on_stages_replicas_and_servers(tiny, algorithm, extra, pushes_per_worker):
    """2 stages x 2 replicas + 2 servers (one per stage), pipedream: each micro-batch is a local update
    (a push for DC-ASGD); stage 0's gradients are older (deeper pipeline), and the run learns."""
    res = train(6, tiny, "--algorithm", algorithm, "--stages", "2", "--replicas", "2", "--ps", "2",
                # 80 steps: the accuracy of pipelined-dcasgd spreads with the arrival order, over
                # 0.52-0.71 after 20 steps and down to 0.40 after 40 (a CI run on 2 loaded cores),
                # too close to the bar to say whether the run learns; 0.73-0.84 after 80
                "--max-steps", "80", "--microbatches", "2", "--lr", "0.1", *extra)
    assert res["schedule"] == "pipedream" and res["local_updates"] == 160
    assert res["pushes"] == res["updates"] == 2 * 2 * pushes_per_worker
    stage0, stage1 = res["stage_delays"]
    if algorithm == "pipelined-dcasgd":
        assert stage0["mean_delay"] > stage1["mean_delay"] >= 0
    assert res["test_acc"] > 0.5


def test_hogwild_replicas_update_one_shared_vector(tiny):
    res = train(2, tiny, "--algorithm", "hogwild", "--stages", "1", "--max-steps", "20", "--lr", "0.1")
    assert res["updates"] == 2 * 20 and res["test_acc"] > 0.5


# -- failures -------------------------------------------------------------------------------

def test_a_failing_worker_ends_the_servers_too(tiny):
    """Rank 1 raises in its first epoch: the job ends (no server waits forever) naming rank 1."""
    proc = mpirun(4, *tiny, "--algorithm", "asgd", "--ps", "1", "--stages", "1", "--max-steps", "600",
                  env={"HPDL_INJECT_FAULT": "1:0"}, timeout=120)
    assert proc.returncode != 0
    assert "hpdl.train: rank 1:" in proc.stderr and "fault injected" in proc.stderr


@pytest.mark.parametrize("args, needle", [
    (["--algorithm", "asgd", "--ps", "1", "--stages", "2", "--record", "x.h5"], "use --stages 1 --ps 1"),
    (["--algorithm", "asgd", "--ps", "1", "--schedule", "pipedream"], "use --schedule gpipe or 1f1b"),
])
def test_layout_errors_are_one_line(tiny, args, needle):
    proc = mpirun(3, *tiny, *args, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr

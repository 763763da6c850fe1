"""Parameter-server pieces that need no MPI: shards, the wire format, pipelined DC-ASGD's backups, the options."""
from __future__ import annotations

import numpy as np
import pytest

from hpdl.algorithms import DcAsgdServer
from hpdl.config import ConfigError, make_config
from hpdl.pipeline.schedules import pipedream
from hpdl.ps.messages import DONE, PUSH, Message
from hpdl.ps.pipelined import backup_slots, rule_worker
from hpdl.ps.shards import stage_servers, stage_shards
from hpdl.train import main

# -- shards ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n_stages, n_ps, expected", [
    (1, 1, [[0]]), (1, 3, [[0, 1, 2]]), (2, 2, [[0], [1]]), (2, 5, [[0, 2, 4], [1, 3]]), (4, 2, [[0], [1], [0], [1]]),
])
def test_every_stage_has_servers_and_every_server_a_stage(n_stages, n_ps, expected):
    """K >= P: server i holds a shard of stage i mod P; K < P: server s mod K holds all of stage s."""
    assert [stage_servers(s, n_stages, n_ps) for s in range(n_stages)] == expected
    assert {i for row in expected for i in row} == set(range(n_ps))


def test_shards_cut_a_stage_into_contiguous_near_equal_slices():
    shards = stage_shards(1, 2, 5, 11)
    assert [(sh.lo, sh.hi, sh.ps_index) for sh in shards] == [(0, 6, 1), (6, 11, 3)]
    assert [sh.index for sh in shards] == [0, 1] and sum(sh.size for sh in shards) == 11


# -- messages -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_message_header_and_payload_share_one_buffer(dtype):
    msg = Message(5, dtype)
    msg.set(PUSH, step=123456789, lr=0.1 / 3, reply=True)
    msg.body[...] = np.arange(5)
    copy = Message(5, dtype)
    copy.raw[...] = msg.raw  # what a receive delivers
    assert (copy.kind, copy.step, copy.lr, copy.wants_reply) == (PUSH, 123456789, 0.1 / 3, True)
    np.testing.assert_array_equal(copy.body, np.arange(5))
    msg.set(DONE, 7)
    assert msg.header().nbytes == 32 and (msg.kind, msg.step, msg.wants_reply) == (DONE, 7, False)


# -- pipelined DC-ASGD: the server's backup is the stashed weights of each gradient ----------

@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_backups_follow_the_weight_stash(stage):
    """Drive a pipedream stage of 4 against a DcAsgdServer whose other worker pushes in between:
    at every push, the backup the rule reads is exactly the weights that micro-batch's forward used,
    and the measured delay is the number of server versions since those weights were sent."""
    P, n_micro, size = 4, 14, 3
    slots = backup_slots("pipelined-dcasgd", stage, P)
    assert slots == P - stage
    rng = np.random.default_rng(stage)
    server = DcAsgdServer(rng.standard_normal(size), 2 * slots, lambda_dc=0.5)
    live, live_version = server.w.copy(), 0
    stash: dict[int, tuple[np.ndarray, int]] = {}
    pushes = [0, 0]
    for action in pipedream(stage, P, n_micro):
        if action.kind == "forward":
            stash[action.mb] = (live.copy(), live_version)
        elif action.kind == "step":
            for _ in range(rng.integers(0, 3)):  # the other replica's pushes land meanwhile
                server.apply(rule_worker(1, pushes[1], slots), rng.standard_normal(size), 0.1)
                pushes[1] += 1
            used, version = stash.pop(action.mb)
            who = rule_worker(0, pushes[0], slots)
            np.testing.assert_array_equal(server.backup[who], used)
            assert server.staleness(who) == server.version - version
            live = server.apply(who, rng.standard_normal(size), 0.1).copy()
            live_version, pushes[0] = server.version, pushes[0] + 1
    assert pushes[0] == n_micro


def test_other_algorithms_keep_one_backup():
    assert backup_slots("dcasgd-c", 0, 4) == backup_slots("pipelined-easgd", 0, 4) == 1
    assert [rule_worker(m, p, 1) for m in range(3) for p in range(2)] == [0, 0, 1, 1, 2, 2]


# -- options --------------------------------------------------------------------------------

def test_hyper_parameters_are_flags_and_yaml_keys(tmp_path):
    """tau given as a YAML key or a flag lands in cfg.hyper; the flag wins over the file."""
    path = tmp_path / "run.yaml"
    path.write_text("algorithm: bmuf\ntau: 4\neta-b: 0.5\nhyper: {zeta: 2.0}\n")
    assert make_config(["--config", str(path)]).hyper == {"tau": 4, "eta_b": 0.5, "zeta": 2.0}
    cfg = make_config(["--config", str(path), "--tau", "7", "--no-nesterov-bm"])
    assert cfg.algorithm == "bmuf" and cfg.hyper == {"tau": 7, "eta_b": 0.5, "zeta": 2.0, "nesterov_bm": False}


@pytest.mark.parametrize("argv, needle", [
    (["--algorithm", "asgd"], "asgd needs parameter-server ranks: add --ps 1"),
    (["--algorithm", "avg", "--ps", "1"], "avg is allreduce: use --ps 0"),
    (["--algorithm", "asgd", "--ps", "1", "--tau", "3"], "--tau does not apply to asgd"),
    (["--algorithm", "easgd", "--ps", "1", "--alpha", "1.5"], "--alpha must be in (0, 1]"),
    (["--algorithm", "avg", "--record", "x.h5"], "not avg's"),
    (["--algorithm", "pipelined-easgd", "--ps", "1", "--record", "x.h5"], "not pipelined-easgd's"),
    (["--algorithm", "asgd", "--ps", "1", "--n-fetch", "2", "--record", "x.h5"], "--n-fetch equal to --n-push"),
    (["--algorithm", "dcasgd-c", "--ps", "1", "--debug-checksum", "5"], "differ by design"),
])
def test_algorithm_option_errors_are_one_line(argv, needle):
    with pytest.raises(ConfigError) as e:
        make_config(argv)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_yaml_hyper_parameter_of_the_wrong_type(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm: avg\ntau: often\n")
    with pytest.raises(ConfigError, match="tau must be int, got 'often'"):
        make_config(["--config", str(path)])


def test_one_process_refuses_algorithms_that_combine_replicas(capsys):
    assert main(["--algorithm", "avg", "--tau", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hpdl.train: error: --algorithm avg combines replicas over MPI ranks: run it under mpirun -np N"]

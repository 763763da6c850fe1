"""Checkpoints: bitwise round trips, atomic writes, validation of broken or mismatched files."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from hpdl.checkpoint import (CheckpointError, checkpoint_path, latest_checkpoint,
                             load_checkpoint, load_into, prune, save_checkpoint)
from hpdl.layers.activation import ReLU
from hpdl.layers.linear import Linear
from hpdl.optim import SGD

LAYERS = [Linear(3, 4), ReLU(), Linear(4, 2)]
CONFIG = {"model": "mlp", "lr": 0.1, "layers": [784, 256, 10], "nested": {"tau": 4}}


def make_params(seed=0):
    return [layer.init(np.random.default_rng((seed, i)), np, np.float32)
            for i, layer in enumerate(LAYERS)]


def make_grads(step):
    rng = np.random.default_rng(step)
    return [{k: rng.standard_normal(p[k].shape).astype(np.float32) for k in layer.trainable}
            for layer, p in zip(LAYERS, make_params())]


def train(opt, params, first, steps):
    for t in range(first, first + steps):
        opt.step(params, make_grads(t), 0.05)
    return params


def save(directory, step, seed=0):
    params = make_params(seed)
    opt = SGD(LAYERS, momentum=0.9)
    train(opt, params, 0, 2)
    meta = {"step": step, "epoch": 1, "rng": 2**70 + 5, "loader_pos": 96, "config": CONFIG}
    return save_checkpoint(checkpoint_path(directory, step), params, opt.state_dict(), meta)


def test_round_trip_is_bitwise(tmp_path):
    """Params, optimizer state and meta come back with equal bits, dtypes and Python types."""
    params = make_params()
    opt = SGD(LAYERS, momentum=0.9, weight_decay=1e-3)
    train(opt, params, 0, 3)
    meta = {"step": 3, "epoch": 0, "seed": -7, "rng": 2**70 + 5, "loss": 0.25,
            "resumed": True, "name": "run-a", "config": CONFIG}
    path = save_checkpoint(tmp_path / "ck" / "step-00000003.h5", params, opt.state_dict(), meta)

    got_params, got_state, got_meta = load_checkpoint(path)
    assert [sorted(p) for p in got_params] == [["W", "b"], [], ["W", "b"]]
    for want, got in zip(params, got_params):
        for k in want:
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k])
    want_state = opt.state_dict()
    assert sorted(got_state) == sorted(want_state)
    for k in want_state:
        assert got_state[k].dtype == want_state[k].dtype
        np.testing.assert_array_equal(got_state[k], want_state[k])
    assert got_meta == meta
    assert type(got_meta["step"]) is int and type(got_meta["resumed"]) is bool


def test_resuming_from_a_checkpoint_continues_bitwise(tmp_path):
    """Train 5 + 5 steps straight, or 5, checkpoint, reload into fresh objects, 5: equal bits."""
    opt, params = SGD(LAYERS, momentum=0.9, nesterov=True), make_params()
    train(opt, params, 0, 5)
    path = save_checkpoint(checkpoint_path(tmp_path, 5), params, opt.state_dict(), {"step": 5})
    straight = train(opt, params, 5, 5)

    loaded, state, meta = load_checkpoint(path)
    fresh, fresh_opt = make_params(seed=1), SGD(LAYERS, momentum=0.9, nesterov=True)
    load_into(fresh, loaded)
    fresh_opt.load_state_dict(state)
    resumed = train(fresh_opt, fresh, meta["step"], 5)
    for a, b in zip(straight, resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def temp_files(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def test_failure_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A write that dies half-way leaves the old file intact, no temp file, latest unchanged."""
    first = save(tmp_path, 1)
    before = first.read_bytes()
    original, calls = h5py.Group.create_dataset, []

    def dying_create_dataset(self, *args, **kw):
        calls.append(args[0])
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return original(self, *args, **kw)

    monkeypatch.setattr(h5py.Group, "create_dataset", dying_create_dataset)
    for step in (2, 1):  # a new file, and overwriting the existing one
        calls.clear()
        with pytest.raises(RuntimeError, match="disk full"):
            save(tmp_path, step, seed=9)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    assert first.read_bytes() == before
    assert latest_checkpoint(tmp_path) == first


def test_latest_ignores_temp_and_broken_files_and_orders_by_step(tmp_path):
    """latest is the highest step by number, skipping crashed temp files and unreadable ones."""
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    save(tmp_path, 99_999_999)
    newest = save(tmp_path, 100_000_000)  # sorts first as text
    (tmp_path / ".step-100000001.h5.abc.tmp").write_bytes(newest.read_bytes())
    (tmp_path / "step-100000002.h5").write_bytes(newest.read_bytes()[:200])
    assert latest_checkpoint(tmp_path) == newest


def test_prune_keeps_the_last_checkpoints(tmp_path):
    """prune deletes all but the `keep` highest steps and nothing else."""
    paths = [save(tmp_path, step) for step in (3, 10, 7, 12)]
    (tmp_path / "notes.txt").write_text("keep me")
    deleted = prune(tmp_path, keep=2)
    assert deleted == [paths[0], paths[2]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt", "step-00000010.h5", "step-00000012.h5"]
    with pytest.raises(ValueError):
        prune(tmp_path, keep=0)


def test_unreadable_files_raise_checkpoint_error(tmp_path):
    """Non-HDF5, truncated, and structurally incomplete files each give a CheckpointError
    whose one-line message names the file."""
    good = save(tmp_path, 1)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file" * 64)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    no_optim = tmp_path / "no_optim.h5"
    with h5py.File(no_optim, "w") as f:
        f.create_group("params")
        f.attrs["step"] = 1
    for path, reason in [(garbage, "unreadable"), (truncated, "unreadable"),
                         (no_optim, "/optim is missing")]:
        with pytest.raises(CheckpointError, match=reason) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.h5")


def test_load_into_rejects_mismatches_and_changes_nothing(tmp_path):
    """Shape, dtype, name and layer-count mismatches raise CheckpointError naming the layer,
    the tensor and both shapes, before any array is overwritten."""
    loaded, _, _ = load_checkpoint(save(tmp_path, 1))
    model = [layer.init(np.random.default_rng(5), np, np.float32)
             for layer in (Linear(3, 4), ReLU(), Linear(4, 3))]
    before = [{k: v.copy() for k, v in p.items()} for p in model]
    with pytest.raises(CheckpointError, match=r"layer 2 'W': checkpoint \(4, 2\).*model \(4, 3\)"):
        load_into(model, loaded)
    for a, b in zip(model, before):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])

    as_float64 = [{k: v.astype(np.float64) for k, v in p.items()} for p in make_params()]
    with pytest.raises(CheckpointError, match="layer 0 'W'.*float32.*float64"):
        load_into(as_float64, loaded)
    renamed = make_params()
    renamed[0]["gamma"] = renamed[0].pop("b")
    with pytest.raises(CheckpointError, match=r"layer 0: checkpoint has \['W', 'b'\]"):
        load_into(renamed, loaded)
    with pytest.raises(CheckpointError, match="3 layers, the model 2"):
        load_into(make_params()[:2], loaded)

"""Sharded checkpoints: round trips, crash safety of saves, and a fuzz of damaged checkpoints (one-line errors)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from hpdl import checkpoint_sharded as cs
from hpdl.checkpoint import CheckpointError, latest_checkpoint
from hpdl.layers.activation import ReLU
from hpdl.layers.linear import Linear
from hpdl.optim import SGD

LAYERS = [Linear(3, 4), ReLU(), Linear(4, 2)]


def model(seed: int = 0) -> list[dict]:
    return [layer.init(np.random.default_rng((seed, i)), np, np.float32) for i, layer in enumerate(LAYERS)]


def trained(steps: int) -> tuple[list[dict], SGD]:
    params, opt = model(), SGD(LAYERS, momentum=0.9)
    for t in range(steps):
        rng = np.random.default_rng(t)
        grads = [{k: rng.standard_normal(p[k].shape).astype(np.float32) for k in layer.trainable}
                 for layer, p in zip(LAYERS, params)]
        opt.step(params, grads, 0.1)
    return params, opt


def save(directory: Path, step: int, keep: int = 3) -> tuple[list[dict], SGD]:
    """A one-rank checkpoint of the whole model after `step` optimizer steps."""
    params, opt = trained(step)
    shard = {"params": params, "opt_state": opt.state_dict(), "role": "stage", "stage": 0, "replica": 0,
             "first": 0, "stop": len(LAYERS)}
    cs.save_sharded(MPI.COMM_SELF, directory, step, shard, {"epoch": 0, "layout": "1 rank"}, keep)
    return params, opt


def resume(directory: Path) -> cs.Resume | None:
    return cs.find_resume(directory, model(seed=9), SGD(LAYERS, momentum=0.9))


def test_round_trip_gives_the_saved_bits(tmp_path):
    """Params and optimizer state come back bitwise from the newest complete checkpoint, sliced by stage."""
    save(tmp_path, 2)
    params, opt = save(tmp_path, 3)
    got = resume(tmp_path)
    assert got.step == 3 and got.path == cs.step_dir(tmp_path, 3)
    for want, have in zip(params, got.params):
        assert all(np.array_equal(want[k], have[k]) and want[k].dtype == have[k].dtype for k in want)
    stage_params, stage_state = got.stage(2, 3)  # the last layer alone, as a stage of its own
    assert np.array_equal(stage_params[0]["W"], params[2]["W"])
    assert np.array_equal(stage_state["0/W/momentum"], opt.state_dict()["2/W/momentum"])
    assert int(stage_state["step"]) == 3


def test_keep_prunes_older_checkpoints_and_stale_partial_saves(tmp_path):
    """--keep-checkpoints 2 leaves the two newest complete checkpoints; a crashed save's leftovers go too."""
    save(tmp_path, 1, keep=2)
    (tmp_path / ".step-00000002.partial").mkdir()
    save(tmp_path, 3, keep=2)
    save(tmp_path, 4, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004"]


@pytest.mark.parametrize("crash_in", ["save_checkpoint", "write_json_atomic", "fsync"])
def test_a_crashed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, crash_in):
    """A save that dies while writing its shard, its manifest, or before the rename: step 2 stays the newest
    complete checkpoint, bit for bit, and the half-written step 5 is ignored."""
    params, _ = save(tmp_path, 2)
    before = {p.name: p.read_bytes() for p in cs.step_dir(tmp_path, 2).iterdir()}

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cs, crash_in, crash)
    with pytest.raises(OSError):
        save(tmp_path, 5)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in cs.step_dir(tmp_path, 2).iterdir()} == before
    assert not cs.step_dir(tmp_path, 5).exists()
    got = resume(tmp_path)
    assert got.step == 2 and np.array_equal(got.params[0]["W"], params[0]["W"])


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    """A second run writing the same step leaves one complete checkpoint of it, the new one."""
    save(tmp_path, 2)
    params, _ = trained(2)
    params[0]["W"] += 1
    shard = {"params": params, "opt_state": trained(2)[1].state_dict(), "role": "stage", "stage": 0, "replica": 0,
             "first": 0, "stop": 3}
    cs.save_sharded(MPI.COMM_SELF, tmp_path, 2, shard, {"layout": "again"}, 3)
    assert np.array_equal(resume(tmp_path).params[0]["W"], params[0]["W"])
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]


def test_no_checkpoint_means_a_fresh_start_but_single_process_files_are_refused(tmp_path):
    """An empty directory resumes nothing; one holding single-process step-N.h5 files is a user error."""
    assert resume(tmp_path) is None
    (tmp_path / "step-00000010.h5").write_bytes(b"")
    with pytest.raises(CheckpointError, match="single-process checkpoints"):
        resume(tmp_path)


# -- fuzz: each damage gives a one-line CheckpointError naming what is wrong -------------------

def shard_file(directory: Path) -> Path:
    return cs.step_dir(directory, 3) / cs.shard_name(0)


def rewrite(directory: Path, edit) -> None:
    """Apply `edit` to the shard's HDF5 file, then record its new digest so that only `edit` is wrong."""
    with h5py.File(shard_file(directory), "r+") as f:
        edit(f)
    rehash(directory)


def rehash(directory: Path) -> None:
    manifest_path = cs.step_dir(directory, 3) / cs.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["sha256"] = cs.file_sha256(shard_file(directory)).hex()
    manifest_path.write_text(json.dumps(manifest))


def replace(f: h5py.File, name: str, value: np.ndarray) -> None:
    del f[name]
    f[name] = value


def truncate(d: Path) -> None:
    data = shard_file(d).read_bytes()
    shard_file(d).write_bytes(data[: len(data) // 2])


def garbage(d: Path) -> None:
    shard_file(d).write_bytes(b"garbage")
    rehash(d)


DAMAGE = {
    "truncated shard": (truncate, "SHA-256 differs from the manifest's"),
    "missing shard": (lambda d: shard_file(d).unlink(), "shard listed in the manifest is missing"),
    "wrong shape": (lambda d: rewrite(d, lambda f: replace(f, "params/0/W", np.zeros((4, 3), np.float32))),
                    "layer 0 'W': checkpoint (4, 3) float32, model (3, 4) float32"),
    "wrong dtype": (lambda d: rewrite(d, lambda f: replace(f, "params/2/b", np.zeros(2, np.float64))),
                    "layer 2 'b': checkpoint (2,) float64, model (2,) float32"),
    "NaN weights": (lambda d: rewrite(d, lambda f: replace(f, "params/2/W", np.full((4, 2), np.nan, np.float32))),
                    "layer 2 'W' holds NaN or Inf"),
    "Inf momentum": (lambda d: rewrite(d, lambda f: replace(f, "optim/0/b/momentum", np.full(4, np.inf, np.float32))),
                     "optimizer state '0/b/momentum' holds NaN or Inf"),
    "wrong momentum shape": (lambda d: rewrite(d, lambda f: replace(f, "optim/0/W/momentum", np.zeros(12, np.float32))),
                             "optimizer state '0/W/momentum' is (12,) float32, its parameter (3, 4) float32"),
    "missing layer": (lambda d: rewrite(d, lambda f: f["params"].pop("2")), "holds 2 layers, the manifest lists 3"),
    "not HDF5": (garbage, "unreadable checkpoint"),
    "manifest not JSON": (lambda d: (cs.step_dir(d, 3) / cs.MANIFEST).write_text("{"), "unreadable manifest"),
    "manifest of another format": (lambda d: (cs.step_dir(d, 3) / cs.MANIFEST).write_text('{"format": 7}'),
                                   "format 7, expected 1"),
    "manifest without shards": (lambda d: (cs.step_dir(d, 3) / cs.MANIFEST).write_text(
        '{"format": 1, "step": 3, "shards": []}'), "no shard holds layers [0, 1, 2]"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_a_one_line_error(tmp_path, damage):
    """Each kind of damage to the newest checkpoint raises CheckpointError with one line naming the problem."""
    save(tmp_path, 3)
    harm, needle = DAMAGE[damage]
    harm(tmp_path)
    with pytest.raises(CheckpointError) as e:
        resume(tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_checkpoint_without_manifest_is_ignored_unless_it_is_the_only_one(tmp_path):
    """A step directory without a manifest is not complete: resume takes the older complete one; with none left,
    --resume is an error rather than a silent fresh start."""
    save(tmp_path, 2)
    save(tmp_path, 3)
    (cs.step_dir(tmp_path, 3) / cs.MANIFEST).unlink()
    assert resume(tmp_path).step == 2
    shutil.rmtree(cs.step_dir(tmp_path, 2))
    with pytest.raises(CheckpointError, match="no complete checkpoint .*step-00000003 has no manifest"):
        resume(tmp_path)


def test_a_one_process_resume_refuses_a_directory_of_multi_rank_checkpoints(tmp_path):
    """latest_checkpoint (the one-process path) raises on step-N/ directories instead of silently starting afresh."""
    save(tmp_path, 2)
    with pytest.raises(CheckpointError, match="holds multi-rank checkpoints"):
        latest_checkpoint(tmp_path)

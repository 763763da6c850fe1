"""Checkpoints of multi-rank runs: one HDF5 shard per writing rank in one directory per step, a manifest written last.

Layout of `--checkpoint-dir DIR`:

    DIR/step-00000200/manifest.json     step, epoch, layout, and each shard's rank, role, layers, SHA-256
    DIR/step-00000200/rank-00000.h5     hpdl.checkpoint format: params of layers [first, stop) (global
    DIR/step-00000200/rank-00002.h5     indices, /params/0 is layer `first`), the stage optimizer's state

A save writes every shard into DIR/.step-N.partial, gathers the shards' digests on
rank 0, which writes the manifest there and then renames the directory to step-N. So a
step-N directory always holds a manifest and every shard it lists; anything else (a
crash mid-save) is ignored on resume and removed by the next save. In a `sync` run the
replicas of a stage hold bitwise equal weights and optimizer state, so replica 0 of each
stage writes its stage's shard and any layout with the same model can resume from it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI

from .checkpoint import (
    CheckpointError,
    fsync,
    load_checkpoint,
    load_into,
    save_checkpoint,
)
from .comm.wait import wait, waitall
from .optim.largebatch import LR_STATE
from .optim.loss_scale import SCALER_STATE

MANIFEST = "manifest.json"
FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d+)")
_SINGLE = re.compile(r"step-\d+\.h5")
DIGEST_BYTES = 32
ROLES = ("stage", "ps", "worker")  # what a shard holds: a stage's layers, a server's shards, a worker's local state


def step_dir(directory: str | os.PathLike, step: int) -> Path:
    """Where the complete checkpoint of `step` lives."""
    return Path(directory) / f"step-{step:08d}"


def partial_dir(directory: str | os.PathLike, step: int) -> Path:
    """Where the shards of `step` are written until the manifest makes them a checkpoint."""
    return Path(directory) / f".step-{step:08d}.partial"


def shard_name(rank: int) -> str:
    return f"rank-{rank:05d}.h5"


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest lists it: who wrote it and which layers it holds."""

    rank: int
    role: str          # one of ROLES; "stage": params and optimizer state of layers [first, stop)
    stage: int
    replica: int
    first: int
    stop: int
    file: str
    sha256: str


@dataclass
class Resume:
    """A validated complete checkpoint: the whole model's host params and optimizer state (global layer keys)."""

    path: Path
    step: int
    epoch: int
    layout: str
    params: list[dict[str, np.ndarray]]
    opt_state: dict[str, np.ndarray]
    lr_state: dict[str, np.ndarray]  # the learning-rate method's (LR_STATE) and loss scaler's (SCALER_STATE)

    def stage(self, start: int, stop: int) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """Layers [start, stop): their params, and their optimizer state keyed by stage-local layer index."""
        state = {"step": self.opt_state["step"]}
        for key, value in self.opt_state.items():
            layer, _, rest = key.partition("/")
            if rest and start <= int(layer) < stop:
                state[f"{int(layer) - start}/{rest}"] = value
        return self.params[start:stop], state


# -- writing -------------------------------------------------------------------------------

def save_sharded(comm: MPI.Comm, directory: str | os.PathLike, step: int, shard: dict[str, Any] | None,
                 meta: dict[str, Any], keep: int, poll: str = "sleep") -> Path | None:
    """Collective: every rank calls it; ranks with a `shard` write it. Rank 0 returns the checkpoint's path.

    `shard` holds "params" (host arrays of layers [first, stop)), "opt_state", and the
    ShardEntry fields role, stage, replica, first, stop. A rank whose write fails raises
    (and the CLI ends the job): no manifest is written, so the previous checkpoints stay
    the newest complete ones.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    part = partial_dir(directory, step)
    if rank == 0:  # leftovers of a crashed save of this step would mix with the new shards
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
    wait(comm.Ibarrier(), poll, peer="checkpoint directory")
    digest = np.zeros(DIGEST_BYTES, np.uint8)
    fields = np.full(6, -1, np.int64)   # has-shard, stage, replica, first, stop, role (0: stage)
    if shard is not None:
        path = save_checkpoint(part / shard_name(rank), shard["params"], shard["opt_state"],
                               {**meta, "step": step, "rank": rank, "role": shard["role"], "stage": shard["stage"],
                                "replica": shard["replica"], "first": shard["first"], "stop": shard["stop"]})
        digest[:] = np.frombuffer(file_sha256(path), np.uint8)
        fields[:] = (1, shard["stage"], shard["replica"], shard["first"], shard["stop"], ROLES.index(shard["role"]))
    digests = np.empty((size, DIGEST_BYTES), np.uint8) if rank == 0 else None
    table = np.empty((size, fields.size), np.int64) if rank == 0 else None
    waitall([comm.Igather(digest, digests, root=0), comm.Igather(fields, table, root=0)], poll,
            peer="checkpoint shards")
    if rank != 0:
        return None
    entries = [ShardEntry(r, ROLES[f[5]], int(f[1]), int(f[2]), int(f[3]), int(f[4]), shard_name(r), d.tobytes().hex())
               for r, (f, d) in enumerate(zip(table, digests)) if f[0] == 1]
    manifest = {"format": FORMAT, "step": step, **meta, "shards": [vars(e) for e in entries]}
    write_json_atomic(part / MANIFEST, manifest)
    fsync(part)
    final = step_dir(directory, step)
    if final.exists():  # a checkpoint of this step from an earlier run: moved aside, then dropped
        old = Path(directory) / f".step-{step:08d}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(part, final)
    fsync(directory)
    prune_sharded(directory, keep)
    return final


def write_json_atomic(path: Path, data: dict) -> None:
    """`path` holds either nothing or the whole JSON text, on disk."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True, indent=1))
    fsync(tmp)
    os.replace(tmp, path)


def prune_sharded(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Keep the `keep` newest complete checkpoints; drop older ones and stale partial saves."""
    complete = complete_steps(directory)
    doomed = [step_dir(directory, s) for s in complete[:-keep]]
    newest = complete[-1] if complete else -1
    doomed += [p for p in Path(directory).glob(".step-*.partial")
               if int(p.name[len(".step-"):-len(".partial")]) < newest]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def file_sha256(path: str | os.PathLike) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()


# -- finding and reading -------------------------------------------------------------------

def complete_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the step-N directories that hold a manifest, lowest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir()
                  if (m := _STEP_DIR.fullmatch(p.name)) and (p / MANIFEST).is_file())


def find_resume(directory: str | os.PathLike, model_params: Sequence[dict[str, np.ndarray]],
                optimizer) -> Resume | None:
    """The newest complete checkpoint in `directory`, checked against the model, or None if there is none.

    `model_params` are freshly initialized host params of the whole model and `optimizer`
    an optimizer over all its layers: the checkpoint is loaded into them, so a checkpoint
    of another model or optimizer, or with damaged, non-finite or missing data, raises a
    one-line CheckpointError here, before any rank starts training.
    """
    path = newest_complete(directory)
    if path is None:
        return None
    manifest = read_manifest(path)
    params: list[dict[str, np.ndarray] | None] = [None] * len(model_params)
    opt_state: dict[str, np.ndarray] = {}
    lr_state: dict[str, np.ndarray] = {}
    counters = set()
    for entry in manifest["shards"]:
        if entry.role != "stage":
            continue
        layers, state, _ = read_shard(path, entry)
        if not 0 <= entry.first < entry.stop <= len(model_params):
            raise CheckpointError(f"{path / entry.file}: the manifest lists layers {entry.first}-{entry.stop - 1}, "
                                  f"the model has {len(model_params)}")
        if len(layers) != entry.stop - entry.first:
            raise CheckpointError(f"{path / entry.file}: holds {len(layers)} layers, the manifest lists "
                                  f"{entry.stop - entry.first}")
        for j, layer in enumerate(layers):
            if params[entry.first + j] is None:
                params[entry.first + j] = layer
        for key, value in state.items():
            if key.startswith((LR_STATE, SCALER_STATE)):  # the same on every stage
                lr_state.setdefault(key, value)
                continue
            local, _, rest = key.partition("/")
            if key != "step" and not (local.isdigit() and rest):
                raise CheckpointError(f"{path / entry.file}: unknown optimizer state {key!r}")
            if key == "step":
                counters.add(int(value))
            else:
                opt_state.setdefault(f"{entry.first + int(local)}/{rest}", value)
    missing = [i for i, p in enumerate(params) if p is None]
    if missing:
        raise CheckpointError(f"{path}: no shard holds layers {missing} of the model")
    if len(counters) != 1:
        raise CheckpointError(f"{path}: the shards' optimizers are at different steps {sorted(counters)}")
    opt_state["step"] = np.array(counters.pop(), np.int64)
    check_fits(path, model_params, params, optimizer, opt_state)
    return Resume(path, int(manifest["step"]), int(manifest.get("epoch", 0)), str(manifest.get("layout", "")),
                  params, opt_state, lr_state)


def newest_complete(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory; None for a fresh start; CheckpointError if only broken ones exist."""
    directory = Path(directory)
    steps = complete_steps(directory)
    if steps:
        return step_dir(directory, steps[-1])
    broken = sorted(p.name for p in directory.glob("step-*") if _STEP_DIR.fullmatch(p.name))
    if broken:
        raise CheckpointError(f"{directory}: no complete checkpoint ({broken[-1]} has no manifest)")
    if directory.is_dir() and any(_SINGLE.fullmatch(p.name) for p in directory.iterdir()):
        raise CheckpointError(f"{directory} holds single-process checkpoints (step-N.h5); a multi-rank run "
                              "resumes from its own step-N/ directories: use a fresh --checkpoint-dir")
    return None


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint directory `path`, its shards as ShardEntry, or CheckpointError."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{path / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT}")
        manifest["shards"] = [ShardEntry(**e) for e in manifest["shards"]]
        int(manifest["step"])
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path / MANIFEST}: unreadable manifest ({' '.join(str(e).split())})") from None
    return manifest


def read_shard(path: Path, entry: ShardEntry):
    """One listed shard, after checking that its bytes are those the manifest recorded."""
    file = path / entry.file
    if not file.is_file():
        raise CheckpointError(f"{file}: shard listed in the manifest is missing")
    if file_sha256(file).hex() != entry.sha256:
        raise CheckpointError(f"{file}: SHA-256 differs from the manifest's (truncated or modified)")
    return load_checkpoint(file)


def check_fits(path: Path, model_params, params, optimizer, opt_state: dict[str, np.ndarray]) -> None:
    """Shapes and dtypes of a checkpoint against the model and its optimizer (CheckpointError)."""
    try:
        load_into([{k: v.copy() for k, v in p.items()} for p in model_params], params)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    for key, a in opt_state.items():
        layer, name, *_ = key.split("/") + [""]
        if key != "step" and name in params[int(layer)]:
            w = params[int(layer)][name]
            if a.shape != w.shape or a.dtype != w.dtype:
                raise CheckpointError(f"{path}: optimizer state {key!r} is {a.shape} {a.dtype}, its parameter "
                                      f"{w.shape} {w.dtype}")
    try:
        optimizer.load_state_dict(opt_state)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


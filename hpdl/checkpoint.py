"""Atomic HDF5 checkpoints of parameters, optimizer state and run metadata (never pickle).

Layout: /params/{layer index}/{name} and /optim/{state key} datasets; the metadata are
attributes of the root: numbers as numbers, anything else (the configuration, strings,
integers beyond int64) as JSON text.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .backend import array_module, to_host

_NAME = re.compile(r"step-(\d+)\.h5")
_INT64 = np.iinfo(np.int64)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` lives in `directory`."""
    return Path(directory) / f"step-{step:08d}.h5"


def save_checkpoint(path: str | os.PathLike, params: list[dict[str, Any]],
                    opt_state: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write a checkpoint so that `path` holds either the old file or the complete new one.

    `meta` must hold the integer "step"; it usually adds epoch, rng/loader state and the
    run's configuration (a dict). `params` may live on any device.
    """
    if not isinstance(meta.get("step"), (int, np.integer)):
        raise ValueError("checkpoint meta needs an integer 'step'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so that os.replace is a rename within one file system; the name
    # starts with a dot and does not match step-*.h5, so no reader mistakes it for one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            _write_params(f.create_group("params"), params)
            _write_optim(f.create_group("optim"), opt_state)
            _write_meta(f.attrs, meta)
        fsync(tmp)  # closing flushed HDF5's buffers to the OS; this puts them on disk
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync(path.parent)  # makes the rename itself survive a power cut
    return path


def load_checkpoint(path: str | os.PathLike
                    ) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray], dict[str, Any]]:
    """(host params, optimizer state, meta) from a checkpoint, or CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with h5py.File(path, "r") as f:
            for group in ("params", "optim"):
                if not isinstance(f.get(group), h5py.Group):
                    raise CheckpointError(f"{path}: not a checkpoint, group /{group} is missing")
            if "step" not in f.attrs:
                raise CheckpointError(f"{path}: not a checkpoint, attribute 'step' is missing")
            params, optim = _read_params(f["params"], path), _read_optim(f["optim"])
            meta = _read_meta(f.attrs)
    except CheckpointError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as e:  # h5py's and json's failures
        raise CheckpointError(f"{path}: unreadable checkpoint ({' '.join(str(e).split())})") from e
    for i, layer in enumerate(params):
        for name, a in layer.items():
            check_finite(path, f"layer {i} {name!r}", a)
    for key, a in optim.items():
        check_finite(path, f"optimizer state {key!r}", a)
    return params, optim, meta


def check_finite(path: str | os.PathLike, what: str, a: np.ndarray) -> None:
    """CheckpointError if a floating-point array of a checkpoint holds NaN or Inf (a diverged run)."""
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise CheckpointError(f"{path}: {what} holds NaN or Inf")


def load_into(params: list[dict[str, Any]], loaded: list[dict[str, np.ndarray]]) -> None:
    """Copy loaded host arrays into existing `params` (any device), all or nothing."""
    if len(loaded) != len(params):
        raise CheckpointError(f"checkpoint has {len(loaded)} layers, the model {len(params)}")
    # Check everything before copying anything, so a mismatch leaves the model untouched.
    for i, (dst, src) in enumerate(zip(params, loaded)):
        if set(dst) != set(src):
            raise CheckpointError(f"layer {i}: checkpoint has {sorted(src)}, "
                                  f"the model {sorted(dst)}")
        for name, w in dst.items():
            if src[name].shape != w.shape or src[name].dtype != w.dtype:
                raise CheckpointError(
                    f"layer {i} {name!r}: checkpoint {src[name].shape} {src[name].dtype}, "
                    f"model {w.shape} {w.dtype}")
    for dst, src in zip(params, loaded):
        for name, w in dst.items():
            w[...] = array_module(w).asarray(src[name])


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in `directory`, or None.

    A directory of multi-rank checkpoints (step-N/ with a manifest) is a CheckpointError: a
    one-process run would otherwise ignore them and silently start afresh.
    """
    for path in reversed(_checkpoints(directory)):
        if _is_complete(path):
            return path
    if Path(directory).is_dir() and any((p / "manifest.json").is_file() for p in Path(directory).glob("step-*")):
        raise CheckpointError(f"{directory} holds multi-rank checkpoints (step-N/ directories): resume them under "
                              "mpirun, or use a fresh --checkpoint-dir")
    return None


def prune(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the `keep` highest-step checkpoints; returns the deleted paths."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    doomed = _checkpoints(directory)[:-keep]
    for path in doomed:
        path.unlink()
    return doomed


def _write_params(group: h5py.Group, params: list[dict[str, Any]]) -> None:
    for i, layer in enumerate(params):
        # Parameter-free layers still get their (empty) group, so indices stay dense.
        g = group.create_group(str(i))
        for name, a in layer.items():
            g.create_dataset(name, data=to_host(a))


def _write_optim(group: h5py.Group, state: dict[str, np.ndarray]) -> None:
    for key, a in state.items():
        group.create_dataset(key, data=np.asarray(a))  # "3/W/momentum" nests as 3 > W


def _write_meta(attrs: h5py.AttributeManager, meta: dict[str, Any]) -> None:
    for key, value in meta.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) or (isinstance(value, int)
                                        and _INT64.min <= value <= _INT64.max):
            attrs[key] = value
        else:
            attrs[key] = json.dumps(value, sort_keys=True)


def _read_params(group: h5py.Group, path: Path) -> list[dict[str, np.ndarray]]:
    n = len(group)
    if set(group) != {str(i) for i in range(n)}:
        raise CheckpointError(f"{path}: /params holds {sorted(group)}, not layers 0..{n - 1}")
    return [{name: ds[()] for name, ds in group[str(i)].items()} for i in range(n)]


def _read_optim(group: h5py.Group) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}

    def collect(key: str, obj) -> None:
        if isinstance(obj, h5py.Dataset):
            state[key] = np.asarray(obj[()])  # 0-d counters come back as arrays, not scalars
    group.visititems(collect)
    return state


def _read_meta(attrs: h5py.AttributeManager) -> dict[str, Any]:
    return {key: json.loads(v) if isinstance(v, str) else v.item() for key, v in attrs.items()}


def _checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint files in `directory`, lowest step first (temporary files excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _NAME.fullmatch(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def _is_complete(path: Path) -> bool:
    """Whether `path` opens as HDF5 and has a checkpoint's groups and step."""
    try:
        with h5py.File(path, "r") as f:
            return "params" in f and "optim" in f and "step" in f.attrs
    except OSError:
        return False


def fsync(path: str | os.PathLike) -> None:
    """Force a file's or a directory's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

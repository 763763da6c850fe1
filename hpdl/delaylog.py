"""Delay logs: the order in which a parameter server applied updates, and each one's delay (HDF5).

File layout (format "hpdl-delaylog", version 1): four int64 datasets of equal length n,
one row per applied update, in the order the server applied them:

    /version      the server's version the update was applied to (consecutive: v0, v0+1, ...)
    /worker       the worker that sent it, 0 <= worker < n_workers
    /worker_step  the worker's local step (0-based) after which it sent it; rising per worker
    /delay        version minus the version of the weights that worker last received
                  (0 <= delay <= version)

Root attributes: format, format_version, n_workers, and meta (JSON text: algorithm and
run options, free-form). A run that records one can be replayed exactly by
`python -m hpdl.simulate --delay log:FILE`.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import h5py
import numpy as np

FORMAT = "hpdl-delaylog"
FORMAT_VERSION = 1
COLUMNS = ("version", "worker", "worker_step", "delay")


class DelayLogError(ValueError):
    """A delay log that cannot be read or does not make sense; the message names the file."""


class DelayRecord(NamedTuple):
    version: int
    worker: int
    worker_step: int
    delay: int


class DelayLog:
    """Records appended as the server applies updates; written and read as HDF5."""

    def __init__(self, n_workers: int, meta: dict[str, Any] | None = None):
        if n_workers < 1:
            raise ValueError(f"a delay log needs n_workers >= 1, got {n_workers}")
        self.n_workers = n_workers
        self.meta = dict(meta or {})
        self._rows: dict[str, list[int]] = {c: [] for c in COLUMNS}

    def append(self, version: int, worker: int, worker_step: int, delay: int) -> None:
        """One applied update; call it with the server's version and staleness just before applying."""
        for column, value in zip(COLUMNS, (version, worker, worker_step, delay)):
            self._rows[column].append(int(value))

    def __len__(self) -> int:
        return len(self._rows["version"])

    def __iter__(self) -> Iterator[DelayRecord]:
        return map(DelayRecord._make, zip(*(self._rows[c] for c in COLUMNS)))

    def column(self, name: str) -> np.ndarray:
        return np.array(self._rows[name], dtype=np.int64)

    def stats(self) -> dict[str, float]:
        """Mean and largest delay (0 for an empty log)."""
        delay = self.column("delay")
        return {"mean_delay": float(delay.mean()) if len(delay) else 0.0,
                "max_delay": int(delay.max()) if len(delay) else 0}

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically: `path` holds the old file or the complete new one."""
        path = Path(path)
        _validate({c: self.column(c) for c in COLUMNS}, self.n_workers, str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION,
                                "n_workers": self.n_workers, "meta": json.dumps(self.meta)})
                for c in COLUMNS:
                    f.create_dataset(c, data=self.column(c))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> "DelayLog":
        """A validated log, or DelayLogError with a one-line message naming `path`."""
        path = Path(path)
        if not path.is_file():
            raise DelayLogError(f"{path}: no such delay log")
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise DelayLogError(f"{path}: not a delay log (attribute format != {FORMAT!r})")
                if f.attrs.get("format_version") != FORMAT_VERSION:
                    raise DelayLogError(f"{path}: delay log format version {f.attrs.get('format_version')} "
                                        f"is not {FORMAT_VERSION}")
                n_workers = f.attrs.get("n_workers")
                if not isinstance(n_workers, (int, np.integer)) or n_workers < 1:
                    raise DelayLogError(f"{path}: attribute n_workers must be a positive integer")
                meta = json.loads(f.attrs.get("meta", "{}"))
                if not isinstance(meta, dict):
                    raise DelayLogError(f"{path}: attribute meta must be a JSON object")
                columns = {}
                for c in COLUMNS:
                    ds = f.get(c)
                    if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype.kind not in "iu":
                        raise DelayLogError(f"{path}: /{c} must be a 1-D integer dataset")
                    columns[c] = ds[()].astype(np.int64)
        except DelayLogError:
            raise
        except (OSError, ValueError) as e:  # not HDF5, truncated, unreadable, bad JSON
            raise DelayLogError(f"{path}: unreadable delay log ({' '.join(str(e).split())})") from None
        _validate(columns, int(n_workers), str(path))
        log = cls(int(n_workers), meta)
        log._rows = {c: columns[c].tolist() for c in COLUMNS}
        return log


def _validate(columns: dict[str, np.ndarray], n_workers: int, name: str) -> None:
    """The invariants every server's log has; DelayLogError naming the first row that breaks one."""
    v, w, k, d = (columns[c] for c in COLUMNS)
    n = len(v)
    if any(len(columns[c]) != n for c in COLUMNS):
        raise DelayLogError(f"{name}: columns {', '.join(COLUMNS)} differ in length")
    if n == 0:
        return
    checks = [
        (v != v[0] + np.arange(n), "versions are not consecutive"),
        (v < 0, "negative version"),
        ((w < 0) | (w >= n_workers), f"worker outside 0..{n_workers - 1}"),
        ((d < 0) | (d > v), "delay outside 0..version"),
        (k < 0, "negative worker_step"),
    ]
    for bad, what in checks:
        if bad.any():
            i = int(np.argmax(bad))
            raise DelayLogError(f"{name}: row {i}: {what} ({_row(columns, i)})")
    for m in range(n_workers):
        steps = k[w == m]
        if (np.diff(steps) <= 0).any():
            i = int(np.flatnonzero(w == m)[1:][np.diff(steps) <= 0][0])
            raise DelayLogError(f"{name}: row {i}: worker {m}'s steps do not rise ({_row(columns, i)})")


def _row(columns: dict[str, np.ndarray], i: int) -> str:
    return ", ".join(f"{c}={int(columns[c][i])}" for c in COLUMNS)

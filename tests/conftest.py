"""Shared fixtures: the prepared MNIST file, kernels built for the host, and skipping GPU tests without a GPU."""
from __future__ import annotations

from pathlib import Path

import pytest

from hpdl.backend import gpu_available

ROOT = Path(__file__).resolve().parent.parent
# CI and developers have the IDX files beside the checkout; a fresh machine downloads them.
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and cupy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mnist_h5(tmp_path_factory) -> Path:
    """data/mnist.h5 if already prepared, else prepared once for the session."""
    existing = ROOT / "data" / "mnist.h5"
    if existing.exists():
        return existing
    from hpdl.data import prepare_mnist
    out = tmp_path_factory.mktemp("data") / "mnist.h5"
    return prepare_mnist(out, from_dir=SHARED_MNIST if SHARED_MNIST.is_dir() else None)


@pytest.fixture(scope="session")
def tiny_h5(tmp_path_factory) -> Path:
    """A prepared-MNIST-shaped file of 64 training and 20 test random images, for short CLI runs."""
    import h5py
    import numpy as np
    path = tmp_path_factory.mktemp("tiny") / "tiny.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for split, n in (("train", 64), ("test", 20)):
            f[f"{split}/x"] = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
            f[f"{split}/y"] = rng.integers(0, 10, n, dtype=np.uint8)
    return path


@pytest.fixture(scope="session")
def host_kernel_libraries(tmp_path_factory):
    """kernels/*.cu built for the host once per session (tests/hostkernels.py); skips without g++."""
    import hostkernels
    if hostkernels.CXX is None:
        pytest.skip("g++ not on PATH")
    return hostkernels.build(tmp_path_factory.mktemp("host_kernels"))


@pytest.fixture
def host_kernels(host_kernel_libraries):
    """hpdl.kernels taking the kernel path for NumPy float32, on the host builds; `.launches` counts runs."""
    import hostkernels
    monkey, launches = hostkernels.patch(host_kernel_libraries)
    yield hostkernels.Patched(launches)
    monkey.undo()

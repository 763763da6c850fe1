"""kernels/*.cu compile to PTX for A100 and H100, and hpdl.kernels' NumPy references are right."""
from __future__ import annotations

import inspect
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from hpdl import kernels
from hpdl.kernels import (bias_gelu_backward_ref, bias_gelu_forward_ref, bias_relu_backward_ref,
                          bias_relu_forward_ref, softmax_xent, softmax_xent_ref)

CU_FILES = sorted(kernels.KERNEL_DIR.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")


def _find_nvcc() -> str | None:
    fallback = "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc") or (fallback if os.access(fallback, os.X_OK) else None)


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH nor at /usr/local/cuda/bin")


def _ptx(cu, arch, tmp_path) -> str:
    out = tmp_path / f"{cu.stem}_{arch}.ptx"
    # -std=c++17 as in kernels.load, so nvcc sees the dialect NVRTC will.
    proc = subprocess.run([NVCC, "-std=c++17", "-ptx", f"-arch={arch}", str(cu), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed on {cu.name} for {arch}:\n{proc.stderr}"
    return out.read_text()


def test_kernel_dir_has_sources():
    """The loader's kernel directory exists and holds the .cu files the tests iterate over."""
    assert {p.name for p in CU_FILES} >= {"bias_act.cu", "softmax_xent.cu"}


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_compiles_to_ptx(cu, arch, tmp_path):
    """Every kernels/*.cu compiles with nvcc to PTX for the given architecture."""
    assert ".entry" in _ptx(cu, arch, tmp_path)


@needs_nvcc
def test_launched_kernels_exist(tmp_path):
    """Each (file, kernel) that hpdl.kernels launches is an extern "C" entry of that file's PTX,
    so a misspelt name fails here rather than only on a GPU machine."""
    launched = re.findall(r'load\("(\w+)"\)\.get_function\("(\w+)"\)', inspect.getsource(kernels))
    assert len(launched) == 5
    for name, fn in launched:
        ptx = _ptx(kernels.KERNEL_DIR / f"{name}.cu", "sm_80", tmp_path)
        assert f".entry {fn}(" in ptx, f"{fn} is not an entry point of kernels/{name}.cu"


# ---- NumPy references ------------------------------------------------------------------------

def _central_diff(f, x, eps=1e-6):
    """d f(x) / dx for scalar f, by central differences (float64)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        g[i] = (f(up) - f(down)) / (2 * eps)
    return g


def test_bias_relu_forward_ref_values_and_in_place():
    """max(x + b, 0) element by element, float32 kept, and out=x gives the same values in place."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    expected = np.array([[max(x[i, j] + b[j], 0.0) for j in range(7)] for i in range(5)], np.float32)
    y = bias_relu_forward_ref(x, b)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, expected)
    assert bias_relu_forward_ref(x, b, out=x) is x
    np.testing.assert_array_equal(x, expected)


def test_bias_relu_backward_ref_is_the_gradient():
    """dx equals the finite-difference gradient of sum(dy * relu(x + b)) w.r.t. x (float64)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6))
    b = rng.standard_normal(6)
    x[np.abs(x + b) < 1e-3] += 0.01  # central differences must not straddle the kink
    dy = rng.standard_normal((4, 6))
    dx = bias_relu_backward_ref(bias_relu_forward_ref(x, b), dy)
    numeric = _central_diff(lambda z: np.sum(dy * np.maximum(z + b, 0)), x)
    np.testing.assert_allclose(dx, numeric, rtol=1e-7, atol=1e-9)


def test_bias_gelu_forward_ref_approximates_exact_gelu():
    """y is within the tanh approximation's error (max ~5e-4) of x*Phi(x), and u = x + b."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 9)) * 3
    b = rng.standard_normal(9)
    y, u = bias_gelu_forward_ref(x, b)
    np.testing.assert_array_equal(u, x + b)
    exact = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))(x + b)
    np.testing.assert_allclose(y, exact, atol=6e-4, rtol=0)


def test_bias_gelu_backward_ref_is_the_gradient():
    """dx equals the finite-difference gradient of sum(dy * gelu(x + b)) w.r.t. x (float64)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6)) * 2
    b = rng.standard_normal(6)
    dy = rng.standard_normal((4, 6))
    y, u = bias_gelu_forward_ref(x, b)
    dx = bias_gelu_backward_ref(u, dy)
    numeric = _central_diff(lambda z: np.sum(dy * bias_gelu_forward_ref(z, b)[0]), x)
    np.testing.assert_allclose(dx, numeric, rtol=1e-7, atol=1e-9)


def test_softmax_xent_ref_loss_is_mean_negative_log_likelihood():
    """loss_mean = mean_i -log(exp(z_i,y_i) / sum_j exp(z_ij)), computed directly in float64."""
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((6, 5))
    labels = rng.integers(0, 5, 6)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = -np.mean(np.log(p[np.arange(6), labels]))
    loss, _ = softmax_xent_ref(logits, labels)
    np.testing.assert_allclose(loss, expected, rtol=1e-12)


def test_softmax_xent_ref_gradient_matches_finite_differences():
    """dlogits equals the finite-difference gradient of dloss * loss_mean (float64, dloss != 1)."""
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((3, 7))
    labels = np.array([0, 6, 3])
    dloss = 0.7
    _, dlogits = softmax_xent_ref(logits, labels, dloss)
    numeric = _central_diff(lambda z: dloss * softmax_xent_ref(z, labels)[0], logits)
    np.testing.assert_allclose(dlogits, numeric, rtol=1e-6, atol=1e-10)


def test_softmax_xent_ref_is_stable_for_large_logits():
    """float32 logits of size 1e4 give finite results equal to those of the row-shifted logits."""
    rng = np.random.default_rng(6)
    small = rng.standard_normal((4, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 4)
    loss_big, grad_big = softmax_xent_ref(small + np.float32(1e4), labels)
    loss_small, grad_small = softmax_xent_ref(small, labels)
    assert loss_big.dtype == np.float32 and grad_big.dtype == np.float32
    assert np.isfinite(loss_big) and np.isfinite(grad_big).all()
    # 1e4 in float32 keeps ~3 decimal places of the offsets, hence the loose tolerance.
    np.testing.assert_allclose(loss_big, loss_small, rtol=1e-3)
    np.testing.assert_allclose(grad_big, grad_small, atol=1e-3)


def test_numpy_arrays_take_the_reference_path():
    """On NumPy input the public entry point returns exactly the reference's NumPy result."""
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((3, 4)).astype(np.float32)
    labels = np.array([1, 0, 3])
    loss, dlogits = softmax_xent(logits, labels, 2.0)
    ref_loss, ref_dlogits = softmax_xent_ref(logits, labels, 2.0)
    assert isinstance(dlogits, np.ndarray) and dlogits.dtype == np.float32
    assert loss == ref_loss
    np.testing.assert_array_equal(dlogits, ref_dlogits)


def test_shape_errors_are_reported():
    """Mismatched shapes raise ValueError naming both shapes, on every path."""
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        kernels.bias_relu_forward(np.zeros((3, 4), np.float32), np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=r"\(2,\)"):
        softmax_xent(np.zeros((3, 4), np.float32), np.zeros(2, np.int64))

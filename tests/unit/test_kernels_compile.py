"""kernels/*.cu compile to PTX (A100, H100) with nvcc and under NVRTC as CuPy compiles them, match hpdl.kernels'
oracles built for the host, and the oracles are right."""
from __future__ import annotations

import inspect
import math
import os
import re
import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest

import hostkernels
import nvrtc
from accuracy import assert_as_accurate
from layouts import expected_layout, stored
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
NVRTC = nvrtc.find_library()


@pytest.fixture(scope="module")
def ptx(tmp_path_factory) -> dict[tuple[str, str], str]:
    """PTX text by (file stem, arch): one nvcc call per arch compiles every file, both archs at once."""
    out = tmp_path_factory.mktemp("ptx")
    procs = {}
    for arch in ARCHS:
        (out / arch).mkdir()
        # hpdl's NVRTC options, so nvcc sees the dialect NVRTC will.
        procs[arch] = subprocess.Popen([NVCC, *kernels.NVRTC_OPTIONS, "-ptx", f"-arch={arch}", *map(str, CU_FILES),
                                        "--output-directory", str(out / arch)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for arch, proc in procs.items():
        _, stderr = proc.communicate()
        assert proc.returncode == 0, f"nvcc failed for {arch}:\n{stderr}"
    return {(cu.stem, arch): (out / arch / f"{cu.stem}.ptx").read_text() for cu in CU_FILES for arch in ARCHS}


def test_kernel_dir_has_sources():
    """The loader's kernel directory exists and holds the .cu files the tests iterate over."""
    assert {p.name for p in CU_FILES} >= {"bias_act.cu", "softmax_xent.cu", "optim_update.cu", "norm.cu",
                                         "im2col.cu", "sum_squares.cu", "finite.cu"}


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_compiles_to_ptx(cu, arch, ptx):
    """Every kernels/*.cu compiles with nvcc to PTX for the given architecture."""
    assert ".entry" in ptx[(cu.stem, arch)]


@pytest.mark.skipif(NVRTC is None, reason="no libnvrtc: the nvidia-cuda-nvrtc wheel of the test extra is missing")
@pytest.mark.parametrize("arch", ARCHS)
def test_compiles_under_nvrtc_as_cupy_builds_it(arch):
    """Every kernels/*.cu compiles to CUBIN under NVRTC with the options a cupy.RawModule passes
    (hpdl's, CuPy's own, -arch), without a warning: nvcc pre-includes the CUDA runtime headers
    and NVRTC does not, so a source nvcc takes may still fail on the GPU machine."""
    compiler = nvrtc.Nvrtc(NVRTC)
    for cu in CU_FILES:
        ok, log, cubin = compiler.compile(cu.read_text(), cu.name, (*kernels.NVRTC_OPTIONS, *nvrtc.CUPY_OPTIONS,
                                                                   f"-arch={arch}"))
        assert ok and cubin > 0, f"{cu.name} for {arch}:\n{log}"
        assert "warning" not in log.lower(), f"{cu.name} for {arch}:\n{log}"


@needs_nvcc
def test_launched_kernels_are_the_entry_points(ptx):
    """The (file, kernel) pairs hpdl.kernels launches are exactly the extern "C" entries of the
    files' PTX: a misspelt name fails here rather than only on a GPU machine, and no kernel
    sits compiled but never launched."""
    launched = set(re.findall(r'load\("(\w+)"\)\.get_function\("(\w+)"\)', inspect.getsource(kernels)))
    entries = {(cu.stem, fn) for cu in CU_FILES
               for fn in re.findall(r"\.entry (\w+)\(", ptx[(cu.stem, "sm_80")])}
    assert launched == entries, f"launched only: {launched - entries}, compiled only: {entries - launched}"


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


# ---- the kernels, run on the host (tests/hostkernels.py) -----------------------------------

def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# Tensor sizes around the block size, an empty one among them, and more virtual blocks (16)
# than the patched 3-block grid: every block search and grid-stride wrap is exercised.
SIZES = (300, 0, 7, 256, 1, 2000, 257)


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.01), (0.9, True, 5e-4)])
def test_host_sgd_kernel_is_bit_identical(host_kernels, momentum, nesterov, wd):
    """sgd_update's kernel source and launcher, one launch over tensors of several sizes with
    a rate and decay each, give the oracle's weights and buffers bit for bit over two steps
    (the first overwriting the buffers of all tensors but one, which already has its own)."""
    rng = np.random.default_rng(0)
    ws = [_f32(rng, n) for n in SIZES]
    bufs = [_f32(rng, n) for n in SIZES]
    ws_ref, bufs_ref = [w.copy() for w in ws], [b.copy() for b in bufs]
    lrs, wds = [0.1 / (k + 1) for k in range(len(SIZES))], [wd * (k % 2) for k in range(len(SIZES))]
    for firsts in ([k != 3 for k in range(len(SIZES))], [False] * len(SIZES)):
        gs = [_f32(rng, n) for n in SIZES]
        host_kernels.sgd_update(ws, gs, lrs, wds, momentum, nesterov, bufs, firsts)
        host_kernels.sgd_update_ref(ws_ref, gs, lrs, wds, momentum, nesterov, bufs_ref, firsts)
    assert host_kernels.launches["sgd_update"] == 2
    for mine, theirs in zip(ws + bufs, ws_ref + bufs_ref):
        np.testing.assert_array_equal(mine, theirs)


def test_host_adamw_and_server_kernels_are_bit_identical(host_kernels):
    """adamw_update (one launch over tensors of several sizes), dcasgd_update (both variants)
    and the three EASGD kernels equal their oracles bit for bit."""
    rng = np.random.default_rng(1)
    ws, ms = [_f32(rng, n) for n in SIZES], [np.zeros(n, np.float32) for n in SIZES]
    vs = [_f32(rng, n) ** 2 for n in SIZES]
    ws_ref, ms_ref, vs_ref = ([a.copy() for a in arrays] for arrays in (ws, ms, vs))
    lrs, wds = [1e-3 * (k + 1) for k in range(len(SIZES))], [0.01 * (k % 2) for k in range(len(SIZES))]
    for t in (1, 2, 3):
        gs = [_f32(rng, n) * np.float32(0.1) for n in SIZES]
        host_kernels.adamw_update(ws, gs, ms, vs, lrs, t, wds, (0.9, 0.999), 1e-8)
        host_kernels.adamw_update_ref(ws_ref, gs, ms_ref, vs_ref, lrs, t, wds, (0.9, 0.999), 1e-8)
    assert host_kernels.launches["adamw_update"] == 3
    for mine, theirs in zip(ws + ms + vs, ws_ref + ms_ref + vs_ref):
        np.testing.assert_array_equal(mine, theirs)
    n = 1500
    for ms in (None, np.abs(_f32(rng, n))):
        w, bak, g = _f32(rng, n), _f32(rng, n), _f32(rng, n)
        w_ref, bak_ref, ms_ref = w.copy(), bak.copy(), None if ms is None else ms.copy()
        host_kernels.dcasgd_update(w, bak, g, 0.05, 2.0, ms, 0.95, 1e-7)
        host_kernels.dcasgd_update_ref(w_ref, bak_ref, g, 0.05, 2.0, ms_ref, 0.95, 1e-7)
        for mine, theirs in ((w, w_ref), (bak, bak_ref), (ms, ms_ref)):
            np.testing.assert_array_equal(mine, theirs)
    center, x, g, x_sum = (_f32(rng, n) for _ in range(4))
    center_ref, x_ref = center.copy(), x.copy()
    np.testing.assert_array_equal(host_kernels.easgd_elastic(center, x, 0.225),
                                  host_kernels.easgd_elastic_ref(center_ref, x, 0.225))
    host_kernels.easgd_sync_worker(x, center, g, 0.05, 3.6)
    host_kernels.easgd_sync_worker_ref(x_ref, center_ref, g, 0.05, 3.6)
    host_kernels.easgd_sync_center(center, x_sum, 4, 0.05, 3.6)
    host_kernels.easgd_sync_center_ref(center_ref, x_sum, 4, 0.05, 3.6)
    np.testing.assert_array_equal(x, x_ref)
    np.testing.assert_array_equal(center, center_ref)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("case", [(2, 3, 7, 6, 3, 1, 1), (2, 2, 9, 9, 3, 2, 1), (1, 4, 5, 8, 1, 2, 0),
                                  (1, 2, 5, 5, 5, 1, 2), (2, 1, 8, 7, 3, 3, 2)])
def test_host_im2col_col2im_kernels_are_bit_identical(host_kernels, case, batched):
    """im2col and the col2im gather equal their oracles bit for bit, padding, strides and both layouts."""
    n, c, h, w, k, s, pad = case
    rng = np.random.default_rng(2)
    x = _f32(rng, n, c, h, w)
    cols = host_kernels.im2col(x, k, s, pad, batched)
    np.testing.assert_array_equal(cols, host_kernels.im2col_ref(x, k, s, pad, batched))
    dcols = _f32(rng, *cols.shape)
    np.testing.assert_array_equal(host_kernels.col2im(dcols, x.shape, k, s, pad, batched),
                                  host_kernels.col2im_ref(dcols, x.shape, k, s, pad, batched))


def test_host_bias_relu_kernels_are_bit_identical(host_kernels):
    """bias_relu_forward (2-D grid, rows striding past the grid cap) and backward equal their
    oracles, NaN and Inf included (NaN and -Inf give NaN forward; dy's NaN and Inf stay non-finite
    where the mask is 0); backward runs on a batch-innermost layout in place, and falls back on mixed
    ones; relu_forward equals ReLU's x (x > 0) on a batch-innermost layout, and keeps it."""
    rng = np.random.default_rng(3)
    x, b, dy = _f32(rng, 11, 300), _f32(rng, 300), _f32(rng, 11, 300)
    x[0, :4], dy[1, :4] = [np.nan, -np.inf, np.inf, 0.0], [np.nan, np.inf, -np.inf, 0.0]
    y = host_kernels.bias_relu_forward(x, b)
    with np.errstate(invalid="ignore"):   # inf * 0 in the oracles
        np.testing.assert_array_equal(y, host_kernels.bias_relu_forward_ref(x, b))
        np.testing.assert_array_equal(host_kernels.bias_relu_backward(y, dy), host_kernels.bias_relu_backward_ref(y, dy))
    assert host_kernels.launches == {"bias_relu_forward": 1, "bias_relu_backward": 1}
    y4, dy4 = (_f32(rng, 3, 4, 5, 2).transpose(3, 0, 1, 2) for _ in range(2))   # NCHW views of CHWN memory
    dx4 = host_kernels.bias_relu_backward(y4, dy4)
    assert host_kernels.launches["bias_relu_backward"] == 2 and dx4.strides == dy4.strides
    np.testing.assert_array_equal(dx4, host_kernels.bias_relu_backward_ref(y4, dy4))
    np.testing.assert_array_equal(host_kernels.bias_relu_backward(y4, np.ascontiguousarray(dy4)), dx4)
    assert host_kernels.launches["bias_relu_backward"] == 2   # the layouts differ: the oracle ran
    x4 = _f32(rng, 3, 4, 5, 2).transpose(3, 0, 1, 2)
    x4[0, 0, 0, :3] = [np.nan, -np.inf, np.inf]
    with np.errstate(invalid="ignore"):
        r4 = host_kernels.relu_forward(x4)
        assert host_kernels.launches["relu_forward"] == 1 and r4.strides == x4.strides
        np.testing.assert_array_equal(r4, x4 * (x4 > 0))


def test_host_launches_refuse_what_a_gpu_would_misread_or_refuse(host_kernels):
    """A launch whose arguments do not match the kernel's C parameters, as CuPy would pack them
    (a Python int or an int32 for a size_t, a float64 array for a float *, one argument short),
    raises TypeError naming the argument; an empty grid or a block over 1024 threads, which CUDA
    refuses, raises ValueError; the matching launch runs."""
    relu = host_kernels.load("bias_act").get_function("relu_forward")
    x, y = np.arange(-2, 3, dtype=np.float32), np.empty(5, np.float32)
    for bad, match in (((x, y, 5), "argument 2 is size_t, launched with int"),
                       ((x, y, np.int32(5)), "argument 2 is size_t, launched with int32"),
                       ((x.astype(np.float64), y, np.uint64(5)),
                        r"argument 0 is float \*, launched with ndarray of float64"),
                       ((x, y), "takes 3 arguments, launched with 2")):
        with pytest.raises(TypeError, match=match):
            relu((1,), (32,), bad)
    for grid, block in (((0,), (32,)), ((1,), (2048,)), ((1,), (64, 32))):
        with pytest.raises(ValueError, match="relu_forward"):
            relu(grid, block, (x, y, np.uint64(5)))
    relu((1,), (32,), (x, y, np.uint64(5)))
    np.testing.assert_array_equal(y, [0, 0, 0, 1, 2])


BARRIERS = r"""
extern "C" __global__ void reverse(const float* x, float* y, int wait) {
    __shared__ float s[1024];
    s[threadIdx.x] = x[threadIdx.x];
    if (wait) __syncthreads();
    y[threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}
extern "C" __global__ void diverge(float* y) {
    if (threadIdx.x < 32) __syncthreads();
    y[threadIdx.x] = 1.0f;
}
"""


def test_host_blocks_keep_barriers_and_report_a_divergent_one(tmp_path):
    """On the host, a block's threads meet at __syncthreads: a reversal through shared memory is
    right with the barrier and wrong without it (a thread would read slots not yet written); a
    barrier that only some threads reach raises instead of hanging."""
    if hostkernels.CXX is None:
        pytest.skip("g++ not on PATH")
    module = hostkernels.module_from_source(BARRIERS, tmp_path, Counter(), np.ndarray)
    for wait in (1, 0):
        x, y = np.arange(256, dtype=np.float32) + 1000 * wait, np.empty(256, np.float32)
        module.get_function("reverse")((1,), (256,), (x, y, np.int32(wait)))
        assert np.array_equal(y, x[::-1]) == bool(wait)
    with pytest.raises(RuntimeError, match="diverge: some threads of a block wait at a barrier"):
        module.get_function("diverge")((1,), (64,), (np.zeros(64, np.float32),))


@pytest.mark.parametrize("shape", [(1, 1), (5, 10), (2, 7, 33), (4, 1100)])
def test_host_layernorm_kernels_within_allowance(host_kernels, shape):
    """The LayerNorm kernels (block sums, rows striding past the grid cap, rows wider than a
    block, chunked column sums) are as accurate as NumPy float32 against float64."""
    rng = np.random.default_rng(4)
    n = shape[-1]
    x = _f32(rng, *shape) * np.float32(3) + np.float32(2)
    gamma, beta, dy = _f32(rng, n), _f32(rng, n), _f32(rng, *shape)
    out = host_kernels.layernorm_forward(x, gamma, beta)
    ref32 = host_kernels.layernorm_forward_ref(x, gamma, beta)
    ref64 = host_kernels.layernorm_forward_ref(*(a.astype(np.float64) for a in (x, gamma, beta)))
    for name, k, r32, r64 in zip(("y", "xhat", "rstd"), out, ref32, ref64):
        assert k.shape == r64.shape
        assert_as_accurate(k, r32, r64, name)
    grads = host_kernels.layernorm_backward(dy, out[1], out[2], gamma)
    gref32 = host_kernels.layernorm_backward_ref(dy, ref32[1], ref32[2], gamma)
    gref64 = host_kernels.layernorm_backward_ref(dy.astype(np.float64), ref64[1], ref64[2], gamma.astype(np.float64))
    dy2 = dy.reshape(-1, n).astype(np.float64)
    sums = (0.0, np.abs(dy2 * ref64[1].reshape(-1, n)).sum(axis=0), np.abs(dy2).sum(axis=0))
    for name, k, r32, r64, abs_sum in zip(("dx", "dgamma", "dbeta"), grads, gref32, gref64, sums):
        assert_as_accurate(k, r32, r64, name, abs_sum)


@pytest.mark.parametrize("x_layout,dy_layout", [("nchw", "nchw"), ("batch_inner", "batch_inner"),
                                                 ("batch_inner", "nchw"), ("nhwc", "nhwc")])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 3, 5, 7), (8, 7, 3, 3), (16, 2, 40, 40)])
def test_host_batchnorm_kernels_within_allowance(host_kernels, shape, x_layout, dy_layout):
    """The BatchNorm kernels (channels striding past the grid cap, channels longer than a block)
    are as accurate as NumPy float32 against float64, running statistics included, with x and
    dy stored NCHW, batch-innermost or NHWC; y, xhat and dx keep x's layout where the kernels
    walk it (NCHW, batch-innermost)."""
    rng = np.random.default_rng(5)
    c = shape[1]
    x = _f32(rng, *shape) * np.float32(2) - np.float32(1)
    gamma, beta, dy = _f32(rng, c), _f32(rng, c), _f32(rng, *shape)
    rm, rv = _f32(rng, c), np.abs(_f32(rng, c))
    rm32, rv32, rm64, rv64 = rm.copy(), rv.copy(), rm.astype(np.float64), rv.astype(np.float64)
    out = host_kernels.batchnorm_forward(stored(x, x_layout), gamma, beta, rm, rv, 1e-5, 0.1)
    assert out[0].strides == out[1].strides == stored(x, expected_layout(x_layout)).strides
    ref32 = host_kernels.batchnorm_forward_ref(x, gamma, beta, rm32, rv32, 1e-5, 0.1)
    ref64 = host_kernels.batchnorm_forward_ref(*(a.astype(np.float64) for a in (x, gamma, beta)), rm64, rv64,
                                               1e-5, 0.1)
    for name, k, r32, r64 in zip(("y", "xhat", "rstd", "running_mean", "running_var"),
                                 (*out, rm, rv), (*ref32, rm32, rv32), (*ref64, rm64, rv64)):
        assert k.shape == r64.shape
        assert_as_accurate(k, r32, r64, name)
    grads = host_kernels.batchnorm_backward(stored(dy, dy_layout), out[1], out[2], gamma)
    assert grads[0].strides == out[1].strides
    gref32 = host_kernels.batchnorm_backward_ref(dy, ref32[1], ref32[2], gamma)
    gref64 = host_kernels.batchnorm_backward_ref(dy.astype(np.float64), ref64[1], ref64[2], gamma.astype(np.float64))
    axes = (0,) + tuple(range(2, len(shape)))
    dy64 = dy.astype(np.float64)
    sums = (0.0, np.abs(dy64 * ref64[1]).sum(axis=axes), np.abs(dy64).sum(axis=axes))
    for name, k, r32, r64, abs_sum in zip(("dx", "dgamma", "dbeta"), grads, gref32, gref64, sums):
        assert_as_accurate(k, r32, r64, name, abs_sum)


def test_host_sum_squares_kernels_within_allowance(host_kernels):
    """One launch pair over an empty, a 2-D and a 3000-value tensor (several partial blocks)
    gives each sum of squares as accurately as NumPy float32."""
    rng = np.random.default_rng(6)
    arrays = [np.zeros(0, np.float32), _f32(rng, 7, 9), _f32(rng, 3000)]
    out = host_kernels.sum_squares(arrays)
    ref64 = host_kernels.sum_squares_ref([a.astype(np.float64) for a in arrays])
    assert out.shape == (3,) and out.dtype == np.float32
    assert_as_accurate(out, host_kernels.sum_squares_ref(arrays), ref64, "sum of squares", ref64)

"""hpdl's optimizers, server rules, layers and training step run the fused kernels where a GPU
would, and get what the NumPy path gets.

The kernels are the kernels/*.cu sources built for the host (tests/hostkernels.py), so this
runs without a GPU: hpdl.kernels then takes its kernel path for NumPy float32 arrays and
counts launches by kernel name. Element-wise updates must equal the NumPy path bit for
bit; outputs that involve a reduction must be as accurate as NumPy float32 against the
float64 NumPy path (hpdl.kernels.float32_allowance).
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

from accuracy import assert_as_accurate
from layouts import stored
from hpdl import kernels
from hpdl.algorithms.dcasgd import DcAsgdAdaptiveServer, DcAsgdServer
from hpdl.algorithms.easgd import EasgdServer, easgd_sync_center, easgd_sync_worker
from hpdl.layers import GELU, BatchNorm, Conv2d, Flatten, LayerNorm, Linear, MaxPool2d, ReLU
from hpdl.layers import conv
from hpdl.layers.base import TRAIN
from hpdl.models import backward, forward
from hpdl.optim import LAMB, LARS, SGD, AdamW
from hpdl.optim import base as optim_base
from hpdl.optim import largebatch, lars
from hpdl.optim.largebatch import squared_norms
from hpdl.trainer import loss_and_grads


@contextlib.contextmanager
def numpy_path():
    """Inside, hpdl.kernels takes the NumPy reference path again, whatever the fixture patched."""
    with pytest.MonkeyPatch.context() as monkey:
        monkey.setattr(kernels, "_use_kernel", lambda *arrays: False)
        yield


def _copy(params):
    return [{k: v.copy() for k, v in p.items()} for p in params]


class DeviceLike(np.ndarray):
    """NumPy arrays that read back as CuPy's do: a reduction stays a 0-d array, and each conversion
    to a Python number or list (float, int, bool, item, tolist), which on a GPU is a copy to the
    host that waits for the device, is counted in `reads`. Results of ufuncs on a DeviceLike are
    DeviceLike; `device_like_numpy` makes numpy's allocators return them too."""

    reads = 0

    def __array_wrap__(self, obj, context=None, return_scalar=False):
        return np.asarray(obj).view(DeviceLike)

    def __getitem__(self, key):
        out = super().__getitem__(key)   # an element stays a 0-d array, as in CuPy
        return out if isinstance(out, np.ndarray) else np.asarray(out).view(DeviceLike)

    def _read(self) -> np.ndarray:
        DeviceLike.reads += 1
        return self.view(np.ndarray)

    def __float__(self):
        return float(self._read())

    def __int__(self):
        return int(self._read())

    def __bool__(self):
        return bool(self._read())

    def item(self, *args):
        return self._read().item(*args)

    def tolist(self):
        return self._read().tolist()


def device_like_numpy(monkeypatch) -> None:
    """numpy.empty, zeros and ascontiguousarray return DeviceLike arrays, so that every array a
    step allocates (kernel outputs, scratch buffers, optimizer state) counts its reads too; and
    the optimizers' explicit copies to the host (backend.to_host) count as reads."""
    for name in ("empty", "zeros", "ascontiguousarray"):
        monkeypatch.setattr(np, name, lambda *a, _f=getattr(np, name), **k: _f(*a, **k).view(DeviceLike))

    def to_host(a):
        DeviceLike.reads += 1
        return np.asarray(a).view(np.ndarray)

    for module in (optim_base, lars, largebatch):
        monkeypatch.setattr(module, "to_host", to_host)


def _linear_net(rng):
    layers = [Linear(7, 5), Linear(5, 3)]
    params = [layer.init(rng, np, np.float32) for layer in layers]
    grads = [[{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p.items()} for p in params]
             for _ in range(3)]
    return layers, params, grads


@pytest.mark.parametrize("make", [lambda layers: SGD(layers, momentum=0.9, nesterov=True, weight_decay=0.01),
                                  lambda layers: SGD(layers),
                                  lambda layers: AdamW(layers, weight_decay=0.01)],
                         ids=["sgd-nesterov", "sgd", "adamw"])
def test_optimizers_launch_one_update_kernel_per_step(host_kernels, make):
    """Three steps of SGD and AdamW launch their update kernel and the gradient check once per
    step each, for all 4 tensors, and leave weights and state bit-identical to the NumPy path."""
    layers, params, grads = _linear_net(np.random.default_rng(0))
    ref_params = _copy(params)
    opt, ref = make(layers), make(layers)
    for lr, g in zip((0.1, 0.05, 0.02), grads):
        opt.step(params, g, lr)
        with numpy_path():
            ref.step(ref_params, g, lr)
    name = "adamw_update" if isinstance(opt, AdamW) else "sgd_update"
    assert host_kernels.launches == {name: 3, "any_nonfinite": 3}
    for mine, theirs in zip(params, ref_params):
        for k in mine:
            np.testing.assert_array_equal(mine[k], theirs[k])
    for key in ref.state:
        np.testing.assert_array_equal(opt.state[key], ref.state[key])


@pytest.mark.parametrize("server_class", [DcAsgdServer, DcAsgdAdaptiveServer, EasgdServer])
def test_server_rules_launch_their_kernels(host_kernels, server_class):
    """DC-ASGD (both variants) and asynchronous EASGD servers apply each message with one kernel
    launch, with weights, backups and replies bit-identical to the NumPy path."""
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal(300).astype(np.float32)
    server, ref = server_class(w0, 3), server_class(w0, 3)
    for step, worker in enumerate([0, 2, 0, 1]):
        message = rng.standard_normal(300).astype(np.float32)
        reply = server.apply(worker, message, 0.1 / (1 + step)).copy()
        with numpy_path():
            np.testing.assert_array_equal(reply, ref.apply(worker, message, 0.1 / (1 + step)))
    name = "easgd_elastic" if server_class is EasgdServer else "dcasgd_update"
    assert host_kernels.launches == {name: 4}
    for state in server_class._state_names:
        np.testing.assert_array_equal(getattr(server, state), getattr(ref, state))


def test_synchronous_easgd_halves_launch_their_kernels(host_kernels):
    """The replica's and the centre's half of synchronous EASGD run as kernels, bit-identical to NumPy."""
    rng = np.random.default_rng(2)
    x, center, g, x_sum = (rng.standard_normal(500).astype(np.float32) for _ in range(4))
    x_ref, center_ref = x.copy(), center.copy()
    easgd_sync_worker(x, center, g, 0.05, 0.7)
    easgd_sync_center(center, x_sum, 4, 0.05, 0.7)
    with numpy_path():
        easgd_sync_worker(x_ref, center_ref, g, 0.05, 0.7)
        easgd_sync_center(center_ref, x_sum, 4, 0.05, 0.7)
    assert host_kernels.launches == {"easgd_sync_worker": 1, "easgd_sync_center": 1}
    np.testing.assert_array_equal(x, x_ref)
    np.testing.assert_array_equal(center, center_ref)


@pytest.mark.parametrize("layer,shape", [(LayerNorm(33), (6, 33)), (BatchNorm(4), (5, 4, 3, 3)),
                                         (BatchNorm(4), (1, 4, 3, 3)), (BatchNorm(6), (9, 6))],
                         ids=["layernorm", "batchnorm2d", "batchnorm2d-batch1", "batchnorm1d"])
def test_norm_layers_run_their_kernels(host_kernels, layer, shape):
    """LayerNorm and training-mode BatchNorm run forward and backward as kernels, as accurate as
    NumPy float32 in every output, cache entry, gradient and running statistic."""
    rng = np.random.default_rng(3)
    params = layer.init(rng, np, np.float32)
    for name in layer.trainable:
        params[name] += rng.standard_normal(params[name].shape).astype(np.float32)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)

    def run(p, x, dy):
        y, cache = layer.forward(p, x, TRAIN)
        dx, grads = layer.backward(p, cache, dy)
        return [y, cache[0], cache[1], dx, *grads.values(), *(p[k] for k in p if k not in layer.trainable)]

    outputs = run({k: v.copy() for k, v in params.items()}, x, dy)
    with numpy_path():
        ref32 = run({k: v.copy() for k, v in params.items()}, x, dy)
        ref64 = run({k: v.astype(np.float64) for k, v in params.items()}, x.astype(np.float64), dy.astype(np.float64))
    kind = "layernorm" if isinstance(layer, LayerNorm) else "batchnorm"
    assert host_kernels.launches[f"{kind}_forward"] == 1 and host_kernels.launches[f"{kind}_backward"] == 1
    # dgamma and dbeta are sums over the rows of dy xhat and dy.
    rows = dy.reshape(-1, shape[-1]) if kind == "layernorm" else np.moveaxis(dy, 1, -1).reshape(-1, shape[1])
    for i, (mine, r32, r64) in enumerate(zip(outputs, ref32, ref64)):
        assert_as_accurate(mine, r32, r64, f"{kind} output {i}", abs_sum=np.abs(rows).sum(axis=0).max() * 8
                            if i in (4, 5) else 0.0)


def test_trust_ratios_and_layer_norms_take_one_sum_squares_pass(host_kernels, monkeypatch):
    """LARS and LAMB take every trust-ratio norm of a step, and LENA/AdaScale's squared_norms every
    layer's, from one sum_squares pass (two launches), as accurate as NumPy float32."""
    monkeypatch.setattr(kernels, "MAX_GRID", 65535)   # one grid row per tensor: a pass covers them all
    layers, params, grads = _linear_net(np.random.default_rng(4))
    for make in (lambda: LARS(layers, weight_decay=0.01), lambda: LAMB(layers, weight_decay=0.01)):
        host_kernels.launches.clear()
        mine, ref32, ref64 = make(), make(), make()
        p, p32, p64 = _copy(params), _copy(params), [{k: v.astype(np.float64) for k, v in q.items()} for q in params]
        mine.step(p, grads[0], 0.1)
        with numpy_path():
            ref32.step(p32, grads[0], 0.1)
            ref64.step(p64, [{k: v.astype(np.float64) for k, v in q.items()} for q in grads[0]], 0.1)
        assert host_kernels.launches["sum_squares_partial"] == 1 and host_kernels.launches["sum_squares_finish"] == 1
        assert set(mine.trust) == {"0/W", "1/W"}
        for key in mine.trust:
            assert_as_accurate(mine.trust[key], ref32.trust[key], ref64.trust[key], f"{type(mine).__name__} {key}")
    host_kernels.launches.clear()
    sq = squared_norms(layers, grads[1])
    with numpy_path():
        sq32 = squared_norms(layers, grads[1])
        sq64 = squared_norms(layers, [{k: v.astype(np.float64) for k, v in g.items()} for g in grads[1]])
    assert host_kernels.launches == {"sum_squares_partial": 1, "sum_squares_finish": 1}
    assert_as_accurate(sq, sq32, sq64, "squared_norms", abs_sum=sq64)


def _conv_net(rng):
    """A convolutional net with BatchNorm and LayerNorm, its parameters, and two batches."""
    layers = [Conv2d(1, 4, 3, pad=1, winograd=False), BatchNorm(4), ReLU(), Flatten(), Linear(4 * 6 * 6, 16),
              LayerNorm(16), ReLU(), Linear(16, 10)]
    params = [layer.init(rng, np, np.float32) for layer in layers]
    return layers, params, rng.standard_normal((2, 6, 1, 6, 6)).astype(np.float32), rng.integers(0, 10, (2, 6))


def test_a_training_step_runs_on_the_kernels(host_kernels):
    """Two steps of a convolutional net with BatchNorm and LayerNorm (loss_and_grads, then SGD
    momentum) launch the im2col, loss, normalization, ReLU and update kernels, and end with weights
    as accurate as the NumPy float32 path's against float64."""
    layers, params, x, y = _conv_net(np.random.default_rng(5))

    def train(params, dtype):
        params = [{k: v.astype(dtype) for k, v in p.items()} for p in params]
        opt = SGD(layers, momentum=0.9, weight_decay=1e-3)
        for step in range(2):
            _, grads = loss_and_grads(layers, params, x[step].astype(dtype), y[step], (0, step))
            opt.step(params, grads, 0.1)
        return params

    mine = train(params, np.float32)
    with numpy_path():
        ref32, ref64 = train(params, np.float32), train(params, np.float64)
    per_step = {"sgd_update": 1, "bias_relu_backward": 2, "im2col": 1, "softmax_xent": 1, "batchnorm_forward": 1,
                "batchnorm_backward": 1, "layernorm_forward": 1, "layernorm_backward": 1}
    for name, launches in per_step.items():
        assert host_kernels.launches[name] == 2 * launches, name
    for i, (p, p32, p64) in enumerate(zip(mine, ref32, ref64)):
        for k in p:
            assert_as_accurate(p[k], p32[k], p64[k], f"layer {i} {k}")


def _conv_linear_net(activation: type, seed: int, batch: int):
    """A convolution and a Linear, each followed by `activation`, with float32 parameters, an input
    batch and an output gradient: an activation after each kind of layer's output layout."""
    rng = np.random.default_rng(seed)
    layers = [Conv2d(1, 3, 3, pad=1, winograd=False), activation(), MaxPool2d(2), Flatten(), Linear(3 * 3 * 3, 8),
              activation(), Linear(8, 4)]
    params = [layer.init(rng, np, np.float32) for layer in layers]
    x = rng.standard_normal((batch, 1, 6, 6)).astype(np.float32)
    return layers, params, x, rng.standard_normal((batch, 4)).astype(np.float32)


@pytest.mark.parametrize("batch", [5, 1])
def test_relus_run_on_the_bias_relu_kernels(host_kernels, batch):
    """A Linear+ReLU pair's forward is one bias_relu_forward launch, and each ReLU's backward one
    bias_relu_backward launch, after a convolution (batch-innermost activations, no copy) as after a
    Linear, for a batch of one too (any stride on its batch axis); outputs and gradients are
    bit-identical to the NumPy path's."""
    layers, params, x, dy = _conv_linear_net(ReLU, 11, batch)

    def run():
        y, caches = forward(layers, params, x)
        return y, *backward(layers, params, caches, dy)

    y, dx, grads = run()
    with numpy_path():
        y_ref, dx_ref, grads_ref = run()
    assert host_kernels.launches["bias_relu_forward"] == 1 and host_kernels.launches["bias_relu_backward"] == 2
    assert host_kernels.launches["maxpool_forward"] == 1 and host_kernels.launches["maxpool_backward"] == 1
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    for g, g_ref in zip(grads, grads_ref):
        for k in g:
            np.testing.assert_array_equal(g[k], g_ref[k])


@pytest.mark.parametrize("batch", [5, 1])
def test_gelus_run_on_the_bias_gelu_kernels(host_kernels, batch):
    """A Linear+GELU pair's forward is one bias_gelu_forward launch, and each GELU's backward one
    bias_gelu_backward launch, after a convolution (batch-innermost activations, no copy) as after a
    Linear, for a batch of one too (any stride on its batch axis); outputs and gradients are as
    accurate as the NumPy path's in float32 (tanhf, not NumPy's tanh)."""
    layers, params, x, dy = _conv_linear_net(GELU, 12, batch)

    def run(dtype):
        ps = [{k: v.astype(dtype) for k, v in p.items()} for p in params]
        y, caches = forward(layers, ps, x.astype(dtype))
        dx, grads = backward(layers, ps, caches, dy.astype(dtype))
        return [y, dx] + [g[k] for g in grads for k in sorted(g)]

    mine = run(np.float32)
    with numpy_path():
        ref32, ref64 = run(np.float32), run(np.float64)
    assert host_kernels.launches["bias_gelu_forward"] == 1 and host_kernels.launches["bias_gelu_backward"] == 2
    for i, (a, a32, a64) in enumerate(zip(mine, ref32, ref64)):
        assert_as_accurate(a, a32, a64, f"output {i}")


@pytest.mark.parametrize("k, shape", [(2, (3, 2, 4, 6)), (2, (2, 3, 5, 7)), (3, (2, 2, 7, 6))])
def test_maxpool_kernels_equal_the_layers_array_path(host_kernels, k, shape):
    """MaxPool2d on the kernels (one launch each way) gives the array path's y and dx bit for bit, with
    ties (the first offset takes the gradient), a NaN in a window (NaN out, no winner), a NaN in dy
    and rows and columns past the last window (gradient 0); its oracles agree with both."""
    rng = np.random.default_rng(12)
    x = np.round(rng.standard_normal(shape), 0).astype(np.float32)   # rounded: many ties
    x[0, 0, 0, 0] = np.nan
    x = stored(x, "batch_inner")   # as conv hands it on
    layer = MaxPool2d(k)
    y, cache = layer.forward({}, x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dy[0, 0, 0, 1] = np.nan
    with np.errstate(invalid="ignore"):   # NaN * 0 in the masks
        dx, _ = layer.backward({}, cache, dy)
        with numpy_path():
            y_ref, cache_ref = layer.forward({}, x)
            dx_ref, _ = layer.backward({}, cache_ref, dy)
            y_oracle, win = kernels.maxpool_forward_ref(x, k)
            dx_oracle = kernels.maxpool_backward_ref(dy, win, x.shape, k)
    assert host_kernels.launches == {"maxpool_forward": 1, "maxpool_backward": 1} and cache[0] and not cache_ref[0]
    for mine, theirs in ((y, y_ref), (y_oracle, y_ref), (dx, dx_ref), (dx_oracle, dx_ref)):
        np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(cache[1], win)
    assert np.isnan(y[0, 0, 0, 0]) and win[0, 0, 0, 0] == 255


def test_sum_squares_takes_tensors_beyond_one_grid(host_kernels):
    """More tensors than grid rows (MAX_GRID is 3 here) are summed in passes of MAX_GRID, in order."""
    rng = np.random.default_rng(6)
    tensors = [rng.standard_normal(n).astype(np.float32) for n in (1, 40, 7, 300, 2, 0, 1000)]
    sums = kernels.sum_squares(tensors)
    assert host_kernels.launches == {"sum_squares_partial": 3, "sum_squares_finish": 3}
    with numpy_path():
        for i, t in enumerate(tensors):
            assert_as_accurate(sums[i:i + 1], kernels.sum_squares([t]), kernels.sum_squares([t.astype(np.float64)]),
                                f"{t.size} elements", abs_sum=float(np.sum(t.astype(np.float64) ** 2)))


@pytest.mark.parametrize("make", [lambda layers: SGD(layers, momentum=0.9), lambda layers: AdamW(layers)],
                         ids=["sgd", "adamw"])
def test_update_kernels_honour_the_device_halt_flag(host_kernels, make):
    """With check_on_device, the update kernels still launch after a NaN gradient but change nothing:
    weights and state stay bit-identical to those after the last clean step."""
    layers, params, grads = _linear_net(np.random.default_rng(7))
    ref_params = _copy(params)
    opt, ref = make(layers), make(layers)
    opt.check_on_device()
    grads[1][0]["W"][2, 1] = np.inf
    for lr, g in zip((0.1, 0.05, 0.02), grads):
        opt.step(params, g, lr)
    with numpy_path():
        ref.step(ref_params, grads[0], 0.1)
    assert host_kernels.launches["any_nonfinite"] == 3
    assert host_kernels.launches["sgd_update" if isinstance(opt, SGD) else "adamw_update"] == 3
    for mine, theirs in zip(params, ref_params):
        for k in mine:
            np.testing.assert_array_equal(mine[k], theirs[k])
    for key in ref.state:
        np.testing.assert_array_equal(opt.state[key], ref.state[key])


def test_a_training_step_reads_nothing_back_to_the_host(host_kernels, monkeypatch):
    """On the kernel path, with the gradient check on the device (as GPU runs do), two steps of
    loss_and_grads and SGD momentum convert no device value to a host number; the host-side
    check reads exactly one per step."""
    layers, params, x, y = _conv_net(np.random.default_rng(8))
    device_like_numpy(monkeypatch)
    for check_on_device, reads_per_step in ((True, 0), (False, 1)):
        step_params = [{k: v.copy().view(DeviceLike) for k, v in p.items()} for p in params]
        opt = SGD(layers, momentum=0.9)
        if check_on_device:
            opt.check_on_device()
        DeviceLike.reads = 0
        for step in range(2):
            _, grads = loss_and_grads(layers, step_params, x[step].view(DeviceLike), y[step].view(DeviceLike),
                                      (0, step))
            opt.step(step_params, grads, 0.1)
        assert DeviceLike.reads == 2 * reads_per_step, f"check_on_device={check_on_device}"
        assert host_kernels.launches["sgd_update"] > 0
        opt.settle()


def test_any_nonfinite_finds_each_nan_and_inf(host_kernels):
    """One launch over 7 tensors (more than the 3 grid rows here, some empty) sets the flag exactly
    when some element is NaN, +Inf or -Inf, wherever it sits, also in a strided view, and never
    clears a set flag."""
    rng = np.random.default_rng(10)
    sizes = (1, 700, 0, 33, 2000, 5, 1)
    clean = [(rng.standard_normal(n) * 1e30).astype(np.float32) for n in sizes]
    flag = np.zeros(1, np.float32)
    kernels.any_nonfinite(clean, flag)
    assert flag[0] == 0 and host_kernels.launches == {"any_nonfinite": 1}
    for t, k, bad in ((0, 0, np.nan), (1, 699, np.inf), (3, 16, -np.inf), (4, 1999, np.nan), (6, 0, -np.inf)):
        tensors = [a.copy() for a in clean]
        tensors[t][k] = bad
        flag = np.zeros(1, np.float32)
        kernels.any_nonfinite(tensors, flag)
        with numpy_path():
            ref = np.zeros(1, np.float32)
            kernels.any_nonfinite(tensors, ref)
        assert flag[0] == 1 and ref[0] == 1, (t, k, bad)
    flag = np.ones(1, np.float32)
    kernels.any_nonfinite(clean, flag)
    assert flag[0] == 1
    strided = np.zeros((40, 2), np.float32)
    strided[30, 1] = np.nan   # past the first 40 floats from the view's start: found only through its strides
    flag = np.zeros(1, np.float32)
    kernels.any_nonfinite([strided[:, 1]], flag)
    assert flag[0] == 1


def test_record_refusal_keeps_the_first_refused_step(host_kernels):
    """Over clean, refused, clean and refused updates, the kernel and its oracle leave the same halt
    flag and refusal step: raised at the first refusal, which alone is recorded, one launch each."""
    states = [(np.zeros(1, np.float32), np.zeros(1, np.int64)) for _ in range(2)]
    for step, refused in enumerate((0.0, 1.0, 0.0, 1.0), start=1):
        flag = np.array([refused], np.float32)
        kernels.record_refusal(flag, *states[0], step)
        kernels.record_refusal_ref(flag, *states[1], step)
        assert [(float(h[0]), int(r[0])) for h, r in states] == [(float(step >= 2), 2 if step >= 2 else 0)] * 2
    assert host_kernels.launches == {"record_refusal": 4}


@pytest.mark.parametrize("case", [(3, 2, 7, 6, 3, 1, 1), (2, 3, 9, 9, 3, 2, 1), (4, 2, 5, 8, 1, 2, 0),
                                  (2, 1, 6, 6, 5, 1, 2)])
def test_conv_im2col_and_col2im_run_on_the_kernels(host_kernels, case):
    """conv.im2col reads a batch-innermost x (as conv and pooling layers hand it on) and an NCHW one
    in place with one launch, and conv.col2im gathers into batch-innermost memory with one launch,
    both bit-identical to conv's own NumPy path; a Conv2d's backward then equals the NumPy one."""
    n, c, h, w, k, s, pad = case
    rng = np.random.default_rng(11)
    x_nchw = rng.standard_normal((n, c, h, w)).astype(np.float32)
    x_inner = conv.nchw(np.ascontiguousarray(conv.batch_inner(x_nchw)))
    for x in (x_nchw, x_inner):
        cols = conv.im2col(x, k, s, pad)
        with numpy_path():
            np.testing.assert_array_equal(cols, conv.im2col(x, k, s, pad))
        dcols = rng.standard_normal(cols.shape).astype(np.float32)
        dx = conv.col2im(dcols, x.shape, k, s, pad)
        assert conv.batch_inner(dx).flags.c_contiguous
        with numpy_path():
            np.testing.assert_array_equal(dx, conv.col2im(dcols, x.shape, k, s, pad))
    assert host_kernels.launches == {"im2col": 2, "col2im": 2}
    layer = Conv2d(c, 3, k, stride=s, pad=pad, winograd=False)
    params = layer.init(rng, np, np.float32)
    y, cache = layer.forward(params, x_inner)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, grads = layer.backward(params, cache, dy)
    with numpy_path():
        y_ref, cache_ref = layer.forward(params, x_inner)
        dx_ref, grads_ref = layer.backward(params, cache_ref, dy)
    for mine, theirs in ((y, y_ref), (dx, dx_ref), (grads["W"], grads_ref["W"]), (grads["b"], grads_ref["b"])):
        np.testing.assert_array_equal(mine, theirs)

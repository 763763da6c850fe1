"""Optimizers against hand-written reference updates and closed forms; schedules at key steps."""
from __future__ import annotations

import math

import numpy as np
import pytest

from hpdl.layers.activation import ReLU
from hpdl.layers.linear import Linear
from hpdl.optim import SGD, AdamW, make_optimizer, make_schedule
from hpdl.optim.schedules import constant, cosine, step_decay, warmup

LAYERS = [Linear(3, 4), ReLU(), Linear(4, 2)]  # the ReLU checks that layer indices line up


def make_params(dtype=np.float64):
    params = [layer.init(np.random.default_rng(i), np, dtype) for i, layer in enumerate(LAYERS)]
    for p in params:  # non-zero biases, so that decay on them would show
        if "b" in p:
            p["b"] += np.linspace(-1.0, 1.0, p["b"].size, dtype=dtype)
    return params


def make_grads(step, dtype=np.float64):
    rng = np.random.default_rng(100 + step)
    return [{name: rng.standard_normal(p[name].shape).astype(dtype) for name in layer.trainable}
            for layer, p in zip(LAYERS, make_params(dtype))]


def copy(params):
    return [{k: v.copy() for k, v in p.items()} for p in params]


def run(opt, params, steps, lr=0.1, first=0):
    for t in range(first, first + steps):
        opt.step(params, make_grads(t, params[0]["W"].dtype), lr)
    return params


def reference_sgd(params, steps, lr, momentum, nesterov, wd, lr_scale, wd_scale):
    """torch.optim.SGD's update, written out per tensor."""
    bufs = {}
    for t in range(steps):
        for i, (layer, p, g) in enumerate(zip(LAYERS, params, make_grads(t))):
            for name in layer.trainable:
                decay = 0.0 if name in layer.no_decay else wd * wd_scale[i]
                d = g[name] + decay * p[name]
                if momentum:
                    key = (i, name)
                    bufs[key] = d.copy() if key not in bufs else momentum * bufs[key] + d
                    d = d + momentum * bufs[key] if nesterov else bufs[key]
                p[name] = p[name] - lr[i] * lr_scale[i] * d
    return params


def reference_adamw(params, steps, lr, betas, eps, wd, lr_scale, wd_scale):
    """torch.optim.AdamW's update, written out per tensor."""
    b1, b2 = betas
    m, v = {}, {}
    for t in range(1, steps + 1):
        for i, (layer, p, g) in enumerate(zip(LAYERS, params, make_grads(t - 1))):
            for name in layer.trainable:
                key, rate = (i, name), lr[i] * lr_scale[i]
                decay = 0.0 if name in layer.no_decay else wd * wd_scale[i]
                w = p[name] * (1 - rate * decay)
                m[key] = b1 * m.get(key, 0.0) + (1 - b1) * g[name]
                v[key] = b2 * v.get(key, 0.0) + (1 - b2) * g[name] ** 2
                m_hat, v_hat = m[key] / (1 - b1 ** t), v[key] / (1 - b2 ** t)
                p[name] = w - rate * m_hat / (np.sqrt(v_hat) + eps)
    return params


def assert_params_close(a, b, rtol=1e-12, atol=1e-14):
    for pa, pb in zip(a, b):
        assert pa.keys() == pb.keys()
        for k in pa:
            np.testing.assert_allclose(pa[k], pb[k], rtol=rtol, atol=atol)


def assert_params_equal(a, b):
    for pa, pb in zip(a, b):
        assert pa.keys() == pb.keys()
        for k in pa:
            np.testing.assert_array_equal(pa[k], pb[k])


GROUPS = [  # (lr per layer or one lr, lr_scale, wd_scale)
    (0.1, None, None),
    ([0.05, 0.0, 0.2], [2.0, 1.0, 0.5], [1.0, 1.0, 3.0]),
]


def per_layer(value, default):
    if value is None:
        return [default] * len(LAYERS)
    return value if isinstance(value, list) else [value] * len(LAYERS)


@pytest.mark.parametrize("momentum,nesterov,wd", [
    (0.0, False, 0.0), (0.0, False, 0.01), (0.9, False, 0.0), (0.9, False, 0.01),
    (0.9, True, 0.0), (0.9, True, 0.01)])
@pytest.mark.parametrize("lr,lr_scale,wd_scale", GROUPS)
def test_sgd_matches_reference(momentum, nesterov, wd, lr, lr_scale, wd_scale):
    """SGD follows torch's momentum/Nesterov/L2 rule with per-layer lr and decay scales,
    and never decays biases."""
    opt = SGD(LAYERS, momentum=momentum, nesterov=nesterov, weight_decay=wd,
              lr_scale=lr_scale, wd_scale=wd_scale)
    got = run(opt, make_params(), 5, lr)
    want = reference_sgd(make_params(), 5, per_layer(lr, None), momentum, nesterov, wd,
                         per_layer(lr_scale, 1.0), per_layer(wd_scale, 1.0))
    assert_params_close(got, want)


@pytest.mark.parametrize("lr,lr_scale,wd_scale", GROUPS)
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adamw_matches_reference(wd, lr, lr_scale, wd_scale):
    """AdamW follows torch's bias-corrected, decoupled-decay rule with per-layer groups,
    and never decays biases."""
    opt = AdamW(LAYERS, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd,
                lr_scale=lr_scale, wd_scale=wd_scale)
    got = run(opt, make_params(), 5, lr)
    want = reference_adamw(make_params(), 5, per_layer(lr, None), (0.8, 0.95), 1e-6, wd,
                           per_layer(lr_scale, 1.0), per_layer(wd_scale, 1.0))
    assert_params_close(got, want)


def constant_gradient_run(opt, steps, lr, g):
    """W after `steps` steps of a one-weight Linear layer from W = 2 with gradient g."""
    params = [{"W": np.full((1, 1), 2.0), "b": np.zeros(1)}]
    grads = [{"W": np.full((1, 1), g), "b": np.zeros(1)}]
    for _ in range(steps):
        opt.step(params, grads, lr)
    return params[0]["W"].item()


def test_sgd_momentum_closed_form():
    """Heavy ball on a constant gradient g: buffer_t = g (1 - mu^t) / (1 - mu)."""
    mu, lr, g, T = 0.9, 0.1, 0.5, 7
    got = constant_gradient_run(SGD([Linear(1, 1)], momentum=mu), T, lr, g)
    want = 2.0 - lr * g * sum((1 - mu ** t) / (1 - mu) for t in range(1, T + 1))
    assert got == pytest.approx(want, rel=1e-14)


def test_sgd_nesterov_closed_form():
    """Nesterov on a constant gradient g steps by g (1 + mu (1 - mu^t) / (1 - mu))."""
    mu, lr, g, T = 0.9, 0.1, 0.5, 7
    got = constant_gradient_run(SGD([Linear(1, 1)], momentum=mu, nesterov=True), T, lr, g)
    want = 2.0 - lr * g * sum(1 + mu * (1 - mu ** t) / (1 - mu) for t in range(1, T + 1))
    assert got == pytest.approx(want, rel=1e-14)


def test_adamw_constant_gradient_closed_form():
    """Bias correction makes Adam's step on a constant gradient exactly lr g / (|g| + eps)."""
    lr, g, eps, T = 0.01, 0.5, 1e-8, 7
    got = constant_gradient_run(AdamW([Linear(1, 1)], eps=eps, weight_decay=0.0), T, lr, g)
    assert got == pytest.approx(2.0 - T * lr * g / (g + eps), rel=1e-14)


@pytest.mark.parametrize("make", [lambda: SGD(LAYERS, weight_decay=0.1),
                                  lambda: AdamW(LAYERS, weight_decay=0.1)])
def test_decay_alone_shrinks_weights_geometrically_and_spares_biases(make):
    """With zero gradients both rules give W (1 - lr wd)^T and leave biases exactly alone."""
    opt, params, start = make(), make_params(), make_params()
    zeros = [{k: np.zeros_like(p[k]) for k in layer.trainable} for layer, p in zip(LAYERS, params)]
    for _ in range(4):
        opt.step(params, zeros, 0.5)
    for layer, p, p0 in zip(LAYERS, params, start):
        if layer.trainable:
            np.testing.assert_allclose(p["W"], p0["W"] * (1 - 0.5 * 0.1) ** 4, rtol=1e-14)
            np.testing.assert_array_equal(p["b"], p0["b"])


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_lr_scale_equals_per_layer_rates(name):
    """lr_scale s with a scalar lr gives the same weights as the per-layer rates lr s."""
    scaled = make_optimizer(name, LAYERS, lr_scale=[2.0, 1.0, 0.5])
    plain = make_optimizer(name, LAYERS)
    assert_params_equal(run(scaled, make_params(), 3, 0.1),
                        run(plain, make_params(), 3, [0.2, 0.1, 0.05]))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_updates_in_place_in_float32_without_touching_grads(name):
    """Steps write into the same float32 arrays and only read the gradients."""
    opt = make_optimizer(name, LAYERS, weight_decay=0.1)
    params = make_params(np.float32)
    arrays = [p["W"] for p in params if "W" in p]
    grads = make_grads(0, np.float32)
    before = copy(grads)
    opt.step(params, grads, np.float64(0.1))
    assert all(p["W"] is a for p, a in zip((p for p in params if "W" in p), arrays))
    assert all(a.dtype == np.float32 for p in params for a in p.values())
    assert all(a.dtype == np.float32 for a in opt.state_dict().values() if a.ndim)
    assert_params_equal(grads, before)


@pytest.mark.parametrize("name,kw", [("sgd", {"momentum": 0.9, "weight_decay": 1e-2}),
                                     ("sgd", {"momentum": 0.9, "nesterov": True}),
                                     ("adamw", {"weight_decay": 1e-2})])
def test_state_dict_round_trip_continues_bitwise(name, kw):
    """Five steps, save, five more equals five steps, restore into a new optimizer, five more."""
    opt = make_optimizer(name, LAYERS, **kw)
    params = run(opt, make_params(np.float32), 5)
    saved_params, saved_state = copy(params), opt.state_dict()
    straight = run(opt, params, 5, first=5)

    resumed_opt = make_optimizer(name, LAYERS, **kw)
    resumed_opt.load_state_dict(saved_state)
    resumed = run(resumed_opt, saved_params, 5, first=5)
    assert_params_equal(straight, resumed)
    assert resumed_opt.steps == opt.steps == 10
    # Neither optimizer wrote into the snapshot, which can resume once more.
    again_opt = make_optimizer(name, LAYERS, **kw)
    again_opt.load_state_dict(saved_state)
    again_params = run(make_optimizer(name, LAYERS, **kw), make_params(np.float32), 5)
    assert_params_equal(run(again_opt, again_params, 5, first=5), straight)


def test_state_dict_names_and_counter():
    """State keys are flat "layer/name/slot" names plus an int64 step counter."""
    opt = SGD(LAYERS, momentum=0.9)
    assert opt.state_dict() == {"step": np.array(0)}
    run(opt, make_params(), 2)
    state = opt.state_dict()
    assert sorted(state) == ["0/W/momentum", "0/b/momentum", "2/W/momentum", "2/b/momentum",
                             "step"]
    assert state["step"].dtype == np.int64 and state["step"] == 2


def test_load_state_dict_rejects_foreign_state():
    """SGD state does not load into AdamW, nor a mis-shaped buffer into a parameter."""
    sgd = SGD(LAYERS, momentum=0.9)
    run(sgd, make_params(), 1)
    with pytest.raises(ValueError, match="unknown.*0/W/momentum"):
        AdamW(LAYERS).load_state_dict(sgd.state_dict())
    state = sgd.state_dict()
    state["0/W/momentum"] = np.zeros((4, 3))
    other = SGD(LAYERS, momentum=0.9)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="0/W/momentum"):
        run(other, make_params(), 1)


def test_bad_arguments_are_rejected():
    """Unknown names, wrong list lengths and Nesterov without momentum raise ValueError."""
    with pytest.raises(ValueError, match="unknown optimizer 'adagrad'.*sgd, adamw, lars, lamb"):
        make_optimizer("adagrad", LAYERS)
    with pytest.raises(ValueError, match="lr_scale has 2 entries for 3 layers"):
        SGD(LAYERS, lr_scale=[1.0, 1.0])
    with pytest.raises(ValueError, match="Nesterov"):
        SGD(LAYERS, nesterov=True)
    with pytest.raises(ValueError, match="2 learning rates for 3 layers"):
        SGD(LAYERS).step(make_params(), make_grads(0), [0.1, 0.1])


def test_constant_and_step_schedules():
    """Step decay multiplies by gamma every k steps, or once at each milestone."""
    assert constant(0.3)(0) == constant(0.3)(10**6) == 0.3
    every = step_decay(1.0, gamma=0.5, every=10)
    assert [every(t) for t in (0, 9, 10, 19, 20)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    marks = step_decay(1.0, gamma=0.1, milestones=[30, 10])
    assert [marks(t) for t in (0, 9, 10, 29)] == [1.0, 1.0, 0.1, 0.1]
    assert marks(30) == pytest.approx(0.01, rel=1e-15)
    with pytest.raises(ValueError, match="exactly one"):
        step_decay(1.0, every=5, milestones=[3])


def test_cosine_schedule():
    """Cosine starts at lr, passes the midpoint halfway and stays at the floor after the end."""
    sched = cosine(1.0, 100, floor=0.1)
    assert sched(0) == 1.0
    assert sched(50) == pytest.approx(0.55, rel=1e-15)
    assert sched(25) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-15)
    assert sched(100) == sched(1000) == pytest.approx(0.1, rel=1e-15)


def test_warmup_ramps_linearly_into_any_schedule():
    """Warm-up scales inner(t) from start_factor to 1 over its steps, then is inner itself."""
    inner = step_decay(0.8, gamma=0.5, every=6)
    sched = warmup(4, inner)
    assert [sched(t) for t in range(7)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.4],
                                                         rel=1e-15)
    goyal = warmup(4, constant(0.8), start_factor=0.25)
    assert [goyal(t) for t in (0, 2, 4)] == pytest.approx([0.2, 0.5, 0.8], rel=1e-15)


def test_make_schedule():
    """The factory builds each named schedule, wraps warm-up, and rejects unknown names."""
    assert make_schedule("constant", 0.1, 100)(50) == 0.1
    assert make_schedule("step", 1.0, 100, gamma=0.1, milestones=[50])(50) == 0.1
    assert make_schedule("cosine", 1.0, 100, floor=0.0)(100) == 0.0
    warm = make_schedule("cosine", 1.0, 100, warmup_steps=10)
    assert warm(0) == 0.0 and warm(5) == pytest.approx(0.5 * cosine(1.0, 100)(5), rel=1e-15)
    with pytest.raises(ValueError, match="unknown schedule 'poly'"):
        make_schedule("poly", 0.1, 100)


@pytest.mark.parametrize("name,kw", [
    ("sgd", {"momentum": 0.9, "weight_decay": 0.01}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("adamw", {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.05})])
def test_matches_torch_optim(name, kw):
    """Where PyTorch is installed (the bench extra), ours equals torch.optim's trajectory,
    biases in a no-decay parameter group."""
    torch = pytest.importorskip("torch")
    ours = make_optimizer(name, LAYERS, **kw)
    got = run(ours, make_params(), 5)
    tensors = [[torch.tensor(p[k]) for k in layer.trainable]
               for layer, p in zip(LAYERS, make_params())]
    for ts in tensors:
        for t in ts:
            t.requires_grad_(True)
    decayed = [ts[0] for ts in tensors if ts]
    spared = [ts[1] for ts in tensors if ts]
    groups = [{"params": decayed}, {"params": spared, "weight_decay": 0.0}]
    theirs = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name](groups, lr=0.1, **kw)
    for step in range(5):
        for ts, g in zip(tensors, make_grads(step)):
            for t, k in zip(ts, ("W", "b")):
                t.grad = torch.tensor(g[k])
        theirs.step()
    want = [{k: t.detach().numpy() for k, t in zip(("W", "b"), ts)} for ts in tensors]
    assert_params_close(got, want)

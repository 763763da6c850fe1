"""Models: deterministic, cut-invariant initialization, shapes, and the sequence backward."""
from __future__ import annotations

import numpy as np
import pytest

from hpdl.layers import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from hpdl.models import BUILDERS, backward, build_model, forward


@pytest.mark.parametrize("name", list(BUILDERS))
def test_init_is_deterministic_and_independent_of_the_cut(name):
    """The same seed gives the same weights, and initializing a slice gives that slice of the whole."""
    model = build_model(name)
    a, b = model.init(3), model.init(3)
    part = model.init(3, start=2, stop=5)
    for p, q in zip(a, b):
        for k in p:
            np.testing.assert_array_equal(p[k], q[k])
    for p, q in zip(a[2:5], part):
        for k in p:
            np.testing.assert_array_equal(p[k], q[k])
    assert any(not np.array_equal(a[i][k], model.init(4)[i][k]) for i in range(len(a)) for k in a[i])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_shapes_match_forward(name):
    """model.shapes() predicts every layer's output shape and the model maps images to 10 logits."""
    model = build_model(name)
    params = model.init(0)
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    shapes = model.shapes()
    for i, (layer, p) in enumerate(zip(model.layers, params)):
        x, _ = layer.forward(p, x)
        assert x.shape[1:] == shapes[i + 1]
    assert shapes[-1] == (10,) and x.dtype == np.float32


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_backward_without_dx_gives_the_same_gradients(name):
    """Skipping the input gradient of the first layer leaves every weight gradient unchanged."""
    model = build_model(name, dropout=0.0) if name == "cnn" else build_model(name)
    params = model.init(0, np, np.float64)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((4, 1, 28, 28)), rng.integers(0, 10, 4)
    logits, caches = forward(model.layers, params, x)
    _, cache = softmax_cross_entropy_forward(logits, y)
    dy = softmax_cross_entropy_backward(cache)
    seen = []
    dx_full, full = backward(model.layers, params, caches, dy)
    dx_none, fast = backward(model.layers, params, caches, dy, on_layer=lambda i, g: seen.append(i),
                             need_dx=False)
    assert dx_full.shape == x.shape and dx_none is None
    first = next(i for i, layer in enumerate(model.layers) if layer.trainable)
    assert seen == list(range(len(model.layers) - 1, first - 1, -1))  # stops at the first Linear/Conv2d
    for g, h in zip(full, fast):
        assert g.keys() == h.keys()
        for k in g:
            np.testing.assert_array_equal(g[k], h[k])


@pytest.mark.parametrize("name, options", [("mlp", {}), ("mlp", {"activation": "gelu"}), ("cnn", {"dropout": 0.0})])
def test_linear_activation_pairs_run_fused_with_the_layers_own_results(name, options):
    """forward runs each Linear+ReLU and Linear+GELU pair as one (Linear.forward_relu, forward_gelu)
    and gives, bit for bit, the output and the per-layer caches of the layers' forwards one by one,
    including a cut between the pair (a stage ending in a Linear)."""
    model = build_model(name, **options)
    params = model.init(0)
    x = np.random.default_rng(2).standard_normal((3, 1, 28, 28)).astype(np.float32)
    y, caches = forward(model.layers, params, x)
    one_by_one, h = [], x
    for layer, p in zip(model.layers, params):
        h, cache = layer.forward(p, h)
        one_by_one.append(cache)
    np.testing.assert_array_equal(y, h)
    assert len(caches) == len(one_by_one)
    for mine, theirs in zip(caches, one_by_one):
        _assert_same(mine, theirs)
    cut = next(i for i, layer in enumerate(model.layers) if type(layer).__name__ == "Linear") + 1
    head, head_caches = forward(model.layers[:cut], params[:cut], x)
    tail, _ = forward(model.layers[cut:], params[cut:], head, first=cut)
    np.testing.assert_array_equal(tail, y)
    assert len(head_caches) == cut


def _assert_same(a, b) -> None:
    """Equal caches: the same nesting of tuples, with equal arrays and values at the leaves."""
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        np.testing.assert_array_equal(a, b)


def test_unknown_model_and_bad_options_are_clear_errors():
    """A wrong name or option names the problem."""
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg")
    with pytest.raises(ValueError, match="bad options for model 'mlp'"):
        build_model("mlp", width=3)
    with pytest.raises(ValueError, match="activation 'tanh': choose one of relu, gelu"):
        build_model("mlp", activation="tanh")

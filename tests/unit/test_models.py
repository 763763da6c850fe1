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


def test_unknown_model_and_bad_options_are_clear_errors():
    """A wrong name or option names the problem."""
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg")
    with pytest.raises(ValueError, match="bad options for model 'mlp'"):
        build_model("mlp", width=3)

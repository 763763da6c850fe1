"""Residual block y = post(branch(x) + shortcut(x)), one layer of the flat model sequence."""
from __future__ import annotations

import math
from typing import Sequence

from ..backend import array_module
from .activation import ReLU
from .base import TRAIN, Layer, Mode, Params

# A sub-layer with the prefix of its parameter names and its index within the block's key.
Part = tuple[str, int, Layer]


def _sub(params: Params, tag: str) -> Params:
    """The sub-layer's own view of the block's parameters: "s0.W" -> "W" for tag "s0"."""
    prefix = tag + "."
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def _add(a, b):
    """a + b stored as a is: a CuPy ufunc writes a new result C-ordered, which would turn conv's
    batch-innermost activations around and cost a copy at the next BatchNorm or conv."""
    xp = array_module(a)
    return xp.add(a, b, out=xp.empty_like(a))


def _chain_forward(parts: list[Part], params: Params, x, mode: Mode):
    caches = []
    for tag, j, layer in parts:
        # Extending the key keeps two dropouts of one block from drawing the same mask.
        x, cache = layer.forward(_sub(params, tag), x, mode.child(j))
        caches.append(cache)
    return x, caches


def _chain_backward(parts: list[Part], params: Params, caches: list, dy, grads: dict):
    for (tag, _, layer), cache in zip(reversed(parts), reversed(caches)):
        dy, g = layer.backward(_sub(params, tag), cache, dy)
        grads.update({f"{tag}.{name}": v for name, v in g.items()})
    return dy


class Residual(Layer):
    """A residual block; its sub-layers' parameters are named "<i>.<name>" for the branch,
    "s<i>.<name>" for the shortcut (the identity when None) and "post.<name>" for post."""

    def __init__(self, branch: Sequence[Layer], shortcut: Sequence[Layer] | None = None,
                 post: Layer | None = ReLU()):   # a shared ReLU is safe: layers hold no arrays
        self.branch = list(branch)
        self.shortcut = list(shortcut or [])
        self.post = post

    def _branch(self) -> list[Part]:
        return [(str(i), i, layer) for i, layer in enumerate(self.branch)]

    def _shortcut(self) -> list[Part]:
        n = len(self.branch)
        return [(f"s{i}", n + i, layer) for i, layer in enumerate(self.shortcut)]

    def _post(self) -> list[Part]:
        return [] if self.post is None else [("post", len(self.branch) + len(self.shortcut), self.post)]

    def _parts(self) -> list[Part]:
        return self._branch() + self._shortcut() + self._post()

    @property
    def trainable(self) -> tuple[str, ...]:
        return tuple(f"{tag}.{name}" for tag, _, layer in self._parts() for name in layer.trainable)

    @property
    def no_decay(self) -> tuple[str, ...]:
        return tuple(f"{tag}.{name}" for tag, _, layer in self._parts() for name in layer.no_decay)

    @property
    def couples_rows(self) -> bool:
        return any(layer.couples_rows for _, _, layer in self._parts())

    def init(self, rng, xp, dtype):
        return {f"{tag}.{name}": a for tag, _, layer in self._parts()
                for name, a in layer.init(rng, xp, dtype).items()}

    def forward(self, params, x, mode: Mode = TRAIN):
        # x: (N, C_in, H, W) -> y: (N, C_out, Ho, Wo), the branch's output shape
        h, branch_caches = _chain_forward(self._branch(), params, x, mode)
        s, shortcut_caches = _chain_forward(self._shortcut(), params, x, mode)
        y, post_caches = _chain_forward(self._post(), params, _add(h, s), mode)
        return y, (branch_caches, shortcut_caches, post_caches)

    def backward(self, params, cache, dy):
        branch_caches, shortcut_caches, post_caches = cache
        grads: dict = {}
        dz = _chain_backward(self._post(), params, post_caches, dy, grads)
        dx_branch = _chain_backward(self._branch(), params, branch_caches, dz, grads)
        dx_shortcut = _chain_backward(self._shortcut(), params, shortcut_caches, dz, grads)
        return _add(dx_branch, dx_shortcut), grads

    def _chain_shapes(self, layers: list[Layer], in_shape):
        shapes = [in_shape]
        for layer in layers:
            shapes.append(layer.out_shape(shapes[-1]))
        return shapes

    def out_shape(self, in_shape):
        return self._chain_shapes(self.branch, in_shape)[-1]

    def flops(self, in_shape):
        total = 0
        for layers in (self.branch, self.shortcut):
            shapes = self._chain_shapes(layers, in_shape)
            total += sum(layer.flops(s) for layer, s in zip(layers, shapes))
        out = self.out_shape(in_shape)
        total += math.prod(out)   # the addition
        return total + (0 if self.post is None else self.post.flops(out))

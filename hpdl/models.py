"""Named architectures as flat layer sequences, and forward/backward over any slice of them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .layers import (GELU, BatchNorm, Conv2d, Flatten, GlobalAvgPool, Layer, Linear, MaxPool2d,
                     Mode, ReLU, Residual, Dropout, TRAIN)
from .layers.base import Params

IMAGE_SHAPE = (1, 28, 28)
N_CLASSES = 10


@dataclass
class Model:
    """A flat layer list; a pipeline stage is any contiguous slice of it."""

    name: str
    layers: list[Layer]
    in_shape: tuple[int, ...] = IMAGE_SHAPE

    def init(self, seed: int, xp=np, dtype=np.float32, start: int = 0, stop: int | None = None) -> list[Params]:
        """Parameters of layers[start:stop] (a pipeline stage initializes only its own)."""
        # Layer i draws from (seed, i) alone, so cutting the model never changes its weights.
        stop = len(self.layers) if stop is None else stop
        return [self.layers[i].init(np.random.default_rng((seed, i)), xp, dtype) for i in range(start, stop)]

    def shapes(self) -> list[tuple[int, ...]]:
        """Per-sample input shape of every layer, then the output shape."""
        shapes = [self.in_shape]
        for layer in self.layers:
            shapes.append(layer.out_shape(shapes[-1]))
        return shapes

    def flops(self) -> list[int]:
        """Forward FLOPs per sample of every layer."""
        return [layer.flops(s) for layer, s in zip(self.layers, self.shapes())]

    def n_params(self, params: Sequence[Params]) -> int:
        return sum(int(p[name].size) for layer, p in zip(self.layers, params)
                   for name in layer.trainable)


# The activations a Linear runs fused with, and how.
FUSED = {ReLU: Linear.forward_relu, GELU: Linear.forward_gelu}


def forward(layers: Sequence[Layer], params: Sequence[Params], x, mode: Mode = TRAIN, first: int = 0):
    """Run layers in order: x -> (y, caches), one cache per layer.

    `first` is the model index of layers[0]: a layer's random key holds its index in the
    whole model, so a pipeline stage draws the same dropout masks as one process. A Linear
    followed by a ReLU or a GELU runs as one step (Linear.forward_relu, forward_gelu: the bias
    add and the activation in one pass), with the same output and the same two caches.
    """
    caches: list = []
    i = 0
    while i < len(layers):
        fused = FUSED.get(type(layers[i + 1])) if type(layers[i]) is Linear and i + 1 < len(layers) else None
        if fused is not None:
            x, pair = fused(layers[i], params[i], x)
            caches += pair
            i += 2
            continue
        x, cache = layers[i].forward(params[i], x, mode.child(first + i))
        caches.append(cache)
        i += 1
    return x, caches


def backward(layers: Sequence[Layer], params: Sequence[Params], caches: list, dy,
             on_layer: Callable[[int, dict], None] | None = None, need_dx: bool = True):
    """Run layers in reverse: dy -> (dx, grads), one gradient dict per layer.

    `on_layer(i, grads_i)` is called as soon as layer i is done, so gradients can be
    accumulated or sent while the earlier layers still compute. Without `need_dx` (the
    model's first stage) backward stops at the first layer with parameters and skips its
    input gradient: dx is then None.
    """
    grads: list[dict] = [{} for _ in layers]
    first = next((i for i, layer in enumerate(layers) if layer.trainable), len(layers)) if not need_dx else 0
    for i in reversed(range(first, len(layers))):
        if i == first and not need_dx:
            grads[i], dy = layers[i].param_grads(params[i], caches[i], dy), None
        else:
            dy, grads[i] = layers[i].backward(params[i], caches[i], dy)
        if on_layer is not None:
            on_layer(i, grads[i])
    return (dy if need_dx else None), grads


ACTIVATIONS = {"relu": ReLU, "gelu": GELU}


def mlp(hidden: Sequence[int] = (1024, 1024), dropout: float = 0.0, activation: str = "relu") -> list[Layer]:
    """`activation`: after each hidden Linear, relu or gelu."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
    layers: list[Layer] = [Flatten()]
    n_in = int(np.prod(IMAGE_SHAPE))
    for n in hidden:
        layers += [Linear(n_in, n), ACTIVATIONS[activation]()]
        if dropout:
            layers.append(Dropout(dropout))
        n_in = n
    return layers + [Linear(n_in, N_CLASSES)]


def cnn(channels: Sequence[int] = (32, 64), hidden: int = 128, dropout: float = 0.5,
        winograd: bool | None = None) -> list[Layer]:
    """`winograd`: force the convolutions' Winograd path on or off (None: Conv2d's choice)."""
    layers: list[Layer] = []
    c_in, size = IMAGE_SHAPE[0], IMAGE_SHAPE[1]
    for c in channels:
        layers += [Conv2d(c_in, c, 3, pad=1, winograd=winograd), ReLU(), MaxPool2d(2)]
        c_in, size = c, size // 2
    layers += [Flatten(), Linear(c_in * size * size, hidden), ReLU()]
    if dropout:
        layers.append(Dropout(dropout))
    return layers + [Linear(hidden, N_CLASSES)]


def basic_block(c_in: int, c_out: int, stride: int) -> Residual:
    # No conv bias before a BatchNorm: its mean subtraction would cancel it.
    branch = [Conv2d(c_in, c_out, 3, stride=stride, pad=1, bias=False), BatchNorm(c_out), ReLU(),
              Conv2d(c_out, c_out, 3, pad=1, bias=False), BatchNorm(c_out)]
    shortcut = None
    if stride != 1 or c_in != c_out:
        shortcut = [Conv2d(c_in, c_out, 1, stride=stride, bias=False), BatchNorm(c_out)]
    return Residual(branch, shortcut)


def resnet(channels: Sequence[int] = (16, 32, 64), blocks: int = 1) -> list[Layer]:
    layers: list[Layer] = [Conv2d(IMAGE_SHAPE[0], channels[0], 3, pad=1, bias=False), BatchNorm(channels[0]), ReLU()]
    c_in = channels[0]
    for stage, c in enumerate(channels):
        for b in range(blocks):
            layers.append(basic_block(c_in, c, 2 if stage > 0 and b == 0 else 1))
            c_in = c
    return layers + [GlobalAvgPool(), Linear(c_in, N_CLASSES)]


BUILDERS: dict[str, Callable[..., list[Layer]]] = {"mlp": mlp, "cnn": cnn, "resnet": resnet}
# Base learning rate of SGD with momentum 0.9 at batch 128 (benchmarks/reports/accuracy.md):
# the conv net needs a smaller step than the MLP to generalize as well.
DEFAULT_LR: dict[str, float] = {"mlp": 0.05, "cnn": 0.02, "resnet": 0.05}


def build_model(name: str, **options) -> Model:
    """The named architecture; `options` are its builder's keyword arguments."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(BUILDERS)}")
    try:
        layers = BUILDERS[name](**options)
    except TypeError as e:
        raise ValueError(f"bad options for model {name!r}: {e}") from None
    return Model(name, layers)

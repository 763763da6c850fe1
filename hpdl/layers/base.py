"""The layer contract: a stateless description with a pure forward/backward pair."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

Params = dict[str, Any]   # name -> xp array; trainable ones are listed in Layer.trainable
Cache = Any               # whatever backward needs, written by forward


@dataclass(frozen=True)
class Mode:
    """How a forward pass runs: training or evaluation, and the dropout key.

    `key` is a tuple of ints (seed, step, micro-batch, ...) from which a layer draws its
    randomness; a pipeline stage and a single process that pass the same key draw the
    same dropout masks. `rows` is (first row, rows of the whole batch) when x holds one
    block of a batch split over threads; a layer then draws its block of the whole batch's
    randomness, so splitting changes no mask.
    """

    train: bool = True
    key: tuple[int, ...] = (0,)
    rows: tuple[int, int] | None = None

    def child(self, i: int) -> Mode:
        """The mode of sub-layer i: its own key, the same rows."""
        return replace(self, key=self.key + (i,))


TRAIN = Mode(train=True)
EVAL = Mode(train=False)


class Layer:
    """One layer: hyper-parameters only, never arrays.

    forward(params, x, mode) -> (y, cache)
    backward(params, cache, dy) -> (dx, grads)   grads has one entry per trainable name
    param_grads(params, cache, dy) -> grads      the same grads, skipping dx where that saves work
    init(rng, xp, dtype) -> params               all arrays, trainable and buffers
    out_shape(in_shape) -> shape                 per-sample shapes, no batch axis
    flops(in_shape) -> int                       forward multiply-adds x 2, per sample

    Buffers (BatchNorm running statistics) live in params but not in `trainable`;
    forward in training mode is the one place that updates them, and backward never
    reads them.
    """

    trainable: tuple[str, ...] = ()
    # True where an optimizer's weight decay and LARS/LAMB trust ratios should skip the
    # tensor (biases, normalization scales and shifts).
    no_decay: tuple[str, ...] = ()
    # True where a sample's output depends on the other rows of its batch (batch statistics),
    # which rules out splitting a batch over threads.
    couples_rows: bool = False

    def init(self, rng: np.random.Generator, xp, dtype) -> Params:
        return {}

    def forward(self, params: Params, x, mode: Mode = TRAIN):
        raise NotImplementedError

    def backward(self, params: Params, cache: Cache, dy):
        raise NotImplementedError

    def param_grads(self, params: Params, cache: Cache, dy) -> dict:
        """The weight gradients alone, for the first layer of a model, whose dx nobody reads."""
        return self.backward(params, cache, dy)[1]

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return in_shape

    def flops(self, in_shape: tuple[int, ...]) -> int:
        return 0

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"

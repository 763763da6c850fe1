"""NaN and Inf in an update: one pass per step to detect them, the layers named only when one fires."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .backend import array_module
from .kernels import any_nonfinite
from .layers.base import Layer

POLICIES = ("stop", "skip")  # what an update with a NaN or Inf gradient does (Config.on_nonfinite)


class NonFiniteError(RuntimeError):
    """A NaN or Inf gradient or learning rate stopped the run; the message names the step and layers."""


def nonfinite_layers(layers: Sequence[Layer], grads: Sequence[dict[str, Any]],
                     rates: Sequence[float], first: int = 0, check_gradients: bool = True) -> list[str]:
    """Each layer whose gradient holds a NaN or Inf, or whose learning rate is one, described; [] if none.

    Layers are named by their index in the model: `first` is that of layers[0]. Without
    `check_gradients` (the caller has found them finite already) only the rates are checked.

    While everything is finite this costs one pass over the gradients (one kernel launch on
    the GPU, kernels.any_nonfinite) and one value read back. Only when that finds something
    are the tensors scanned one by one, to name the layers.
    """
    tensors = [g for layer_grads in grads for g in layer_grads.values()] if check_gradients else []
    finite = True
    if tensors:
        flag = array_module(tensors[0]).zeros(1, dtype=np.float32)
        any_nonfinite(tensors, flag)
        finite = not flag[0]
    if finite and all(math.isfinite(r) for r in rates):
        return []
    found = []
    for i, (layer, layer_grads, rate) in enumerate(zip(layers, grads, rates), start=first):
        names = [name for name, g in layer_grads.items() if not bool(array_module(g).isfinite(g).all())]
        if names:
            found.append(f"layer {i} {type(layer).__name__} (gradient of {', '.join(names)})")
        elif layer_grads and not math.isfinite(rate):
            found.append(f"layer {i} {type(layer).__name__} (learning rate {rate})")
    return found


def describe(step: int, found: Sequence[str]) -> str:
    """The one line that reports a non-finite update."""
    return f"non-finite update at step {step}: NaN or Inf in {'; '.join(found)}"

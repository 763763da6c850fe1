"""LARS: SGD momentum with a per-tensor trust ratio (You et al. 2017; MXNet's optimizer/lars.py)."""
from __future__ import annotations

import math
from collections.abc import Sequence

from ..backend import array_module
from ..layers.base import Layer
from .sgd import SGD


def norm(a) -> float:
    """The Euclidean norm of a tensor, as a host float."""
    return float(array_module(a).linalg.norm(a.ravel()))


def trust_ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or 1 where that is 0, infinite or NaN (a zero tensor, a zero update)."""
    if numerator > 0.0 and denominator > 0.0 and math.isfinite(ratio := numerator / denominator):
        return ratio
    return 1.0


def adapted(optimizer) -> set[str]:
    """State keys of the tensors that get a trust ratio: all but bias and normalization ones (`no_decay`)."""
    return {key for i, name, key, _ in optimizer._tensors if name not in optimizer.layers[i].no_decay}


class LARS(SGD):
    """Per tensor, with trust coefficient eta:

        local = eta ||w|| / (||g|| + wd ||w|| + eps)   (1 for bias and normalization tensors)
        b = mu b + lr local (g + wd w);  w -= b

    The learning rate sits inside the momentum buffer, as in You et al.'s Algorithm 1,
    so a change of the local rate does not rescale the velocity already accumulated.
    Bias and normalization tensors (the layers' `no_decay` names) keep local = 1 and no decay.
    """

    def __init__(self, layers: Sequence[Layer], momentum: float = 0.9, eta: float = 0.001,
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 lr_scale: Sequence[float] | None = None, wd_scale: Sequence[float] | None = None):
        if not eta > 0.0:
            raise ValueError(f"LARS trust coefficient must be positive, got {eta}")
        super().__init__(layers, momentum, False, weight_decay, lr_scale, wd_scale)
        self.eta, self.eps = float(eta), float(eps)
        self._adapted = adapted(self)
        self.trust: dict[str, float] = {}  # the last step's trust ratio of each adapted tensor, by state key

    def _update(self, key: str, w, g, lr: float, wd: float) -> None:
        if key in self._adapted:
            w_norm = norm(w)
            self.trust[key] = trust_ratio(self.eta * w_norm, norm(g) + wd * w_norm + self.eps)
            lr *= self.trust[key]
        d = w * wd if wd else g.copy()  # a fresh array: the caller's gradient is only read
        if wd:
            d += g
        d *= lr
        w -= self._momentum(f"{key}/momentum", w, d) if self.momentum else d

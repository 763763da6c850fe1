"""LARS: SGD momentum with a per-tensor trust ratio (You et al. 2017; MXNet's optimizer/lars.py)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..backend import to_host
from ..kernels import sgd_update, sum_squares
from ..layers.base import Layer
from .sgd import SGD


def pair_norms(pairs: Sequence[tuple]) -> np.ndarray:
    """(len(pairs), 2): the Euclidean norms of each pair's two tensors, as host floats.

    All of them come from one sum_squares pass (two kernel launches on the GPU) and one
    read back to the host, instead of a host round trip per tensor.
    """
    if not pairs:
        return np.zeros((0, 2))
    squares = to_host(sum_squares([t for pair in pairs for t in pair]))
    return np.sqrt(squares.astype(np.float64)).reshape(-1, 2)


def trust_ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or 1 where that is 0, infinite or NaN (a zero tensor, a zero update)."""
    if numerator > 0.0 and denominator > 0.0 and math.isfinite(ratio := float(numerator / denominator)):
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

    halts = False  # its trust ratios read the device back every step: a host check costs no more

    def __init__(self, layers: Sequence[Layer], momentum: float = 0.9, eta: float = 0.001,
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 lr_scale: Sequence[float] | None = None, wd_scale: Sequence[float] | None = None):
        if not eta > 0.0:
            raise ValueError(f"LARS trust coefficient must be positive, got {eta}")
        super().__init__(layers, momentum, False, weight_decay, lr_scale, wd_scale)
        self.eta, self.eps = float(eta), float(eps)
        self._adapted = adapted(self)
        self.trust: dict[str, float] = {}  # the last step's trust ratio of each adapted tensor, by state key

    def _update_all(self, params, grads, rates) -> None:
        ws, gs, lrs, wds = self._columns(params, grads, rates)
        keys = [key for _, _, key, _ in self._tensors]
        adapted = [(key, w, g) for key, w, g in zip(keys, ws, gs) if key in self._adapted]
        norms = dict(zip((key for key, *_ in adapted), pair_norms([(w, g) for _, w, g in adapted])))
        steps = [self._step(key, w, g, lr, wd, norms.get(key)) for key, w, g, lr, wd in zip(keys, ws, gs, lrs, wds)]
        bufs, firsts = self._momentum_buffers(ws) if self.momentum else (None, None)
        # b = mu b + d; w -= b: SGD's update of direction d at rate 1 without decay (its kernel on the GPU).
        sgd_update(ws, steps, [1.0] * len(ws), [0.0] * len(ws), self.momentum, False, bufs, firsts)

    def _step(self, key: str, w, g, lr: float, wd: float, norms):
        """d = lr local (g + wd w), a fresh array (the caller's gradient is only read); norms:
        this step's (||w||, ||g||) for a tensor with a trust ratio, else None."""
        if norms is not None:
            w_norm, g_norm = norms
            self.trust[key] = trust_ratio(self.eta * w_norm, g_norm + wd * w_norm + self.eps)
            lr *= self.trust[key]
        d = w * wd if wd else g.copy()
        if wd:
            d += g
        d *= lr
        return d

"""LAMB: Adam moments with a per-tensor trust ratio (You et al. 2019; MXNet's optimizer/lamb.py)."""
from __future__ import annotations

import math
from collections.abc import Sequence

from ..backend import array_module
from ..layers.base import Layer
from .base import Optimizer
from .lars import adapted, pair_norms, trust_ratio


class LAMB(Optimizer):
    """Per tensor at step t:

        m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  m^ = m / (1-b1^t);  v^ = v / (1-b2^t)
        r = m^ / (sqrt(v^) + eps) + wd w;  w -= lr ||w|| / ||r|| r

    with the trust ratio ||w|| / ||r|| taken as 1 where it is 0 or undefined, and for bias
    and normalization tensors (the layers' `no_decay` names, which also get no decay).
    """

    slots = ("exp_avg", "exp_avg_sq")

    def __init__(self, layers: Sequence[Layer], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0,
                 lr_scale: Sequence[float] | None = None, wd_scale: Sequence[float] | None = None):
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if eps <= 0.0:
            raise ValueError(f"eps must be positive, got {eps}")
        super().__init__(layers, weight_decay, lr_scale, wd_scale)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self._adapted = adapted(self)
        self.trust: dict[str, float] = {}  # the last step's trust ratio of each adapted tensor, by state key

    def _update_all(self, params, grads, rates) -> None:
        # Every direction first, so that all trust ratios come from one pass and one host read.
        steps = [(key, params[i][name], self._direction(key, params[i][name], grads[i][name], wd), rates[i])
                 for i, name, key, wd in self._tensors]
        norms = iter(pair_norms([(w, r) for key, w, r, _ in steps if key in self._adapted]))
        for key, w, r, lr in steps:
            if key in self._adapted:
                self.trust[key] = trust_ratio(*next(norms))
                lr *= self.trust[key]
            r *= lr
            w -= r

    def _direction(self, key: str, w, g, wd: float):
        """r = m^ / (sqrt(v^) + eps) + wd w, after folding g into the moments."""
        xp = array_module(w)
        b1, b2 = self.betas
        m = self._zeros(f"{key}/exp_avg", w)
        v = self._zeros(f"{key}/exp_avg_sq", w)
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        r = xp.sqrt(v)
        r /= math.sqrt(1.0 - b2 ** self.steps)
        r += self.eps
        xp.divide(m, r, out=r)
        r /= 1.0 - b1 ** self.steps
        if wd:
            r += wd * w
        return r

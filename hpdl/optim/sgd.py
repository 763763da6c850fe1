"""SGD with optional (Nesterov) momentum and L2 weight decay, as torch.optim.SGD."""
from __future__ import annotations

from collections.abc import Sequence

from ..layers.base import Layer
from .base import Optimizer


class SGD(Optimizer):
    """torch.optim.SGD without dampening, per tensor:

        d = g + wd w;  b = mu b + d  (b = d on the first step);
        d = d + mu b  (Nesterov)  or  d = b;  w -= lr d
    """

    def __init__(self, layers: Sequence[Layer], momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, lr_scale: Sequence[float] | None = None,
                 wd_scale: Sequence[float] | None = None):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0.0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        super().__init__(layers, weight_decay, lr_scale, wd_scale)
        self.momentum = float(momentum)
        self.nesterov = nesterov
        self.slots = ("momentum",) if momentum else ()

    def _update(self, key: str, w, g, lr: float, wd: float) -> None:
        d = g
        if wd:
            d = w * wd  # a fresh array, so that the caller's gradient is never written
            d += g
        if self.momentum:
            buf = self._momentum(f"{key}/momentum", w, d)
            if self.nesterov:
                nesterov = buf * self.momentum
                nesterov += d
                d = nesterov
            else:
                d = buf
        w -= lr * d

    def _momentum(self, key: str, w, d):
        """The momentum buffer after folding in the step direction `d`."""
        buf = self._buffer(key, w)
        if buf is None:
            buf = self.state[key] = d.copy()
        else:
            buf *= self.momentum
            buf += d
        return buf

"""SGD with optional (Nesterov) momentum and L2 weight decay, as torch.optim.SGD."""
from __future__ import annotations

from collections.abc import Sequence

from ..backend import array_module
from ..kernels import sgd_update
from ..layers.base import Layer
from .base import Optimizer


class SGD(Optimizer):
    """torch.optim.SGD without dampening, per tensor:

        d = g + wd w;  b = mu b + d  (b = d on the first step);
        d = d + mu b  (Nesterov)  or  d = b;  w -= lr d
    """

    halts = True

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

    def _update_all(self, params, grads, rates) -> None:
        # One fused kernel launch for every tensor on the GPU (kernels/optim_update.cu), its
        # NumPy oracle elsewhere.
        ws, gs, lrs, wds = self._columns(params, grads, rates)
        bufs, firsts = self._momentum_buffers(ws) if self.momentum else (None, None)
        sgd_update(ws, gs, lrs, wds, self.momentum, self.nesterov, bufs, firsts, self._halt)

    def _momentum_buffers(self, ws) -> tuple[list, list[bool]]:
        """(buffers, firsts): each tensor's momentum buffer, and whether this is its first step
        (the update then overwrites it; zeros until then, so a halted first update leaves a
        valid buffer)."""
        bufs, firsts = [], []
        for (_, _, key, _), w in zip(self._tensors, ws):
            buf = self._buffer(f"{key}/momentum", w)
            firsts.append(buf is None)
            if buf is None:
                buf = self.state[f"{key}/momentum"] = array_module(w).zeros_like(w)
            bufs.append(buf)
        return bufs, firsts

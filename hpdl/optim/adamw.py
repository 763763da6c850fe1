"""AdamW: Adam with decoupled weight decay and bias correction, as torch.optim.AdamW."""
from __future__ import annotations

from collections.abc import Sequence

from ..kernels import adamw_update
from ..layers.base import Layer
from .base import Optimizer


class AdamW(Optimizer):
    """torch.optim.AdamW (no amsgrad), per tensor at step t:

        w *= 1 - lr wd;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
        w -= lr / (1-b1^t) * m / (sqrt(v) / sqrt(1-b2^t) + eps)
    """

    slots = ("exp_avg", "exp_avg_sq")
    halts = True

    def __init__(self, layers: Sequence[Layer], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01,
                 lr_scale: Sequence[float] | None = None,
                 wd_scale: Sequence[float] | None = None):
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if eps <= 0.0:
            raise ValueError(f"eps must be positive, got {eps}")
        super().__init__(layers, weight_decay, lr_scale, wd_scale)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)

    def _update_all(self, params, grads, rates) -> None:
        # One fused kernel launch for every tensor on the GPU (kernels/optim_update.cu), its
        # NumPy oracle elsewhere.
        ws, gs, lrs, wds = self._columns(params, grads, rates)
        keys = [key for _, _, key, _ in self._tensors]
        adamw_update(ws, gs, [self._zeros(f"{key}/exp_avg", w) for key, w in zip(keys, ws)],
                     [self._zeros(f"{key}/exp_avg_sq", w) for key, w in zip(keys, ws)],
                     lrs, self.steps, wds, self.betas, self.eps, self._halt)

"""Dynamic loss scaling for fp16 gradients (--precision fp16), around an optimizer's step."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..nonfinite import nonfinite_layers

SCALER_STATE = "loss_scale/"  # prefix of the loss scaler's state among the optimizer's in checkpoints

# The dynamic scheme of Micikevicius et al. 2018 (Mixed Precision Training), with the defaults of NVIDIA's
# mixed-precision guide and TensorFlow's DynamicLossScale: start at 2^15, about half float16's largest
# value, since a scale too high is lowered in a few steps while one too low takes thousands to rise;
# halve and skip the update on an overflow; double after 2000 consecutive clean updates.
INITIAL_SCALE = 2.0 ** 15
GROWTH_INTERVAL = 2000
FACTOR = 2.0
# At scale 1 the gradients themselves do not fit float16: no lower scale is the remedy, so such an
# update goes to the optimizer's --on-nonfinite policy like any other NaN or Inf.
MIN_SCALE = 1.0


class LossScaler:
    """Dynamic loss scaling for fp16 gradients, with fp32 master weights.

    The loss gradient is multiplied by `scale` (a power of two, so scaling and unscaling
    are exact), which lifts small gradients out of float16's subnormal range; the summed
    gradients are divided by it again before the update. An update whose gradients hold an
    inf or NaN (a float16 operand overflowed) is skipped, like --on-nonfinite skip, and
    the scale halved; after `interval` clean updates in a row it doubles.

    State (`state_dict`): the scale, the clean updates since it last changed, and the number
    of overflow skips; it rides in the optimizer's checkpoint under SCALER_STATE.
    """

    def __init__(self, scale: float | None = None, interval: int | None = None):
        self.scale = float(INITIAL_SCALE if scale is None else scale)
        self.interval = GROWTH_INTERVAL if interval is None else interval
        self.clean = 0
        self.overflows = 0

    def unscale(self, grads: Sequence[dict[str, Any]], stats=None) -> None:
        """Divide gradients computed with loss x scale by the scale, in place; `stats` holds squared
        gradient norms (Flat.stats), divided by scale^2."""
        inverse = 1.0 / self.scale
        for layer_grads in grads:
            for g in layer_grads.values():
                g *= inverse
        if stats is not None:
            stats *= inverse * inverse

    def step(self, optimizer, params: list[dict[str, Any]], grads: Sequence[dict[str, Any]], lr) -> bool:
        """`optimizer.step` on unscaled gradients, unless they overflowed: then the update is skipped
        (counted in the optimizer's `skipped`, so its step numbers stay the caller's) and the scale
        halved. Returns whether the update was applied."""
        n = len(optimizer.layers)
        # The learning rate is not checked here: a NaN rate is no overflow, the optimizer reports it.
        # Gradients found finite here are not checked again by the optimizer.
        checked = self.scale > MIN_SCALE
        if checked and nonfinite_layers(optimizer.layers, grads, [0.0] * n):
            self.scale = max(self.scale / FACTOR, MIN_SCALE)
            self.clean = 0
            self.overflows += 1
            optimizer.skipped += 1
            return False
        skipped = optimizer.skipped
        optimizer.step(params, grads, lr, gradients_checked=checked)
        if optimizer.skipped != skipped:  # at MIN_SCALE, under --on-nonfinite skip
            return False
        self.clean += 1
        if self.clean >= self.interval:
            self.scale *= FACTOR
            self.clean = 0
        return True

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"scale": np.array(self.scale, dtype=np.float64), "clean": np.array(self.clean, dtype=np.int64),
                "overflows": np.array(self.overflows, dtype=np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore a `state_dict`; ValueError if it is not one."""
        if set(state) != {"scale", "clean", "overflows"}:
            raise ValueError(f"loss scaler state has keys {sorted(state)}, expected clean, overflows, scale")
        scale, clean, overflows = float(state["scale"]), int(state["clean"]), int(state["overflows"])
        if not (math.isfinite(scale) and scale >= MIN_SCALE) or clean < 0 or overflows < 0:
            raise ValueError(f"loss scaler state out of range: scale {scale}, clean {clean}, overflows {overflows}")
        self.scale, self.clean, self.overflows = scale, clean, overflows

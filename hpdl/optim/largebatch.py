"""Large-batch learning-rate methods: linear scaling, AdaScale's gain ratio, and LENA's per-layer one.

An update averages S micro-batch gradients g^(i) (S = replicas x accumulation steps).
The gain ratio of a group of tensors compares their mean squared norm with the squared
norm of their mean (ALGORITHMS.md section 9):

    top = (1/S) sum_i ||g^(i)||^2,   bot = ||(1/S) sum_i g^(i)||^2,   r = (top + 1e-6) / (bot + 1e-6)

r is 1 when the S gradients agree and S when they are uncorrelated noise, so r x base_lr
is how far the averaged gradient can be trusted beyond a single micro-batch's. top and
bot are each smoothed by an exponential moving average with weight min(S/1000, 1) on the
new value (AdaScale's theta = 1 - S/1000), or a weight the user chooses. With S = 1 there
is no spread to measure and r is 1 by definition: every method below then reduces to
plain SGD on the base schedule.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..backend import to_host
from ..kernels import sum_squares
from ..layers.base import Layer
from .loss_scale import SCALER_STATE, LossScaler
from .schedules import Schedule, make_schedule

EPS = 1e-6
LR_STATE = "lr_method/"  # prefix of a method's state among the optimizer's in checkpoints
METHODS = ("none", "lsw", "lars", "lamb", "adascale", "lena")
GAIN_METHODS = ("adascale", "lena")  # these need the micro-batch squared norms


def squared_norms(layers: Sequence[Layer], grads: Sequence[dict]) -> np.ndarray:
    """Per layer, the squared Euclidean norm of all its trainable gradients together.

    One sum_squares pass over every tensor (two launches on the GPU), one read back to the host.
    """
    tensors = [g[name] for layer, g in zip(layers, grads) for name in layer.trainable]
    squares = to_host(sum_squares(tensors)).astype(np.float64) if tensors else np.zeros(0)
    ends = np.cumsum([len(layer.trainable) for layer in layers])
    return np.array([squares[end - len(layer.trainable):end].sum() for layer, end in zip(layers, ends)])


class GainRatio:
    """Smoothed top and bot of one or more tensor groups, and their ratio capped at S."""

    def __init__(self, micro_batches: int, groups: int, smoothing: float = 0.0):
        self.S = micro_batches
        self.theta = smoothing or min(micro_batches / 1000.0, 1.0)
        self.top = np.zeros(groups)
        self.bot = np.zeros(groups)
        self.seen = False

    def update(self, top: np.ndarray, bot: np.ndarray) -> np.ndarray:
        """Fold in one update's top and bot; the smoothed ratio of each group, in [1/.., S]."""
        if self.S == 1:
            return np.ones_like(self.top)
        # A NaN would stay in the averages for good: the optimizer stops or skips such an update.
        if np.isfinite(top).all() and np.isfinite(bot).all():
            if self.seen:
                self.top += self.theta * (top - self.top)
                self.bot += self.theta * (bot - self.bot)
            else:  # the first observation starts the average
                self.top[...], self.bot[...] = top, bot
                self.seen = True
        return np.minimum((self.top + EPS) / (self.bot + EPS), self.S)


class LRMethod:
    """Per-layer learning rates of successive updates (one call per update).

    `rates(grads, micro_sq)` gets the averaged gradient of the update (per-layer dicts)
    and, for the gain methods, each layer's sum over the S micro-batches of
    ||g_l^(i)||^2; it returns one learning rate per layer and keeps them, with the gain
    ratios, in `last` for the metrics file.
    """

    needs_micro_norms = False

    def __init__(self, layers: Sequence[Layer], schedule: Schedule, micro_batches: int):
        self.layers, self.schedule, self.S = list(layers), schedule, micro_batches
        self.t = 0
        self.last: dict[str, list[float]] = {}

    def rates(self, grads: Sequence[dict], micro_sq: np.ndarray | None) -> list[float]:
        lr = self.schedule(self.t)
        self.t += 1
        self.last = {"lr": [lr] * len(self.layers)}
        return self.last["lr"]

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"t": np.array(self.t, dtype=np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.t = int(state["t"])


def pack_state(optimizer, method: LRMethod | None, scaler: LossScaler | None = None) -> dict[str, np.ndarray]:
    """The optimizer's state with the learning-rate method's (under LR_STATE) and the fp16 loss
    scaler's (under SCALER_STATE) beside it, for checkpoints."""
    state = optimizer.state_dict()
    if method is not None:
        state |= {LR_STATE + k: v for k, v in method.state_dict().items()}
    if scaler is not None:
        state |= {SCALER_STATE + k: v for k, v in scaler.state_dict().items()}
    return state


def restore_state(optimizer, method: LRMethod | None, state: dict[str, np.ndarray], step: int,
                  scaler: LossScaler | None = None) -> None:
    """Undo pack_state. A checkpoint without method state (a run without --lr-method) starts the
    method afresh at `step`, one without scaler state (a run in fp32 or tf32) the scaler at its
    initial scale; a scaler's state is ignored by a run without one. State that does not fit raises
    ValueError."""
    optimizer.load_state_dict({k: v for k, v in state.items() if not k.startswith((LR_STATE, SCALER_STATE))})
    scaled = {k[len(SCALER_STATE):]: v for k, v in state.items() if k.startswith(SCALER_STATE)}
    if scaler is not None and scaled:
        scaler.load_state_dict(scaled)
    if method is None:
        return
    mine = {k[len(LR_STATE):]: v for k, v in state.items() if k.startswith(LR_STATE)}
    if not mine:
        method.t = step
        return
    try:
        method.load_state_dict(mine)
    except (KeyError, ValueError) as e:
        raise ValueError(f"learning-rate method state does not fit {type(method).__name__}: {e}") from None


class AdaScale(LRMethod):
    """lr = r x base_lr(t), one gain ratio r over the whole model (Johnson et al. 2020)."""

    needs_micro_norms = True

    def __init__(self, layers, schedule, micro_batches, smoothing: float = 0.0):
        super().__init__(layers, schedule, micro_batches)
        self.gain = GainRatio(micro_batches, 1, smoothing)

    def rates(self, grads, micro_sq):
        top, bot = layer_top_bot(self.layers, grads, micro_sq, self.S)
        r = float(self.gain.update(np.array([top.sum()]), np.array([bot.sum()]))[0])
        lr = r * self.schedule(self.t)
        self.t += 1
        self.last = {"lr": [lr] * len(self.layers), "gain": [r] * len(self.layers)}
        return self.last["lr"]

    def state_dict(self):
        return {**super().state_dict(), **gain_state(self.gain)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        load_gain(self.gain, state)


class LENA(LRMethod):
    """Layer-wise gain ratios and a state-aware warm-up per layer (Ko, Lee, Kim, WWW 2022).

        scale_l = min(r_l, S);  lr_l = scale_l x base_lr x decay(t) x min(1, progress_l / W)
        progress_l += scale_l, or the whole model's gain ratio where scale_l hit the cap

    so a layer whose gradients agree across micro-batches is neither scaled up nor
    warmed up fast, while a noisy one takes larger and earlier steps. The schedule passed
    in is decay(t) without warm-up; W = warmup_steps (0: no warm-up).
    """

    needs_micro_norms = True

    def __init__(self, layers, schedule, micro_batches, warmup_steps: int = 0, smoothing: float = 0.0):
        super().__init__(layers, schedule, micro_batches)
        self.warmup = warmup_steps
        self.gain = GainRatio(micro_batches, len(self.layers), smoothing)
        self.whole = GainRatio(micro_batches, 1, smoothing)
        self.progress = np.zeros(len(self.layers))

    def rates(self, grads, micro_sq):
        top, bot = layer_top_bot(self.layers, grads, micro_sq, self.S)
        scale = self.gain.update(top, bot)
        whole = float(self.whole.update(np.array([top.sum()]), np.array([bot.sum()]))[0])
        warm = np.minimum(self.progress / self.warmup, 1.0) if self.warmup else np.ones_like(scale)
        lr = scale * warm * self.schedule(self.t)
        self.progress += np.where(scale >= self.S, whole, scale)
        self.t += 1
        self.last = {"lr": lr.tolist(), "gain": scale.tolist()}
        return self.last["lr"]

    def state_dict(self):
        return {**super().state_dict(), **gain_state(self.gain), **gain_state(self.whole, "whole_"),
                "progress": self.progress.copy()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        load_gain(self.gain, state)
        load_gain(self.whole, state, "whole_")
        self.progress[...] = state["progress"]


def layer_top_bot(layers, grads, micro_sq, S: int) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the mean micro-batch squared norm and the averaged gradient's squared norm, on
    the host (micro_sq, summed on the device by Flat.accumulate, is read back here)."""
    bot = squared_norms(layers, grads)
    return (to_host(micro_sq) / S if S > 1 else bot), bot


def gain_state(gain: GainRatio, prefix: str = "") -> dict[str, np.ndarray]:
    return {f"{prefix}top": gain.top.copy(), f"{prefix}bot": gain.bot.copy(),
            f"{prefix}seen": np.array(gain.seen)}


def load_gain(gain: GainRatio, state: dict, prefix: str = "") -> None:
    gain.top[...], gain.bot[...] = state[f"{prefix}top"], state[f"{prefix}bot"]
    gain.seen = bool(state[f"{prefix}seen"])


def make_lr_method(method: str, layers: Sequence[Layer], base_lr: float, schedule: str, total_steps: int,
                   micro_batches: int, warmup_steps: int = 0, smoothing: float = 0.0) -> LRMethod:
    """The learning-rate method `method` for updates averaging `micro_batches` micro-batch gradients.

    lsw and lars scale base_lr by S, lamb by sqrt(S) (You et al. 2019), each ramped up
    linearly from base_lr over warmup_steps (Goyal et al. 2017); adascale and none keep
    the base schedule with its warm-up; lena warms each layer up itself. `smoothing` is
    the gain ratios' moving-average weight on new values (0: S/1000).
    """
    S = micro_batches

    def sched(lr: float, warm: int, start: float = 0.0) -> Schedule:
        return make_schedule(schedule, lr, total_steps, warmup_steps=warm, warmup_start=start)

    if method in ("lsw", "lars"):
        return LRMethod(layers, sched(base_lr * S, warmup_steps, 1.0 / S), S)
    if method == "lamb":
        return LRMethod(layers, sched(base_lr * math.sqrt(S), warmup_steps, 1.0 / math.sqrt(S)), S)
    if method == "adascale":
        return AdaScale(layers, sched(base_lr, warmup_steps), S, smoothing)
    if method == "lena":
        return LENA(layers, sched(base_lr, 0), S, warmup_steps, smoothing)
    if method == "none":
        return LRMethod(layers, sched(base_lr, warmup_steps), S)
    raise ValueError(f"unknown learning-rate method {method!r}; choose one of {', '.join(METHODS)}")

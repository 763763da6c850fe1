"""Optimizer base: one parameter group per layer, lazily created state, flat state names."""
from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backend import array_module, on_device, to_host
from ..kernels import any_nonfinite, record_refusal
from ..layers.base import Layer, Params
from ..nonfinite import POLICIES, NonFiniteError, describe, nonfinite_layers

Rate = float | Sequence[float]  # one learning rate for every layer, or one per layer


class Optimizer:
    """Applies an update rule in place to every trainable tensor of a list of layers.

    Each layer is one parameter group: its learning rate is lr[i] * lr_scale[i] and its
    weight decay weight_decay * wd_scale[i], except that the layer's `no_decay` names get
    no decay at all. Subclasses name their per-tensor buffers in `slots` and implement
    `_update_all`; state lives under flat keys "layer/name/slot", plus the counter "step"
    (and "skipped", once an update has been skipped).

    A step whose gradients or learning rates hold a NaN or Inf is never applied: with
    `on_nonfinite` "stop" (the default) it raises NonFiniteError naming the step and the
    layers, with "skip" it leaves parameters and state as they were, counts the step in
    `skipped` and prints a warning line naming them.

    Deciding that on the host costs a read-back per step, which on a GPU makes the host
    wait for the backward pass. After `check_on_device()` (rules with `halts`, "stop"
    only) the gradients are checked on the device instead: a device flag halts this and
    every later update inside the update kernels, and `settle()`, called where the host
    reads the device anyway (log lines, evaluation, checkpoints, the end), raises the
    NonFiniteError for the step that set it.
    """

    slots: tuple[str, ...] = ()
    halts = False  # True where _update_all hands self._halt to an update that honours it

    def __init__(self, layers: Sequence[Layer], weight_decay: float = 0.0,
                 lr_scale: Sequence[float] | None = None,
                 wd_scale: Sequence[float] | None = None):
        self.layers = list(layers)
        self.weight_decay = float(weight_decay)
        self.lr_scale = _per_layer(lr_scale, len(self.layers), "lr_scale")
        self.wd_scale = _per_layer(wd_scale, len(self.layers), "wd_scale")
        # (layer index, name, state key prefix, weight decay) per trainable tensor, fixed
        # once here so that a step only looks things up.
        self._tensors = [
            (i, name, f"{i}/{name}",
             0.0 if name in layer.no_decay else self.weight_decay * self.wd_scale[i])
            for i, layer in enumerate(self.layers) for name in layer.trainable
        ]
        self.steps = 0
        self.skipped = 0
        self.on_nonfinite = "stop"
        self.first_layer = 0  # model index of layers[0], for messages (a pipeline stage's first layer)
        self.state: dict[str, Any] = {}            # key -> xp array on the params' device
        self._restored: dict[str, np.ndarray] = {}  # host arrays awaiting their first step
        self._on_device = False
        self._halt = None        # device (1,) float32, non-zero once an update was refused (check_on_device)
        self._refused_at = None  # device (1,) int64: the step whose gradients set it, 0 while none did

    def check_on_device(self) -> None:
        """Check gradients on the device from now on; the verdict reaches the host in `settle()`."""
        if not self.halts or self.on_nonfinite != "stop":
            raise ValueError(f"{type(self).__name__} with on_nonfinite={self.on_nonfinite!r} cannot halt its "
                             "updates on the device")
        self._on_device = True

    def settle(self) -> None:
        """Read the device checks' verdict (one host read): NonFiniteError if an update was refused."""
        if self._refused_at is not None and (step := int(to_host(self._refused_at)[0])):
            raise NonFiniteError(describe(step, ["the gradients (checked on the device: layers not named)"]))

    def step(self, params: list[Params], grads: list[dict[str, Any]], lr: Rate,
             gradients_checked: bool = False) -> None:
        """Update `params` in place from `grads`, which are only read. `gradients_checked`: the
        caller (LossScaler) has found them finite already, so only the learning rates are checked."""
        n = len(self.layers)
        if len(params) != n or len(grads) != n:
            raise ValueError(f"optimizer built for {n} layers got {len(params)} parameter "
                             f"and {len(grads)} gradient dicts")
        rates = self._rates(lr)
        if self._on_device and all(math.isfinite(r) for r in rates):
            self._check_gradients_on_device(grads)
        elif found := nonfinite_layers(self.layers, grads, rates, self.first_layer, not gradients_checked):
            self._refuse(found)
            return
        self.steps += 1
        self._update_all(params, grads, rates)

    def _check_gradients_on_device(self, grads: list[dict[str, Any]]) -> None:
        """Set the halt flag, with no host read, if a gradient holds a NaN or Inf."""
        tensors = [g for layer_grads in grads for g in layer_grads.values()]
        if not tensors:
            return
        xp = array_module(tensors[0])
        if self._halt is None:
            self._halt, self._refused_at = xp.zeros(1, dtype=np.float32), xp.zeros(1, dtype=np.int64)
        refused = xp.zeros(1, dtype=np.float32)
        any_nonfinite(tensors, refused)
        record_refusal(refused, self._halt, self._refused_at, self.steps + self.skipped + 1)

    def _update_all(self, params: list[Params], grads: list[dict[str, Any]], rates: list[float]) -> None:
        """Apply the rule in place to every trainable tensor (`_tensors`), layer i at rate rates[i]."""
        raise NotImplementedError

    def _columns(self, params: list[Params], grads: list[dict[str, Any]],
                 rates: list[float]) -> tuple[list, list, list[float], list[float]]:
        """(weights, gradients, rates, decays): one entry per trainable tensor, in `_tensors` order,
        as the batched update kernels take them."""
        tensors = self._tensors
        return ([params[i][name] for i, name, _, _ in tensors], [grads[i][name] for i, name, _, _ in tensors],
                [rates[i] for i, *_ in tensors], [wd for *_, wd in tensors])

    def _refuse(self, found: list[str]) -> None:
        """Stop or skip a step with non-finite values in the `found` layers."""
        if self.on_nonfinite not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(POLICIES)}, got {self.on_nonfinite!r}")
        # Step numbers count skipped steps too: they are the caller's 1-based step.
        message = describe(self.steps + self.skipped + 1, found)
        if self.on_nonfinite == "stop":
            raise NonFiniteError(message)
        self.skipped += 1
        print(f"warning: {message}; update skipped ({self.skipped} so far)", file=sys.stderr, flush=True)

    def _buffer(self, key: str, w):
        """State buffer `key` on w's device, or None before its first step."""
        buf = self.state.get(key)
        if buf is None and key in self._restored:
            buf = self.state[key] = _like(self._restored.pop(key), w, key)
        return buf

    def _zeros(self, key: str, w):
        """State buffer `key`, created as zeros shaped like `w` on its first step."""
        buf = self._buffer(key, w)
        if buf is None:
            buf = self.state[key] = array_module(w).zeros_like(w)
        return buf

    def state_dict(self) -> dict[str, np.ndarray]:
        """A host snapshot of the state: later steps do not change it. A refused update
        (check_on_device) raises here rather than be checkpointed as if it had been checked."""
        self.settle()
        out = {key: host.copy() for key, host in self._restored.items()}
        out.update({key: _host_copy(buf) for key, buf in self.state.items()})
        out["step"] = np.array(self.steps, dtype=np.int64)
        if self.skipped:
            out["skipped"] = np.array(self.skipped, dtype=np.int64)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore a `state_dict`; buffers move to the params' device on the next step."""
        if "step" not in state:
            raise ValueError("optimizer state has no 'step' counter")
        steps = int(state["step"])
        expected = {f"{key}/{slot}" for _, _, key, _ in self._tensors for slot in self.slots}
        found = set(state) - {"step", "skipped"}
        # Every buffer exists after the first step and none before it.
        if found != (expected if steps > 0 else set()):
            unknown, missing = sorted(found - expected), sorted(expected - found)
            raise ValueError(f"optimizer state does not fit this {type(self).__name__} "
                             f"at step {steps}: unknown {unknown[:4]}, missing {missing[:4]}")
        self.steps = steps
        self.skipped = int(state.get("skipped", 0))
        self.state = {}
        # Copies: the caller's arrays must not become our buffers.
        self._restored = {key: np.array(state[key]) for key in found}

    def _rates(self, lr: Rate) -> list[float]:
        # Python floats keep float32 arithmetic float32 (NumPy scalars would promote it).
        if isinstance(lr, numbers.Real):
            return [float(lr) * s for s in self.lr_scale]
        rates = [float(r) for r in lr]
        if len(rates) != len(self.layers):
            raise ValueError(f"{len(rates)} learning rates for {len(self.layers)} layers")
        return [r * s for r, s in zip(rates, self.lr_scale)]

    def __repr__(self) -> str:
        hyper = {k: v for k, v in vars(self).items()
                 if not k.startswith("_") and k not in ("layers", "state", "steps")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in hyper.items())})"


def _per_layer(values: Sequence[float] | None, n: int, what: str) -> list[float]:
    if values is None:
        return [1.0] * n
    values = [float(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries for {n} layers")
    return values


def _like(host: np.ndarray, w, key: str):
    """`host` on w's device, after checking it fits w."""
    if host.shape != w.shape or host.dtype != w.dtype:
        raise ValueError(f"optimizer state {key}: {host.shape} {host.dtype} does not fit "
                         f"the parameter's {w.shape} {w.dtype}")
    return array_module(w).asarray(host)


def _host_copy(a) -> np.ndarray:
    # to_host copies device arrays already; a NumPy array it would merely return.
    return to_host(a) if on_device(a) else a.copy()

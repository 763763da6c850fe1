"""Executes a pipeline schedule on one stage of one replica: compute, stash, send, receive, update."""
from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from ..comm.collectives import BucketAllreduce
from ..comm.p2p import PipeChannel
from ..layers import EVAL, Layer, Mode, accuracy, softmax_cross_entropy_backward, softmax_cross_entropy_forward
from ..layers.base import Params
from ..models import backward, forward
from ..nonfinite import NonFiniteError, describe, nonfinite_layers
from ..optim import LRMethod
from ..optim.loss_scale import LossScaler
from ..flat import Flat
from ..trace import Tracer
from .schedules import SCHEDULES, Action, max_in_flight, stash_depth
from .stash import Stash

# How many receives of each kind are posted ahead of the action that consumes them:
# enough for the next message to arrive while this one is computed on.
LOOKAHEAD = 2


@dataclass
class Feed:
    """What one run of actions consumes: inputs on the first stage, labels and loss weights on the last."""

    x: Callable[[int], object] | None           # micro-batch -> input (first stage)
    y: Callable[[int], object] | None           # micro-batch -> labels (last stage)
    weight: Callable[[int], float]              # micro-batch -> dloss of its mean loss
    size: Callable[[int], int]                  # micro-batch -> number of samples
    key: Callable[[int], tuple[int, ...]]       # micro-batch -> dropout key
    lr: Callable[[int], float]                  # micro-batch of the step -> learning rate
    on_step: Callable[[int], None] | None = None  # called after each update with its micro-batch


class StageRunner:
    """One stage: its slice of layers, its parameters, a stash, and the channel to its neighbours.

    The same object runs every schedule: a flushed schedule accumulates micro-batch
    gradients and steps once; an asynchronous one steps after every backward, with
    (pipedream) or without (pipelined-bp) the weight version its forward pass used.

    A step is `optimizer.step` at the learning rate the feed gives, or at the per-layer rates
    of `lr_method` when one is given (large-batch methods, which read the reduced gradient
    and, for gain ratios, the micro-batch squared norms summed into `grads.stats` by the
    same allreduce); or, when `update` is given, `update(flat_gradient, lr)`:
    the hook through which an algorithm takes the stage's gradient instead (a local step
    and a push to a parameter server, an elastic exchange...). The gradient vector is
    zeroed after the hook returns, so the hook must copy what it keeps.

    With a `scaler` (fp16), the last stage's loss gradient is multiplied by its scale and each
    step first divides the reduced gradient by it; the scaler then skips an update that
    overflowed. Only one stage may hold a scaler: nothing agrees the overflows between stages.
    """

    def __init__(self, layers: Sequence[Layer], params: list[Params], first: int, stage: int, n_stages: int,
                 schedule: str, n_micro: int, optimizer, channel: PipeChannel | None, shapes: tuple[tuple, tuple],
                 xp, dtype, stage_comm=None, tracer: Tracer | None = None, poll: str = "sleep",
                 update: Callable[[object, float], None] | None = None, lr_method: LRMethod | None = None,
                 on_nonfinite: str = "stop", scaler: LossScaler | None = None):
        self.layers, self.params, self.first = layers, params, first
        self.stage, self.n_stages = stage, n_stages
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        self.spec = SCHEDULES[schedule]
        self.optimizer, self.channel, self.update = optimizer, channel, update
        self.on_nonfinite = on_nonfinite  # for gradients the `update` hook takes (the optimizer has its own)
        if optimizer is not None:
            optimizer.first_layer = first  # its messages name layers by their index in the model
        self.in_shape, self.out_shape = shapes
        self.xp, self.dtype = xp, np.dtype(dtype)
        self.tracer = tracer or Tracer(0, enabled=False)
        self.stash = Stash(params, max_in_flight(schedule, stage, n_stages, n_micro),
                           stash_depth(schedule, stage, n_stages) if self.spec.stash_weights else 0)
        self.lr_method = lr_method
        self.scaler = scaler
        norms = lr_method is not None and lr_method.needs_micro_norms
        self.grads = Flat(layers, params, xp, dtype, stats=len(layers) if norms else 0)
        replicated = stage_comm is not None and stage_comm.Get_size() > 1
        self.reducer = BucketAllreduce(stage_comm, self.grads, poll=poll) if replicated else None
        self.dlogits: dict[int, object] = {}
        self.loss_sum = 0.0        # sum over micro-batches of weight x mean loss (last stage)
        self.updates = 0
        # Debugging hook for tests: called as on_update(mb, stashed_params, grads) per step.
        self.on_update: Callable | None = None

    # -- running a list of actions ------------------------------------------------------
    def run(self, actions: Iterable[Action], feed: Feed) -> None:
        actions = list(actions)
        pending = {kind: deque(a.mb for a in actions if a.kind == kind) for kind in ("recv_act", "recv_grad")}
        posted: dict[tuple[str, int], object] = {}

        def post_ahead(kind: str) -> None:
            while pending[kind] and sum(k == kind for k, _ in posted) < LOOKAHEAD:
                mb = pending[kind].popleft()
                shape = (feed.size(mb),) + (self.in_shape if kind == "recv_act" else self.out_shape)
                post = self.channel.post_recv_act if kind == "recv_act" else self.channel.post_recv_grad
                posted[(kind, mb)] = post(mb, shape, self.dtype)

        for kind in pending:
            post_ahead(kind)
        final = last_backwards(actions)
        inputs: dict[int, object] = {}
        douts: dict[int, object] = {}
        outputs: dict[int, object] = {}
        for a in actions:
            with self.tracer.span(a.kind, "pipeline", mb=a.mb):
                if a.kind in ("recv_act", "recv_grad"):
                    (inputs if a.kind == "recv_act" else douts)[a.mb] = self.channel.take(posted.pop((a.kind, a.mb)),
                                                                                          self.xp)
                    post_ahead(a.kind)
                elif a.kind == "forward":
                    x = feed.x(a.mb) if self.is_first else inputs.pop(a.mb)
                    outputs[a.mb] = self._forward(a.mb, x, feed)
                elif a.kind == "send_act":
                    self.channel.send_act(a.mb, outputs.pop(a.mb))
                elif a.kind == "backward":
                    dy = self.dlogits.pop(a.mb) if self.is_last else douts.pop(a.mb)
                    outputs[a.mb] = self._backward(a.mb, dy, a.mb in final, feed.weight(a.mb))
                elif a.kind == "send_grad":
                    self.channel.send_grad(a.mb, outputs.pop(a.mb))
                elif a.kind == "step":
                    self._step(feed.lr(a.mb))
                    if feed.on_step is not None:
                        feed.on_step(a.mb)
                else:
                    raise ValueError(f"unknown action {a}")
        if self.channel is not None:
            self.channel.flush()

    def _forward(self, mb: int, x, feed: Feed):
        y, caches = forward(self.layers, self.params, x, Mode(True, feed.key(mb)), self.first)
        if self.is_last:
            loss, lcache = softmax_cross_entropy_forward(y, feed.y(mb))
            scale = self.scaler.scale if self.scaler is not None else 1.0
            self.dlogits[mb] = softmax_cross_entropy_backward(lcache, feed.weight(mb) * scale)
            self.loss_sum += float(loss) * feed.weight(mb)
            y = None
        self.stash.push(mb, caches)
        return y

    def _backward(self, mb: int, dy, final: bool, weight: float):
        """Backward of mb (loss weight `weight`), accumulating its gradients; the final one before a step
        also reduces them."""
        entry = self.stash.pop(mb)
        reduce = self.reducer is not None and final

        def accumulate(i: int, g: dict) -> None:
            self.grads.accumulate(i, g, weight)
            if reduce:
                self.reducer.layer_done(i)

        dx, grads = backward(self.layers, entry.params, entry.caches, dy, accumulate, need_dx=not self.is_first)
        if self.on_update is not None and not self.spec.flush:
            self.on_update(mb, entry.params, grads)
        return dx

    def _step(self, lr: float) -> None:
        if self.channel is not None:  # no send held back while this rank waits on its replicas or servers
            self.channel.post_held()
        if self.reducer is not None:
            with self.tracer.span("wait_allreduce", "comm"):
                self.reducer.wait()
        if self.scaler is not None:
            self.scaler.unscale(self.grads.views, self.grads.stats)
        if self.update is not None:
            self._check_finite(lr)
            self.update(self.grads.vector, lr)
        else:
            # The stats are empty unless the method asked for micro-batch norms.
            rates = self.lr_method.rates(self.grads.views, self.grads.stats) if self.lr_method is not None else lr
            if self.scaler is not None:
                self.scaler.step(self.optimizer, self.params, self.grads.views, rates)
            else:
                self.optimizer.step(self.params, self.grads.views, rates)
        self.grads.vector[...] = 0
        self.updates += 1

    def _check_finite(self, lr: float) -> None:
        """What Optimizer.step does for a gradient the `update` hook takes instead: stop, or skip by
        zeroing it; the hook is still called, since its exchanges with other ranks must stay matched."""
        found = nonfinite_layers(self.layers, self.grads.views, [lr] * len(self.layers), self.first)
        if not found:
            return
        message = describe(self.updates + 1, found)
        if self.on_nonfinite == "stop":
            raise NonFiniteError(message)
        self.grads.vector[...] = 0
        print(f"warning: {message}; this replica's gradient dropped", file=sys.stderr, flush=True)

    # -- evaluation: forward only, no stash, straight through the pipeline ------------------
    def evaluate(self, batches: Iterable, sizes: Sequence[int]) -> tuple[float, float, int]:
        """Sum of losses, number correct and samples over a split (meaningful on the last stage)."""
        loss_sum = correct = n = 0.0
        for i, (x, y) in enumerate(batches):
            if not self.is_first:
                x = self.channel.take(self.channel.post_recv_act(i, (sizes[i],) + self.in_shape, self.dtype), self.xp)
            out, _ = forward(self.layers, self.params, x, EVAL, self.first)
            if self.is_last:
                loss, _ = softmax_cross_entropy_forward(out, y)
                loss_sum += float(loss) * len(y)
                correct += float(accuracy(out, y)) * len(y)
                n += len(y)
            else:
                self.channel.send_act(i, out)
        if self.channel is not None:
            self.channel.flush()
        return loss_sum, correct, int(n)


def last_backwards(actions: Sequence[Action]) -> set[int]:
    """Micro-batches whose backward is the last before a step: their gradients are final."""
    final, last = set(), None
    for a in actions:
        if a.kind == "backward":
            last = a.mb
        elif a.kind == "step" and last is not None:
            final.add(last)
            last = None
    return final


def stage_shapes(model_shapes: Sequence[tuple], bounds: tuple[int, int]) -> tuple[tuple, tuple]:
    """Per-sample shapes of a stage's input and output."""
    start, stop = bounds
    return tuple(model_shapes[start]), tuple(model_shapes[stop])

"""Pipeline schedules as pure generators of one stage's actions (ALGORITHMS.md §7)."""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

RECV_ACT, FORWARD, SEND_ACT = "recv_act", "forward", "send_act"
RECV_GRAD, BACKWARD, SEND_GRAD = "recv_grad", "backward", "send_grad"
STEP = "step"
FLUSH = -1   # the micro-batch of a step that applies a whole mini-batch's gradients


class Action(NamedTuple):
    """One thing a stage does, to micro-batch `mb`.

    recv_act   receive mb's input activation from stage s - 1 (never on the first stage)
    forward    compute mb's output and keep what backward needs
    send_act   send mb's output to stage s + 1 (never on the last stage, which takes the loss)
    recv_grad  receive the gradient of mb's output from stage s + 1 (never on the last stage)
    backward   compute mb's input gradient and accumulate the weight gradients
    send_grad  send mb's input gradient to stage s - 1 (never on the first stage)
    step       optimizer update: after mb's backward (asynchronous schedules), or FLUSH
    """

    kind: str
    mb: int


Schedule = Callable[[int, int, int], Iterator[Action]]


class ScheduleSpec(NamedTuple):
    """A schedule's action order and what the runtime must do around it."""

    generator: Schedule
    flush: bool          # one step per mini-batch, after all its backwards
    stash_weights: bool  # a backward uses the weights its forward used (PipeDream)


def _check(stage: int, n_stages: int, n_micro: int) -> None:
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage {stage} is not in 0..{n_stages - 1}")
    if n_micro < 1:
        raise ValueError(f"n_micro must be at least 1, got {n_micro}")


def _forward(stage: int, n_stages: int, mb: int) -> Iterator[Action]:
    # Each receive sits right before the compute that needs it and each send right after
    # the compute that produced it, so neighbours pair their messages in the same order.
    if stage > 0:
        yield Action(RECV_ACT, mb)
    yield Action(FORWARD, mb)
    if stage < n_stages - 1:
        yield Action(SEND_ACT, mb)


def _backward(stage: int, n_stages: int, mb: int, step: bool) -> Iterator[Action]:
    if stage < n_stages - 1:
        yield Action(RECV_GRAD, mb)
    yield Action(BACKWARD, mb)
    if stage > 0:
        yield Action(SEND_GRAD, mb)
    if step:
        yield Action(STEP, mb)


def _one_forward_one_backward(stage: int, n_stages: int, n_micro: int,
                              step_each: bool) -> Iterator[Action]:
    # Stage s runs P - s - 1 forwards ahead of its first backward, one for each later stage
    # to fill, so it has work while the first gradient travels back and never holds more
    # than P - s micro-batches in flight.
    warmup = min(n_stages - stage - 1, n_micro)
    for mb in range(warmup):
        yield from _forward(stage, n_stages, mb)
    for mb in range(warmup, n_micro):
        yield from _forward(stage, n_stages, mb)
        yield from _backward(stage, n_stages, mb - warmup, step_each)
    for mb in range(n_micro - warmup, n_micro):
        yield from _backward(stage, n_stages, mb, step_each)


def gpipe(stage: int, n_stages: int, n_micro: int) -> Iterator[Action]:
    """Fill-drain: all M forwards, all M backwards in the same order 0..M-1, one step.

    Backward in forward order (as PipeDream-flush and Megatron do) makes every stage's
    store of in-flight micro-batches first-in first-out, like 1F1B's.
    """
    _check(stage, n_stages, n_micro)
    for mb in range(n_micro):
        yield from _forward(stage, n_stages, mb)
    for mb in range(n_micro):
        yield from _backward(stage, n_stages, mb, step=False)
    yield Action(STEP, FLUSH)


def one_f_one_b(stage: int, n_stages: int, n_micro: int) -> Iterator[Action]:
    """PipeDream-flush: warm-up forwards, then one forward / one backward, cool-down, one step."""
    _check(stage, n_stages, n_micro)
    yield from _one_forward_one_backward(stage, n_stages, n_micro, step_each=False)
    yield Action(STEP, FLUSH)


def pipedream(stage: int, n_stages: int, n_micro: int) -> Iterator[Action]:
    """Asynchronous 1F1B over the whole run of `n_micro` micro-batches: a step after every backward."""
    _check(stage, n_stages, n_micro)
    yield from _one_forward_one_backward(stage, n_stages, n_micro, step_each=True)


# Pipelined backprop runs PipeDream's order; it only skips weight stashing, so its backward
# passes see whatever weights are live by then.
SCHEDULES: dict[str, ScheduleSpec] = {
    "gpipe": ScheduleSpec(gpipe, flush=True, stash_weights=False),
    "1f1b": ScheduleSpec(one_f_one_b, flush=True, stash_weights=False),
    "pipedream": ScheduleSpec(pipedream, flush=False, stash_weights=True),
    "pipelined-bp": ScheduleSpec(pipedream, flush=False, stash_weights=False),
}


def get_schedule(name: str) -> ScheduleSpec:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def max_in_flight(name: str, stage: int, n_stages: int, n_micro: int) -> int:
    """Most micro-batches forwarded but not yet backwarded at once on `stage`."""
    get_schedule(name)
    _check(stage, n_stages, n_micro)
    if name == "gpipe":
        return n_micro
    return min(n_stages - stage, n_micro)


def stash_depth(name: str, stage: int, n_stages: int) -> int:
    """Parameter versions `stage` must hold at once, the live one included.

    With weight stashing each in-flight micro-batch may have been forwarded with a different
    version (P - s of them); otherwise all use the live weights, the only version.
    """
    spec = get_schedule(name)
    _check(stage, n_stages, 1)
    return n_stages - stage if spec.stash_weights else 1

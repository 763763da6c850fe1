"""Learning-rate schedules: pure callables step -> lr (constant, step, cosine, linear warm-up)."""
from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

Schedule = Callable[[int], float]  # optimizer step (0-based) -> learning rate


def constant(lr: float) -> Schedule:
    """lr at every step."""
    lr = float(lr)

    def sched(step: int) -> float:
        return lr
    return sched


def step_decay(lr: float, gamma: float = 0.1, every: int | None = None,
               milestones: Sequence[int] = ()) -> Schedule:
    """lr x gamma^k, k = decays so far: one every `every` steps, or one at each milestone."""
    if (every is None) == (not milestones):
        raise ValueError("step decay needs exactly one of `every` and `milestones`")
    if every is not None and every < 1:
        raise ValueError(f"`every` must be a positive number of steps, got {every}")
    marks = sorted(milestones)

    def sched(step: int) -> float:
        k = step // every if every is not None else bisect.bisect_right(marks, step)
        return lr * gamma ** k
    return sched


def cosine(lr: float, total_steps: int, floor: float = 0.0) -> Schedule:
    """Half a cosine from lr at step 0 down to `floor` at `total_steps`, then `floor`."""
    if total_steps < 1:
        raise ValueError(f"cosine needs total_steps >= 1, got {total_steps}")

    def sched(step: int) -> float:
        progress = min(step, total_steps) / total_steps
        return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return sched


def warmup(steps: int, inner: Schedule, start_factor: float = 0.0) -> Schedule:
    """inner(t) scaled by a factor rising linearly from start_factor at t = 0 to 1 at t = steps.

    The inner schedule keeps counting from step 0, so a decay's milestones mean the same
    steps with or without warm-up (Goyal et al. use start_factor = 1 / batch scale).
    """
    if steps < 1:
        raise ValueError(f"warm-up needs steps >= 1, got {steps}")

    def sched(step: int) -> float:
        if step >= steps:
            return inner(step)
        return inner(step) * (start_factor + (1.0 - start_factor) * step / steps)
    return sched


def make_schedule(name: str, base_lr: float, total_steps: int, warmup_steps: int = 0,
                  warmup_start: float = 0.0, **kw) -> Schedule:
    """The schedule called `name` ("constant", "step", "cosine"), optionally warmed up.

    `kw` are the schedule's own keywords: gamma, every, milestones (step); floor (cosine).
    """
    if name == "constant":
        inner = constant(base_lr, **kw)
    elif name == "step":
        inner = step_decay(base_lr, **kw)
    elif name == "cosine":
        inner = cosine(base_lr, total_steps, **kw)
    else:
        raise ValueError(f"unknown schedule {name!r}; choose one of constant, step, cosine")
    return warmup(warmup_steps, inner, warmup_start) if warmup_steps > 0 else inner

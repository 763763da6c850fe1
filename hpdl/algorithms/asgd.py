"""Downpour / asynchronous SGD (ALGORITHMS.md §3): workers push their steps, the server adds them."""
from __future__ import annotations

from .base import WeightServer, WorkerRule, every


class AsgdServer(WeightServer):
    """The Downpour parameter server (§3): w <- w + Δ for each pushed Δ, replying w.

    Δ is the worker's accumulated -η g, so with n_push = n_fetch = 1 this is plain ASGD,
    w <- w - η g, where g was computed at the weights the worker last received. The
    learning rate was applied by the worker, and `lr` is not used here.
    """

    def _update(self, worker: int, payload, lr: float) -> None:
        self.w += payload


class AsgdWorker(WorkerRule):
    """A Downpour worker (§3): accumulates -η g, pushes the sum every `n_push` steps and
    takes the server's weights every `n_fetch` steps.

    Between fetches it also applies its steps to its own copy, so that its next gradients
    see them. With n_push = n_fetch = 1 the fetch replaces that copy before it is used, so
    the local step is skipped.
    """

    _state_names = ("acc",)

    def __init__(self, w, n_push: int = 1, n_fetch: int = 1):
        super().__init__(w)
        self.n_push = every(n_push, "n_push")
        self.n_fetch = every(n_fetch, "n_fetch")
        self.local = self.n_push > 1 or self.n_fetch > 1
        self.acc = None  # sum of -η g since the last push; None right after one

    def local_step(self, w, g, lr: float) -> None:
        step = g * -float(lr)
        if self.local:
            w += step
        # Starting from the first step itself, not from zeros plus it, saves a pass and
        # gives the same numbers.
        if self.acc is None:
            self.acc = step
        else:
            self.acc += step

    def should_push(self, step: int) -> bool:
        return (step + 1) % self.n_push == 0

    def should_fetch(self, step: int) -> bool:
        return (step + 1) % self.n_fetch == 0

    def payload(self, w):
        # Handing the buffer over (a fresh one starts at the next step) keeps it unchanged
        # while it is in flight, without a copy.
        acc, self.acc = self.acc, None
        return acc

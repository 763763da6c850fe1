"""Periodic model averaging (ALGORITHMS.md §2): τ local SGD steps, then the replicas' mean."""
from __future__ import annotations

from .base import WorkerRule, every

# fairseq's global_sync_iter (§2); plain averaging is BMUF with η_b = 0, ζ = 1.
TAU = 50


class LocalSgdWorker(WorkerRule):
    """A replica of model averaging or BMUF (§2): SGD steps w <- w - η g; every τ steps it
    contributes w to an allreduce and continues from the weights that come back."""

    def __init__(self, w, tau: int = TAU):
        super().__init__(w)
        self.tau = every(tau, "tau")

    def local_step(self, w, g, lr: float) -> None:
        w -= float(lr) * g

    def should_push(self, step: int) -> bool:
        return (step + 1) % self.tau == 0

    def payload(self, w):
        return w  # unchanged until the allreduce returns


def avg_sync(w_sum, n_workers: int):
    """The replicas' mean, w_sum / N, computed in place in the allreduced sum and returned.

    For plain averaging (§2) it is the new weights of every replica; for BMUF it is the
    `mean_w` that `bmuf_sync` filters.
    """
    w_sum /= n_workers
    return w_sum

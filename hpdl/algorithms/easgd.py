"""EASGD and EAMSGD (ALGORITHMS.md §5): local replicas tied to a centre variable by an elastic force.

Synchronous EASGD's two halves, `easgd_sync_worker` and `easgd_sync_center`, are the fused
kernels of hpdl.kernels (NumPy oracles off the GPU), re-exported here with the rules.
"""
from __future__ import annotations

from ..kernels import easgd_elastic, easgd_sync_center, easgd_sync_worker
from .avg import LocalSgdWorker
from .base import ServerRule

# The authors' recommendations (§5): β = N α = 0.9; τ = 100 in their launcher; EAMSGD δ = 0.99.
BETA = 0.9
TAU = 100
DELTA = 0.99


def default_alpha(n_workers: int) -> float:
    """The moving rate α = β / N with β = 0.9 (§5)."""
    return BETA / n_workers


class EasgdServer(ServerRule):
    """The centre x̃ of asynchronous EASGD (§5). For the x_i that worker i sends every τ steps:

        e = α (x_i - x̃);  x̃ <- x̃ + e;  reply e  (the worker then does x_i <- x_i - e).

    Computing e here, on arrival, makes the exchange atomic: x̃ + Σ_i x_i is unchanged by it.
    The reply lives in a scratch buffer, valid until the next `apply`.
    """

    def __init__(self, w0, n_workers: int, alpha: float | None = None):
        super().__init__(w0, n_workers)
        alpha = default_alpha(n_workers) if alpha is None else alpha
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self._e = self.xp.empty_like(self.w)

    def _apply(self, worker: int, x, lr: float):
        # One fused kernel on the GPU (kernels/optim_update.cu), its NumPy oracle elsewhere.
        return easgd_elastic(self.w, x, self.alpha, out=self._e)


class EasgdWorker(LocalSgdWorker):
    """An asynchronous EASGD worker (§5): SGD steps x_i <- x_i - η g; every τ steps it sends
    x_i (unchanged until the reply arrives: the worker waits for it) and applies the
    elastic reply, x_i <- x_i - e."""

    def __init__(self, w, tau: int = TAU):
        super().__init__(w, tau)

    def on_reply(self, w, e) -> None:
        w -= e


class EamsgdWorker(EasgdWorker):
    """An EAMSGD worker (§5): EASGD with the local Nesterov step, exactly as the authors write it:

        v <- δ v;  x <- x + v;  g = ∇f(x);  x <- x - η g;  v <- v - η g

    (`lookahead` does the first two, `local_step` the last two). δ = 0 gives EASGD.
    """

    _state_names = ("v",)

    def __init__(self, w, tau: int = TAU, delta: float = DELTA):
        super().__init__(w, tau)
        if not 0.0 <= delta < 1.0:
            raise ValueError(f"delta must be in [0, 1), got {delta}")
        self.delta = float(delta)
        self.v = self.xp.zeros_like(w)

    def lookahead(self, w) -> None:
        self.v *= self.delta
        w += self.v

    def local_step(self, w, g, lr: float) -> None:
        step = g * float(lr)
        w -= step
        self.v -= step


__all__ = ["BETA", "DELTA", "TAU", "EamsgdWorker", "EasgdServer", "EasgdWorker", "default_alpha",
           "easgd_sync_center", "easgd_sync_worker"]

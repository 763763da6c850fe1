"""DC-ASGD (ALGORITHMS.md §4): asynchronous SGD whose server compensates each gradient's delay."""
from __future__ import annotations

from ..kernels import dcasgd_update
from .base import WeightServer, WorkerRule

# Defaults of MXNet's optimizer/dcasgd.py (constant λ) and of the adaptive variant (§4).
LAMBDA_C = 0.04
LAMBDA_A = 2.0
MS_DECAY = 0.95
EPS = 1e-7


class DcAsgdServer(WeightServer):
    """DC-ASGD-c (§4): for a gradient g from worker m,

        w <- w - η (g + λ g⊙g⊙(w - w_bak(m)));  then w_bak(m) <- w, the copy sent back to m.

    w_bak(m), the weights m's gradient was computed at, starts as w0 for every worker; a
    fetch also sets it. g⊙g is the diagonal outer-product estimate of the Hessian, so the
    correction is the first-order Taylor term of the delay w - w_bak(m).
    """

    _state_names = ("w", "backup")

    def __init__(self, w0, n_workers: int, lambda_dc: float = LAMBDA_C):
        super().__init__(w0, n_workers)
        if lambda_dc < 0:
            raise ValueError(f"lambda_dc must be >= 0, got {lambda_dc}")
        self.lambda_dc = float(lambda_dc)
        self.backup = self.xp.stack([self.w] * n_workers)  # row m: w_bak(m)

    def _apply(self, worker: int, g, lr: float):
        # One fused kernel on the GPU (kernels/optim_update.cu), its NumPy oracle elsewhere. It
        # also writes the new w into backup row m, which is then the reply.
        dcasgd_update(self.w, self.backup[worker], g, lr, self.lambda_dc, *self._adaptive(worker))
        return self.backup[worker]

    def _adaptive(self, worker: int) -> tuple:
        """DC-ASGD-a's extra arguments to dcasgd_update: none for the constant λ."""
        return ()

    def _sent(self, worker: int):
        # A fetch: the backup row holds exactly what m receives and is not written
        # again before m's next message.
        self.backup[worker] = self.w
        return self.backup[worker]


class DcAsgdAdaptiveServer(DcAsgdServer):
    """DC-ASGD-a (§4): a mean square MS_m of worker m's gradients scales the correction,

        MS_m <- μ MS_m + (1-μ) g⊙g;  w <- w - η (g + (λ0 / sqrt(MS_m + ε)) g⊙g⊙(w - w_bak(m)));
        then w_bak(m) <- w.

    MS_m starts at zero and is kept per worker, as in the authors' Multiverso updater.
    """

    _state_names = ("w", "backup", "ms")

    def __init__(self, w0, n_workers: int, lambda_dc: float = LAMBDA_A, ms_decay: float = MS_DECAY,
                 eps_dc: float = EPS):
        super().__init__(w0, n_workers, lambda_dc)
        if not 0.0 <= ms_decay < 1.0:
            raise ValueError(f"ms_decay must be in [0, 1), got {ms_decay}")
        if eps_dc <= 0:
            raise ValueError(f"eps_dc must be > 0, got {eps_dc}")
        self.ms_decay, self.eps_dc = float(ms_decay), float(eps_dc)
        self.ms = self.xp.zeros_like(self.backup)  # row m: MS_m

    def _adaptive(self, worker: int) -> tuple:
        return self.ms[worker], self.ms_decay, self.eps_dc


class GradientWorker(WorkerRule):
    """A DC-ASGD worker (§4): pushes its raw gradient every step and takes the reply's weights.

    The learning rate and the delay compensation are the server's, so it does nothing locally.
    """

    def __init__(self, w):
        super().__init__(w)
        self.g = None

    def local_step(self, w, g, lr: float) -> None:
        self.g = g

    def payload(self, w):
        g, self.g = self.g, None
        return g

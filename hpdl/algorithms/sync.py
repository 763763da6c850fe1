"""Synchronous mini-batch SGD (ALGORITHMS.md §1): every replica applies the averaged gradient."""
from __future__ import annotations


def sync_sgd(w, g_sum, n_workers: int, lr: float) -> None:
    """w <- w - η g_avg with g_avg = g_sum / N, in place (g_sum, the allreduced sum, becomes g_avg).

    Every replica applies the same update to the same weights, so they stay identical.
    """
    g_sum /= n_workers
    w -= float(lr) * g_sum

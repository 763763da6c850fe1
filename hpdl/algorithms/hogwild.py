"""Hogwild! (ALGORITHMS.md §6): lock-free updates of one shared parameter vector."""
from __future__ import annotations


def hogwild_apply(shared_w, g, lr: float) -> None:
    """shared_w <- shared_w - η g in place, without a lock.

    `shared_w` is the vector every local worker sees (an MPI shared-memory window); others
    may write it meanwhile, and Hogwild! accepts the lost or mixed element updates.
    """
    shared_w -= float(lr) * g

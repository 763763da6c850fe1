"""Splitting a mini-batch into micro-batches, and the loss weight of each."""
from __future__ import annotations


def sizes(batch: int, n_micro: int) -> list[int]:
    """Micro-batch sizes, as equal as possible, larger ones first (like numpy.array_split)."""
    if not 1 <= n_micro <= batch:
        raise ValueError(f"--microbatches must be between 1 and the batch size {batch}, got {n_micro}")
    q, r = divmod(batch, n_micro)
    return [q + 1] * r + [q] * (n_micro - r)


def bounds(batch: int, n_micro: int) -> list[tuple[int, int]]:
    """[start, stop) of each micro-batch along the batch axis."""
    out, start = [], 0
    for n in sizes(batch, n_micro):
        out.append((start, start + n))
        start += n
    return out


def loss_weights(batch: int, n_micro: int, replicas: int = 1) -> list[float]:
    """dloss of each micro-batch's mean loss: b_i / (replicas x batch).

    Summing the weighted micro-batch gradients over micro-batches and replicas gives
    the gradient of the mean loss over the global batch, so a flushed pipeline takes
    exactly the single-process step.
    """
    return [n / (batch * replicas) for n in sizes(batch, n_micro)]

"""Softmax cross-entropy on logits (B, C) with integer labels (B,), and accuracy."""
from __future__ import annotations

from ..kernels import softmax_xent


def softmax_cross_entropy_forward(logits, labels):
    """Mean over the batch of -log softmax(logits)[label]: (loss 0-d array, cache).

    The gradient is computed here too, in the same pass over the logits (one fused kernel
    on the GPU, hpdl.kernels.softmax_xent), and kept as the cache.
    """
    # logits: (B, C)  labels: (B,) ints -> loss: (), cache: d(mean loss)/dlogits (B, C)
    return softmax_xent(logits, labels)


def softmax_cross_entropy_backward(cache, dloss: float = 1.0):
    """dloss * d(mean loss)/dlogits = dloss * (softmax - onehot(labels)) / B.

    A pipeline that splits a batch of B samples into micro-batches of b passes
    dloss = b / B, so the gradients it sums over micro-batches are those of the batch mean.
    """
    # -> dlogits: (B, C), a new array: the cache stays as it was
    return cache * float(dloss)


def accuracy(logits, labels):
    """Fraction of rows whose largest logit is at the label (a 0-d array, left on the device)."""
    return (logits.argmax(axis=1) == labels).mean()

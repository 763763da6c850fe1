"""Softmax cross-entropy on logits (B, C) with integer labels (B,), and accuracy."""
from __future__ import annotations

from ..backend import array_module


def softmax_cross_entropy_forward(logits, labels):
    """Mean over the batch of -log softmax(logits)[label]: (loss 0-d array, cache)."""
    # logits: (B, C)  labels: (B,) ints -> loss: ()
    xp = array_module(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)   # exp cannot overflow
    log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    rows = xp.arange(logits.shape[0])
    loss = -log_probs[rows, labels].mean()
    return loss, (xp.exp(log_probs), labels)


def softmax_cross_entropy_backward(cache, dloss: float = 1.0):
    """dloss * d(mean loss)/dlogits = dloss * (softmax - onehot(labels)) / B.

    A pipeline that splits a batch of B samples into micro-batches of b passes
    dloss = b / B, so the gradients it sums over micro-batches are those of the batch mean.
    """
    # -> dlogits: (B, C)
    probs, labels = cache
    xp = array_module(probs)
    dlogits = probs.copy()
    dlogits[xp.arange(probs.shape[0]), labels] -= 1.0
    dlogits *= float(dloss) / probs.shape[0]
    return dlogits


def accuracy(logits, labels):
    """Fraction of rows whose largest logit is at the label (a 0-d array, left on the device)."""
    return (logits.argmax(axis=1) == labels).mean()

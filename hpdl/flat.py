"""Trainable tensors of a layer list laid out in one contiguous vector, with per-layer views."""
from __future__ import annotations

from typing import Sequence

from .backend import array_module
from .layers.base import Layer, Params


class Flat:
    """One contiguous vector holding every trainable tensor of `layers`, and views into it.

    `views[i][name]` is a reshaped slice of `vector`: writing either writes both. MPI moves
    the whole vector in one buffer call (allreduce, push to a server, elastic exchange),
    and element-wise update rules run on it in one pass instead of one per tensor.

    With `stats`, the vector starts with that many scalars more (`self.stats`), which
    travel in the same buffer calls: a per-layer statistic summed by the same allreduce
    as the gradients costs no message of its own.
    """

    def __init__(self, layers: Sequence[Layer], like: Sequence[Params], xp, dtype, stats: int = 0):
        entries = [(i, name, like[i][name].shape, like[i][name].size)
                   for i, layer in enumerate(layers) for name in layer.trainable]
        self.vector = xp.zeros(stats + sum(n for *_, n in entries), dtype=dtype)
        self.stats = self.vector[:stats]
        self.views: list[dict] = [{} for _ in layers]
        offset = stats
        for i, name, shape, n in entries:
            self.views[i][name] = self.vector[offset:offset + n].reshape(shape)
            offset += n

    def accumulate(self, i: int, grads: dict, weight: float = 1.0) -> None:
        """Add layer i's gradients of one micro-batch, computed with loss weight `weight`.

        With statistics, stats[i] also gains the squared norm of that micro-batch's own
        (unweighted) gradient: the micro-batch norms of the large-batch methods.
        """
        for name, g in grads.items():
            self.views[i][name] += g
        if self.stats.size:  # summed on the device: no host round trip per micro-batch
            xp = array_module(self.vector)
            self.stats[i] += sum(xp.vdot(g, g) for g in grads.values()) / weight ** 2

    @classmethod
    def adopt(cls, layers: Sequence[Layer], params: list[Params], xp, dtype) -> "Flat":
        """A Flat holding the values of `params`, whose trainable entries become its views."""
        flat = cls(layers, params, xp, dtype)
        for p, views in zip(params, flat.views):
            for name, view in views.items():
                view[...] = p[name]
                p[name] = view
        return flat

"""Trainable tensors of a layer list laid out in one contiguous vector, with per-layer views."""
from __future__ import annotations

from typing import Sequence

from .layers.base import Layer, Params


class Flat:
    """One contiguous vector holding every trainable tensor of `layers`, and views into it.

    `views[i][name]` is a reshaped slice of `vector`: writing either writes both. MPI moves
    the whole vector in one buffer call (allreduce, push to a server, elastic exchange),
    and element-wise update rules run on it in one pass instead of one per tensor.
    """

    def __init__(self, layers: Sequence[Layer], like: Sequence[Params], xp, dtype):
        entries = [(i, name, like[i][name].shape, like[i][name].size)
                   for i, layer in enumerate(layers) for name in layer.trainable]
        self.vector = xp.zeros(sum(n for *_, n in entries), dtype=dtype)
        self.views: list[dict] = [{} for _ in layers]
        offset = 0
        for i, name, shape, n in entries:
            self.views[i][name] = self.vector[offset:offset + n].reshape(shape)
            offset += n

    @classmethod
    def adopt(cls, layers: Sequence[Layer], params: list[Params], xp, dtype) -> "Flat":
        """A Flat holding the values of `params`, whose trainable entries become its views."""
        flat = cls(layers, params, xp, dtype)
        for p, views in zip(params, flat.views):
            for name, view in views.items():
                view[...] = p[name]
                p[name] = view
        return flat

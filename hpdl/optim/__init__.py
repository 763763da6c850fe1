"""Optimizers over per-layer parameter groups, learning-rate schedules, and their factories."""
from __future__ import annotations

from collections.abc import Sequence

from ..layers.base import Layer
from .adamw import AdamW
from .base import Optimizer, Rate
from .lamb import LAMB
from .lars import LARS
from .largebatch import LRMethod, make_lr_method
from .schedules import make_schedule
from .sgd import SGD

OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adamw": AdamW, "lars": LARS, "lamb": LAMB}


def make_optimizer(name: str, layers: Sequence[Layer], **kw) -> Optimizer:
    """The optimizer called `name` over `layers`; `kw` are its constructor's keywords."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](layers, **kw)


__all__ = ["AdamW", "LAMB", "LARS", "LRMethod", "OPTIMIZERS", "Optimizer", "Rate", "SGD", "make_lr_method",
           "make_optimizer", "make_schedule"]

"""The same architectures in PyTorch, with hpdl's initial weights: the baseline of every comparison."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hpdl.layers import GELU, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU
from hpdl.models import Model


def torch_model(model: Model, params: list[dict]) -> nn.Sequential:
    """A torch.nn.Sequential computing exactly what `model` computes with `params`."""
    mods: list[nn.Module] = []
    for layer, p in zip(model.layers, params):
        if isinstance(layer, Linear):
            m = nn.Linear(layer.n_in, layer.n_out)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(np.ascontiguousarray(p["W"].T)))
                m.bias.copy_(torch.from_numpy(p["b"]))
        elif isinstance(layer, Conv2d):
            m = nn.Conv2d(layer.c_in, layer.c_out, layer.k, layer.stride, layer.pad, bias=layer.bias)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(p["W"]))
                if layer.bias:
                    m.bias.copy_(torch.from_numpy(p["b"]))
        elif isinstance(layer, ReLU):
            m = nn.ReLU()
        elif isinstance(layer, GELU):
            m = nn.GELU(approximate="tanh")
        elif isinstance(layer, MaxPool2d):
            m = nn.MaxPool2d(layer.k, layer.stride)
        elif isinstance(layer, Flatten):
            m = nn.Flatten()
        elif isinstance(layer, Dropout):
            m = nn.Dropout(layer.p)
        else:
            raise ValueError(f"no PyTorch twin for {type(layer).__name__}")
        mods.append(m)
    return nn.Sequential(*mods)

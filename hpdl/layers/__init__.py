"""Layers: pure forward/backward pairs over flat parameter dicts, and the loss."""
from .activation import GELU, ReLU
from .base import EVAL, TRAIN, Cache, Layer, Mode, Params
from .conv import Conv2d, col2im, im2col
from .dropout import Dropout
from .linear import Linear
from .loss import accuracy, softmax_cross_entropy_backward, softmax_cross_entropy_forward
from .norm import BatchNorm, LayerNorm
from .pool import GlobalAvgPool, MaxPool2d
from .residual import Residual
from .shape import Flatten

__all__ = [
    "Layer", "Mode", "TRAIN", "EVAL", "Params", "Cache",
    "Linear", "ReLU", "GELU", "Conv2d", "MaxPool2d", "GlobalAvgPool", "Dropout",
    "LayerNorm", "BatchNorm", "Flatten", "Residual", "im2col", "col2im",
    "softmax_cross_entropy_forward", "softmax_cross_entropy_backward", "accuracy",
]

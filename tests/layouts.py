"""(N, C, ...) arrays stored in the layouts that hpdl's layers hand each other, for the kernels' layout tests."""
from __future__ import annotations

# nchw: C order; batch_inner: (C, ..., N) in memory, as conv and pooling store their outputs;
# nhwc: channels innermost, a layout no hpdl layer writes (the kernels must still take it).
LAYOUTS = ("nchw", "batch_inner", "nhwc")


def stored(a, layout: str):
    """a's values as an (N, C, ...) view of memory in `layout`, on a's device (NumPy or CuPy)."""
    from hpdl.backend import array_module
    xp = array_module(a)
    if layout == "nchw":
        return xp.ascontiguousarray(a)
    order = {"batch_inner": (*range(1, a.ndim), 0), "nhwc": (0, *range(2, a.ndim), 1)}[layout]
    inverse = tuple(order.index(i) for i in range(a.ndim))
    return xp.ascontiguousarray(a.transpose(order)).transpose(inverse)


def expected_layout(layout: str) -> str:
    """The layout a BatchNorm kernel writes for an input in `layout`: its own, or C order for one
    the kernels cannot walk per channel."""
    return "nchw" if layout == "nhwc" else layout

"""Kernel launches per GPU training step, counted without a GPU on tests/fakegpu's stand-in for CuPy.

    PYTHONPATH=tests/fakegpu python -m benchmarks.launches [--models mlp,mlp-gelu,cnn,resnet]

Where Python launch overhead dominates a small model's GPU step, the number of launches is
the cost to cut: each hpdl.kernels launch and each CuPy array operation (a ufunc, a
reduction, a product, a zero fill, an assignment into a slice, a copy to C order or to the
device) is one; allocations without a fill are not counted. This counts them for one step of
loss_and_grads and SGD momentum with the gradient check on the device, as hpdl.train runs a
float32 GPU step, and times nothing: the stand-in runs on the CPU.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

import numpy as np

from benchmarks.common import REPORTS, grouped_bars, markdown_table, write_report
from hpdl.models import build_model

BATCH = 32
ALLOCATIONS = {"empty", "empty_like"}   # memory from CuPy's pool: no kernel launch, not counted
VARIANTS = {"mlp-gelu": ("mlp", {"activation": "gelu"})}   # a builder's options under a name of their own


def model_of(name: str):
    """build_model(name), or the builder and options a VARIANTS name stands for."""
    base, options = VARIANTS.get(name, (name, {}))
    return build_model(base, **options)


def count_step(cp, model_name: str, batch: int = BATCH) -> tuple[Counter, Counter]:
    """(kernels, array operations) of the second of two training steps (the first builds state)."""
    from hpdl.backend import Backend
    from hpdl.optim import make_optimizer
    from hpdl.trainer import loss_and_grads
    ops: Counter = Counter()
    model = model_of(model_name)
    backend = Backend("gpu", "float32")
    params = model.init(0, xp=backend.xp, dtype=backend.dtype)
    opt = make_optimizer("sgd", model.layers, momentum=0.9)
    opt.check_on_device()
    x = backend.asarray(np.random.default_rng(0).standard_normal((batch, *model.in_shape)).astype(np.float32))
    y = cp.asarray(np.arange(batch) % 10)
    with counting(cp, ops):
        for step in range(2):
            ops.clear()
            cp.launches.clear()
            _, grads = loss_and_grads(model.layers, params, x, y, (0,))
            opt.step(params, grads, 0.01)
    return Counter(cp.launches), ops


class counting:
    """Inside, every array operation on the stand-in's arrays and module counts in `ops` by name."""

    def __init__(self, cp, ops: Counter):
        self.cp, self.ops = cp, ops

    def __enter__(self):
        cp, ops = self.cp, self.ops
        self.saved = (cp.ndarray.__array_ufunc__, cp.ndarray.__array_function__, cp.ndarray.__setitem__,
                      cp._device, cp.asarray, cp.ascontiguousarray)
        ufunc, function, setitem, device, asarray, contiguous = self.saved

        def counted_ufunc(array, op, method, *inputs, **kwargs):
            ops[op.__name__ if method == "__call__" else f"{op.__name__}.{method}"] += 1
            return ufunc(array, op, method, *inputs, **kwargs)

        def counted_function(array, func, types, args, kwargs):
            ops[func.__name__] += 1
            return function(array, func, types, args, kwargs)

        def counted_setitem(array, key, value):
            ops["setitem (a copy or fill)"] += 1
            return setitem(array, key, value)

        def counted_device(fn):
            inner = device(fn)
            if fn.__name__ in ALLOCATIONS:
                return inner

            def call(*args, **kwargs):
                ops[fn.__name__] += 1
                return inner(*args, **kwargs)
            return call

        def counted_asarray(*args, **kwargs):
            ops["asarray (host to device)"] += 1
            return asarray(*args, **kwargs)

        def counted_contiguous(a, *args, **kwargs):
            if not a.flags.c_contiguous:
                ops["ascontiguousarray (a copy)"] += 1
            return contiguous(a, *args, **kwargs)

        cp.ndarray.__array_ufunc__, cp.ndarray.__array_function__ = counted_ufunc, counted_function
        cp.ndarray.__setitem__ = counted_setitem
        cp._device, cp.asarray, cp.ascontiguousarray = counted_device, counted_asarray, counted_contiguous

    def __exit__(self, *exc):
        cp = self.cp
        (cp.ndarray.__array_ufunc__, cp.ndarray.__array_function__, cp.ndarray.__setitem__, cp._device,
         cp.asarray, cp.ascontiguousarray) = self.saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,mlp-gelu,cnn,resnet",
                    help=f"models, or variants: {', '.join(f'{k} ({v[0]} {v[1]})' for k, v in VARIANTS.items())}")
    args = ap.parse_args()
    try:
        import cupy as cp
        cp.launches   # only the stand-in counts its kernel launches
    except (ImportError, AttributeError):
        print("benchmarks.launches counts on tests/fakegpu's stand-in for CuPy: run it with "
              "PYTHONPATH=tests/fakegpu", file=sys.stderr)
        return 2
    try:
        names = args.models.split(",")
        for name in names:
            model_of(name)
    except ValueError as e:
        print(f"benchmarks.launches: {e}, or a variant: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    rows, data = [], {}
    for name in names:
        kernels, ops = count_step(cp, name)
        rows.append([name, sum(kernels.values()), sum(ops.values()), ops["matmul"],
                     ", ".join(f"{k} {v}" for k, v in sorted(kernels.items())),
                     ", ".join(f"{k} {v}" for k, v in ops.most_common(6))])
        data[name] = {"kernels": dict(kernels), "array_ops": dict(ops)}
        print(f"{name}: {rows[-1][1]} hpdl kernels, {rows[-1][2]} array operations", flush=True)
    grouped_bars(REPORTS / "launches.png", names,
                 {label: [sum(data[n][key].values()) for n in names]
                  for label, key in (("hpdl kernels", "kernels"), ("CuPy array operations", "array_ops"))},
                 "launches per training step")
    body = ("Run with `PYTHONPATH=tests/fakegpu`. One float32 training step (loss_and_grads, then SGD "
            f"momentum with the gradient check on the device), batch {BATCH}, counted on tests/fakegpu's "
            "stand-in for CuPy: each is one kernel launch (or copy) on a GPU; bare allocations are not counted. "
            "Nothing is timed.\n\n"
            + markdown_table(["model", "hpdl kernels", "CuPy array operations", "of which products",
                              "hpdl kernels by name", "most frequent array operations"], rows)
            + "\n\n![launches](launches.png)")
    print(write_report("launches", "Kernel launches per GPU training step", body, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

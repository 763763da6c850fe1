"""GPU training samples/s of hpdl (CuPy) against PyTorch eager, matrix-product TFLOP/s, and each fused kernel's time.

Run on a CUDA machine with cupy installed (and a CUDA build of torch for the comparison):

    python -m benchmarks.gpu [--models mlp,cnn,resnet] [--batch-sizes 128,512,2048]

Both frameworks train the same architecture from the same initial weights on the same
synthetic batches (random images and labels: throughput does not depend on the pixels),
in float32 with TF32 off on both sides, one SGD-momentum step per batch.
"""
from __future__ import annotations

import argparse
import itertools
import signal
import sys
import time
from typing import Callable

import numpy as np

from benchmarks.common import REPORTS, alternate, grouped_bars, markdown_table, median, write_report
from hpdl.layers import BatchNorm, Conv2d, GlobalAvgPool, Layer, Linear, Residual
from hpdl.models import Model, build_model

# Dense float32 peak of the CUDA cores (no tensor cores: TF32 is off), TFLOP/s, from NVIDIA's
# datasheets; matched as a substring of the device name, most specific entry first.
FP32_PEAK_TFLOPS = [
    ("H200 NVL", 60.0), ("H200", 67.0), ("H100 NVL", 60.0), ("H100 PCIe", 51.0), ("H100", 67.0),
    ("GH200", 67.0), ("A100", 19.5), ("A10", 31.2), ("L40S", 91.6), ("L40", 90.5), ("L4", 30.3),
    ("V100", 15.7), ("T4", 8.1), ("RTX 4090", 82.6), ("RTX 3090", 35.6),
]
SEED = 0
N_BATCHES = 4   # distinct device-resident batches cycled through


def fp32_peak(name: str) -> float | None:
    """The device's float32 peak in TFLOP/s from the table, None when the name is not in it."""
    return next((peak for key, peak in FP32_PEAK_TFLOPS if key in name), None)


def matmul_flops(layers: list[Layer], in_shape: tuple[int, ...]) -> tuple[int, int]:
    """Forward FLOPs per sample of the matrix products (Linear, Conv2d, also inside residual
    blocks), and those of the first such layer, whose input gradient training skips."""
    total, first = 0, None
    shape = in_shape
    for layer in layers:
        if isinstance(layer, (Linear, Conv2d)):
            f = layer.flops(shape)
        elif isinstance(layer, Residual):
            f = sum(matmul_flops(part, shape)[0] for part in (layer.branch, layer.shortcut))
        else:
            f = 0
        if f and first is None:
            first = f
        total += f
        shape = layer.out_shape(shape)
    return total, first or 0


def train_flops(model: Model) -> int:
    """Matrix-product FLOPs of one training step per sample: forward, dW, and dx but the first."""
    fwd, first = matmul_flops(model.layers, model.in_shape)
    return 3 * fwd - first


def synthetic_batches(model: Model, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(SEED)
    return [(rng.standard_normal((batch, *model.in_shape)).astype(np.float32),
             rng.integers(0, 10, batch).astype(np.int64)) for _ in range(N_BATCHES)]


def hpdl_runner(model: Model, batches, steps: int, host_share: list[float] | None = None) -> Callable[[], float]:
    """Samples/s of hpdl's own step on the --device gpu backend: trainer.loss_and_grads, then SGD
    momentum with the gradient check on the device, as hpdl.train runs it on a GPU.

    `host_share` gets, per run, the fraction of the wall time the host took to queue the steps:
    near 1 the GPU waits for Python's launches (where CUDA graphs or batched kernels would pay),
    well below 1 the host runs ahead and the GPU's own work sets the pace.
    """
    from hpdl.backend import Backend
    from hpdl.optim import make_optimizer
    from hpdl.trainer import loss_and_grads
    backend = Backend("gpu", "float32")
    params = model.init(SEED, xp=backend.xp, dtype=backend.dtype)
    opt = make_optimizer("sgd", model.layers, momentum=0.9)
    opt.check_on_device()
    dev = [(backend.asarray(x), backend.xp.asarray(y)) for x, y in batches]
    cycle = itertools.cycle(dev)

    def run() -> float:
        backend.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y = next(cycle)
            _, grads = loss_and_grads(model.layers, params, x, y, (0,))
            opt.step(params, grads, 0.01)
        queued = time.perf_counter()
        opt.settle()
        backend.synchronize()
        wall = time.perf_counter() - t0
        if host_share is not None:
            host_share.append((queued - t0) / wall)
        return steps * len(dev[0][1]) / wall
    return run


def torch_twin(torch, layers: list[Layer], params: list[dict]):
    """torch_models.torch_model extended to BatchNorm, residual blocks and global pooling."""
    from torch import nn

    from benchmarks.torch_models import torch_model

    class TorchResidual(nn.Module):
        def __init__(self, branch, shortcut, post):
            super().__init__()
            self.branch, self.shortcut, self.post = branch, shortcut, post

        def forward(self, x):
            return self.post(self.branch(x) + self.shortcut(x))

    mods = []
    for layer, p in zip(layers, params):
        if isinstance(layer, BatchNorm):
            m = nn.BatchNorm2d(layer.c, eps=layer.eps, momentum=layer.momentum)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(p["gamma"]))
                m.bias.copy_(torch.from_numpy(p["beta"]))
        elif isinstance(layer, Residual):
            def part(tag: str, p=p) -> dict:   # the sub-layer's parameters: "s0.W" -> "W" for "s0"
                return {k[len(tag) + 1:]: v for k, v in p.items() if k.startswith(tag + ".")}
            branch = torch_twin(torch, layer.branch, [part(str(i)) for i in range(len(layer.branch))])
            shortcut = (torch_twin(torch, layer.shortcut, [part(f"s{i}") for i in range(len(layer.shortcut))])
                        if layer.shortcut else nn.Identity())
            post = torch_twin(torch, [layer.post], [{}]) if layer.post is not None else nn.Identity()
            m = TorchResidual(branch, shortcut, post)
        elif isinstance(layer, GlobalAvgPool):
            m = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            m = torch_model(Model("one layer", [layer]), [p])[0]
        mods.append(m)
    return nn.Sequential(*mods)


def torch_runner(torch, model: Model, batches, steps: int) -> Callable[[], float]:
    from benchmarks.single_process import torch_runner as timed_steps
    return timed_steps(torch_twin(torch, model.layers, model.init(SEED)).cuda(), batches, steps, "cuda")


def gemm_tflops(cp, n: int = 8192, repeats: int = 10) -> float:
    """TFLOP/s of one large float32 cuBLAS product: the ceiling the models' products could reach."""
    a = cp.random.standard_normal((n, n), dtype=cp.float32)
    b = cp.random.standard_normal((n, n), dtype=cp.float32)
    a @ b
    cp.cuda.get_current_stream().synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    cp.cuda.get_current_stream().synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e12


# ---- per-kernel timings: each fused kernel against the CuPy code it would replace ----------

def kernel_cases(cp) -> list[tuple[str, str, Callable[[], object], Callable[[], object]]]:
    """(kernel, shape, fused call, plain CuPy call) pairs at sizes of this repo's models and beyond.

    The plain calls are the `*_ref` oracles run on CuPy arrays (the same operations as
    hpdl's optimizers and layers, tests/unit/test_kernel_oracles.py), hpdl.layers.conv's
    im2col_xp/col2im_xp (its array-operation path, on its batch-innermost layout), and a
    dot product read back to the host per tensor (as LARS and LENA took norms before
    sum_squares, with a host sync each).
    """
    from hpdl import kernels as k
    from hpdl.layers.conv import col2im_xp, im2col_xp, nchw

    cp.random.seed(SEED)

    def randn(*shape):
        return cp.random.standard_normal(shape, dtype=cp.float32)

    cases = []
    for n in (10_000, 1_000_000, 16_000_000):
        w, g, buf, w2, buf2 = randn(n), randn(n) * 1e-3, randn(n), randn(n), randn(n)
        cases.append(("sgd_update (momentum, wd)", f"{n:,}",
                      lambda w=w, g=g, b=buf: k.sgd_update([w], [g], [1e-3], [1e-4], 0.9, False, [b], [False]),
                      lambda w=w2, g=g, b=buf2: k.sgd_update_ref([w], [g], [1e-3], [1e-4], 0.9, False, [b], [False])))
        m, v, m2, v2 = (cp.zeros(n, cp.float32) for _ in range(4))
        cases.append(("adamw_update", f"{n:,}",
                      lambda w=w, g=g, m=m, v=v: k.adamw_update([w], [g], [m], [v], [1e-4], 10, [0.01]),
                      lambda w=w2, g=g, m=m2, v=v2: k.adamw_update_ref([w], [g], [m], [v], [1e-4], 10, [0.01])))
    for name in ("mlp", "cnn", "resnet"):
        # A model's whole update in one launch, against the same kernel launched once per tensor.
        model = build_model(name)
        ws = [p[t] for layer, p in zip(model.layers, model.init(SEED, xp=cp, dtype=np.float32))
              for t in layer.trainable]
        gs, bufs, rates, T = [randn(*w.shape) * 1e-3 for w in ws], [randn(*w.shape) for w in ws], [1e-3], len(ws)
        cases.append(("sgd_update, batched vs per tensor", f"{name}: {T} tensors",
                      lambda ws=ws, gs=gs, bs=bufs, T=T: k.sgd_update(ws, gs, rates * T, [0.0] * T, 0.9, False,
                                                                     bs, [False] * T),
                      lambda ws=ws, gs=gs, bs=bufs: [k.sgd_update([w], [g], rates, [0.0], 0.9, False, [b], [False])
                                                     for w, g, b in zip(ws, gs, bs)]))
    for n in (200_000, 4_000_000):
        w, bak, g, ms, w2, bak2, ms2 = (randn(n) for _ in range(7))
        ms, ms2, g = cp.abs(ms), cp.abs(ms2), g * 1e-3
        cases.append(("dcasgd_update (adaptive)", f"{n:,}",
                      lambda w=w, b=bak, g=g, ms=ms: k.dcasgd_update(w, b, g, 1e-3, 2.0, ms, 0.95, 1e-7),
                      lambda w=w2, b=bak2, g=g, ms=ms2: k.dcasgd_update_ref(w, b, g, 1e-3, 2.0, ms, 0.95, 1e-7)))
        center, x, center2 = randn(n), randn(n), randn(n)
        cases.append(("easgd_elastic", f"{n:,}", lambda c=center, x=x: k.easgd_elastic(c, x, 0.1),
                      lambda c=center2, x=x: k.easgd_elastic_ref(c, x, 0.1)))
    for rows, n in ((4096, 1024), (65536, 64)):
        x, gamma, beta, dy = randn(rows, n), randn(n), randn(n), randn(rows, n)
        _, xhat, rstd = k.layernorm_forward(x, gamma, beta)
        cases.append(("layernorm_forward", f"{rows}x{n}", lambda x=x, ga=gamma, b=beta: k.layernorm_forward(x, ga, b),
                      lambda x=x, ga=gamma, b=beta: k.layernorm_forward_ref(x, ga, b)))
        cases.append(("layernorm_backward", f"{rows}x{n}",
                      lambda d=dy, h=xhat, r=rstd, ga=gamma: k.layernorm_backward(d, h, r, ga),
                      lambda d=dy, h=xhat, r=rstd, ga=gamma: k.layernorm_backward_ref(d, h, r, ga)))
    bn_shapes = ((128, 16, 28, 28), (512, 64, 7, 7), (2048, 32, 14, 14))
    for shape, layout in itertools.product(bn_shapes, ("", " (conv layout)")):
        c = shape[1]
        # NCHW, or NCHW views of the batch-innermost memory a convolution hands BatchNorm in a resnet
        x, dy = ((nchw(randn(*shape[1:], shape[0])) for _ in range(2)) if layout else (randn(*shape), randn(*shape)))
        gamma, beta = randn(c), randn(c)
        rm, rv = cp.zeros(c, cp.float32), cp.ones(c, cp.float32)
        _, xhat, rstd = k.batchnorm_forward(x, gamma, beta, rm, rv)
        label = "x".join(map(str, shape))
        cases.append(("batchnorm_forward" + layout, label,
                      lambda x=x, ga=gamma, b=beta, m=rm, v=rv: k.batchnorm_forward(x, ga, b, m, v),
                      lambda x=x, ga=gamma, b=beta, m=rm, v=rv: k.batchnorm_forward_ref(x, ga, b, m, v)))
        cases.append(("batchnorm_backward" + layout, label,
                      lambda d=dy, h=xhat, r=rstd, ga=gamma: k.batchnorm_backward(d, h, r, ga),
                      lambda d=dy, h=xhat, r=rstd, ga=gamma: k.batchnorm_backward_ref(d, h, r, ga)))
    for n, c, hw, kk, s, pad in ((128, 1, 28, 3, 1, 1), (128, 32, 14, 3, 1, 1), (512, 32, 14, 3, 2, 1)):
        x = nchw(randn(c, hw, hw, n))   # batch-innermost, as conv and pooling layers hand it on
        cols_t = k.im2col(x, kk, s, pad, batched=False)
        label = f"{n}x{c}x{hw}x{hw} k{kk} s{s}"
        cases.append(("im2col", label, lambda x=x, kk=kk, s=s, p=pad: k.im2col(x, kk, s, p, batched=False),
                      lambda x=x, kk=kk, s=s, p=pad: im2col_xp(x, kk, s, p)))
        cases.append(("col2im", label,
                      lambda c=cols_t, sh=x.shape, kk=kk, s=s, p=pad: k.col2im(c, sh, kk, s, p, batch_inner=True),
                      lambda c=cols_t, sh=x.shape, kk=kk, s=s, p=pad: col2im_xp(c, sh, kk, s, p)))
    for sizes in ((16, 144, 16, 16, 4608, 32, 32, 9216, 64, 640, 10), (1_000_000,) * 8):
        tensors = [randn(n) for n in sizes]
        cases.append(("sum_squares", f"{len(sizes)} tensors, {sum(sizes):,} values",
                      lambda t=tensors: k.sum_squares(t), lambda t=tensors: [float(cp.vdot(a, a)) for a in t]))
        flag, ref_flag = cp.zeros(1, cp.float32), cp.zeros(1, cp.float32)
        cases.append(("any_nonfinite", f"{len(sizes)} tensors, {sum(sizes):,} values",
                      lambda t=tensors, f=flag: k.any_nonfinite(t, f),
                      lambda t=tensors, f=ref_flag: k.any_nonfinite_ref(t, f)))
    for rows, n in ((128, 1024), (2048, 4096)):
        x, b, dy = randn(rows, n), randn(n), randn(rows, n)
        cases.append(("bias_relu_forward", f"{rows}x{n}", lambda x=x, b=b: k.bias_relu_forward(x, b),
                      lambda x=x, b=b: k.bias_relu_forward_ref(x, b)))
        cases.append(("bias_gelu_forward", f"{rows}x{n}", lambda x=x, b=b: k.bias_gelu_forward(x, b),
                      lambda x=x, b=b: k.bias_gelu_forward_ref(x, b)))
        cases.append(("bias_gelu_backward", f"{rows}x{n}", lambda u=x, d=dy: k.bias_gelu_backward(u, d),
                      lambda u=x, d=dy: k.bias_gelu_backward_ref(u, d)))
    for shape in ((128, 32, 28, 28), (512, 64, 14, 14)):
        # Max pooling and ReLU on a convolution's output: NCHW views of batch-innermost memory.
        x, label = nchw(randn(*shape[1:], shape[0])), "x".join(map(str, shape))
        _, win = k.maxpool_forward(x, 2)
        g = nchw(randn(shape[1], shape[2] // 2, shape[3] // 2, shape[0]))
        cases.append(("maxpool_forward 2x2", label, lambda x=x: k.maxpool_forward(x, 2),
                      lambda x=x: k.maxpool_forward_ref(x, 2)))
        cases.append(("maxpool_backward 2x2", label, lambda g=g, w=win, s=x.shape: k.maxpool_backward(g, w, s, 2),
                      lambda g=g, w=win, s=x.shape: k.maxpool_backward_ref(g, w, s, 2)))
        y, dy = (nchw(randn(*shape[1:], shape[0])) for _ in range(2))
        cases.append(("relu_forward (conv layout)", label, lambda x=y: k.relu_forward(x), lambda x=y: x * (x > 0)))
        cases.append(("bias_relu_backward (conv layout)", label,
                      lambda y=y, d=dy: k.bias_relu_backward(y, d), lambda y=y, d=dy: k.bias_relu_backward_ref(y, d)))
    for rows, n in ((128, 10), (2048, 1000)):
        logits, labels = randn(rows, n), cp.asarray(np.random.default_rng(SEED).integers(0, n, rows))
        cases.append(("softmax_xent", f"{rows}x{n}", lambda z=logits, y=labels: k.softmax_xent(z, y),
                      lambda z=logits, y=labels: k.softmax_xent_ref(z, y)))
    return cases


def per_call_us(cp, fn: Callable[[], object], calls: int) -> Callable[[], float]:
    """A run timing `calls` back-to-back calls, synchronized at both ends: microseconds per call,
    which counts Python and launch overhead as well as GPU time, as a training step feels them."""
    stream = cp.cuda.get_current_stream()

    def run() -> float:
        stream.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        stream.synchronize()
        return (time.perf_counter() - t0) / calls * 1e6
    return run


def bench_kernels(cp, calls: int, repeats: int, rows: list[list], data: dict) -> None:
    """Time each kernel case into `rows` (the report's) and `data` (raw), one case at a time."""
    for name, shape, fused, plain in kernel_cases(cp):
        fused(), plain()   # compile the kernel (NVRTC) and warm CuPy's own kernel cache
        res = alternate({"fused": per_call_us(cp, fused, calls), "cupy": per_call_us(cp, plain, calls)}, repeats)
        f, c = median(res["fused"]), median(res["cupy"])
        rows.append([name, shape, f"{f:.1f}", f"{c:.1f}", f"{c / f:.2f}"])
        data[f"{name} {shape}"] = res
        print(f"{name} {shape}: fused {f:.1f} us, cupy {c:.1f} us, speed-up {c / f:.2f}", flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt   # `timeout` and Slurm end a run with SIGTERM: stop as on Ctrl-C


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,cnn,resnet")
    ap.add_argument("--batch-sizes", default="128,512,2048")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats; the median is reported")
    ap.add_argument("--kernel-calls", type=int, default=50, help="calls per timed kernel repeat")
    ap.add_argument("--skip-training", action="store_true", help="only the per-kernel timings")
    ap.add_argument("--skip-kernels", action="store_true", help="only the training comparison")
    args = ap.parse_args()
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        models = [build_model(m) for m in args.models.split(",")]
    except ValueError as e:
        print(f"benchmarks.gpu: {e}", file=sys.stderr)
        return 2
    try:
        import cupy as cp
        name = cp.cuda.runtime.getDeviceProperties(0)["name"]
    except Exception as e:  # no cupy, no driver or no device: CuPy raises its own errors
        print(f"benchmarks.gpu needs cupy and a CUDA device ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    device = name.decode() if isinstance(name, bytes) else str(name)
    peak = fp32_peak(device)
    try:
        import torch
        torch_ok = torch.cuda.is_available()
    except ImportError:
        torch, torch_ok = None, False
    if torch_ok:
        # Same precision as hpdl's float32 CuPy products (cuBLAS without TF32 unless CUPY_TF32=1).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    print(f"device {device}, float32 peak {peak or 'unknown'} TFLOP/s, torch CUDA {torch_ok}", flush=True)

    # Stopped early (SIGTERM, Ctrl-C), the report still holds every row measured until then.
    signal.signal(signal.SIGTERM, _interrupt)
    stopped = False
    sections, data = [], {"device": device, "fp32_peak_tflops": peak}
    if not args.skip_training:
        ceiling, rows, throughput, host_shares = None, [], {}, {}
        flops_per_sample = {m.name: train_flops(m) for m in models}
        try:
            ceiling = gemm_tflops(cp)
            for model, batch in itertools.product(models, batch_sizes):
                flops = flops_per_sample[model.name]
                batches = synthetic_batches(model, batch)
                share: list[float] = []
                runs = {"hpdl": hpdl_runner(model, batches, args.steps, share)}
                if torch_ok:
                    runs["torch"] = torch_runner(torch, model, batches, args.steps)
                for run in runs.values():   # warm-up: kernel compilation, cuBLAS/cuDNN handles, pools
                    run()
                res = alternate(runs, args.repeats)
                h = median(res["hpdl"])
                t = median(res["torch"]) if torch_ok else None
                tflops_h = flops * h / 1e12
                rows.append([model.name, batch, f"{h:.0f}", f"{t:.0f}" if t else "n/a",
                             f"{h / t:.2f}" if t else "n/a", f"{tflops_h:.2f}",
                             f"{flops * t / 1e12:.2f}" if t else "n/a",
                             f"{100 * tflops_h / peak:.1f}%" if peak else "peak unknown",
                             f"{100 * median(share[1:]):.0f}%"])   # the warm-up run left out
                throughput[f"{model.name} b{batch}"] = res
                host_shares[f"{model.name} b{batch}"] = share[1:]
                print(f"{model.name} batch {batch}: hpdl {h:.0f}/s, torch {t and round(t)}/s", flush=True)
        except KeyboardInterrupt:
            stopped = True
        labels = list(throughput)
        if labels:
            grouped_bars(REPORTS / "gpu.png", labels,
                         {impl: [median(throughput[lab][impl]) if throughput[lab].get(impl) else 0 for lab in labels]
                          for impl in ("hpdl", "torch")}, "training samples/s", log=True, rotate=True)
        data.update(samples_per_s=throughput, hpdl_host_share=host_shares, gemm_ceiling_tflops=ceiling,
                    train_matmul_flops_per_sample=flops_per_sample)
        sections.append(
            f"## Training throughput\n\nSGD momentum 0.9, float32 (TF32 off), synthetic MNIST-shaped batches, "
            f"median of {args.repeats} alternating repeats of {args.steps} steps after one warm-up repeat. "
            f"TFLOP/s counts the matrix products only (Linear and Conv2d: forward, dW, and dx except the "
            f"first layer's) over the whole step time. Device float32 peak: "
            + (f"{peak} TFLOP/s (datasheet table in benchmarks/gpu.py); " if peak
               else f"unknown ({device} is not in the table in benchmarks/gpu.py); ") +
            (f"one 8192^3 float32 cuBLAS product reaches {ceiling:.1f} TFLOP/s here. " if ceiling else "") +
            "Host share: the fraction of hpdl's step time the host spent queueing the steps; near 100% "
            "the GPU waits on Python's kernel launches (where CUDA graphs or batched kernels would pay), "
            "well below it the GPU's own work sets the pace."
            + ("" if torch_ok else "\n\nPyTorch has no CUDA here: its columns are not measured.") + "\n\n"
            + markdown_table(["model", "batch", "hpdl samples/s", "PyTorch samples/s", "hpdl / PyTorch",
                              "hpdl TFLOP/s", "PyTorch TFLOP/s", "hpdl % of peak", "hpdl host share"], rows)
            + "\n\n![throughput](gpu.png)")
    if not args.skip_kernels and not stopped:
        rows, kdata = [], {}
        try:
            bench_kernels(cp, args.kernel_calls, args.repeats, rows, kdata)
        except KeyboardInterrupt:
            stopped = True
        data["kernel_us"] = kdata
        sections.append(
            "## Fused kernels against the CuPy code they would replace\n\n"
            f"Microseconds per call (median of {args.repeats} alternating repeats of {args.kernel_calls} "
            "back-to-back calls, synchronized at both ends: launch overhead included). Plain CuPy: the "
            "kernel's `*_ref` oracle on CuPy arrays (the optimizers' and layers' own operations), "
            "conv's im2col_xp/col2im_xp, and one dot product read back per tensor; for \"batched vs per "
            "tensor\", the same update kernel launched once per tensor of the model, which measures what "
            "batching a model's update into one launch saves.\n\n"
            + markdown_table(["kernel", "size", "fused us", "CuPy us", "speed-up"], rows))
    if stopped:
        sections.insert(0, "**Stopped early** (SIGTERM or Ctrl-C): the tables hold what was measured until then.")
    print(write_report("gpu", f"GPU: hpdl (CuPy) vs PyTorch eager on {device}", "\n\n".join(sections), data))
    return 1 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())

"""Training samples/s of hpdl's mlp and cnn against the same models in PyTorch CPU, same run."""
from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from benchmarks.common import REPORTS, alternate, grouped_bars, markdown_table, median, write_report
from benchmarks.torch_models import torch_model
from hpdl.data import Loader
from hpdl.hostmem import keep_freed_memory
from hpdl.layers import EVAL
from hpdl.models import build_model
from hpdl.optim import make_optimizer
from hpdl.threads import RowThreads, row_blocks
from hpdl.trainer import loss_and_grads


def hpdl_runner(model, params, batches, steps: int, threads: int):
    """Samples/s of `steps` SGD steps of hpdl's step with `threads` threads, shared as hpdl.train shares them
    (and with host memory kept for reuse, as hpdl.train keeps it)."""
    keep_freed_memory()
    opt = make_optimizer("sgd", model.layers, momentum=0.9)
    cycle = itertools.cycle(batches)
    rows = RowThreads(row_blocks("auto", model.layers, threads))

    def run() -> float:
        with threadpool_limits(threads), rows.blas_limit():
            t0 = time.perf_counter()
            for _ in range(steps):
                x, y = next(cycle)
                _, grads = loss_and_grads(model.layers, params, x, y, (0,), threads=rows)
                opt.step(params, grads, 0.01)
            return steps * len(batches[0][1]) / (time.perf_counter() - t0)
    return run


def torch_runner(net, batches, steps: int, device: str = "cpu"):
    """Samples/s of `steps` SGD steps of `net` on `device` ("cpu" or "cuda", waited for at both ends)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    tbatches = [(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)) for x, y in batches]
    cycle = itertools.cycle(tbatches)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run() -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y = next(cycle)
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            opt.step()
        sync()
        return steps * len(tbatches[0][1]) / (time.perf_counter() - t0)
    return run


def layer_profile(model, params, x, repeats: int = 5) -> list[tuple[str, float, float]]:
    """Forward and backward milliseconds of each hpdl layer, to show where the time goes."""
    rows = []
    for layer, p in zip(model.layers, params):
        fwd = bwd = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            y, cache = layer.forward(p, x)
            t1 = time.perf_counter()
            layer.backward(p, cache, np.ones_like(y))
            t2 = time.perf_counter()
            fwd, bwd = min(fwd, t1 - t0), min(bwd, t2 - t1)
        rows.append((type(layer).__name__, fwd * 1e3, bwd * 1e3))
        x, _ = layer.forward(p, x, EVAL)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default="data/mnist.h5")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loader = Loader(args.data, "train", args.batch_size, seed=0)
    batches = [(x.copy(), y.copy()) for x, y in itertools.islice(loader.epoch(0), 8)]
    rows, data, profiles = [], {}, []
    with threadpool_limits(args.threads):
        for name in args.models.split(","):
            model = build_model(name)
            params = model.init(0)
            net = torch_model(model, [{k: v.copy() for k, v in p.items()} for p in params])
            runs = {"hpdl": hpdl_runner(model, params, batches, args.steps, args.threads),
                    "torch": torch_runner(net, batches, args.steps)}
            for run in runs.values():  # warm-up: first-touch allocations, BLAS thread start
                run()
            res = alternate(runs, args.repeats)
            h, t = median(res["hpdl"]), median(res["torch"])
            rows.append([name, f"{h:.0f}", f"{t:.0f}", f"{h / t:.2f}"])
            data[name] = res
            prof = layer_profile(model, params, batches[0][0])
            profiles.append(f"### {name}: hpdl per layer, batch {args.batch_size} (ms)\n\n" + markdown_table(
                ["layer", "forward", "backward"], [[n, f"{f:.2f}", f"{b:.2f}"] for n, f, b in prof]))
            print(f"{name}: hpdl {h:.0f} samples/s, torch {t:.0f} samples/s, ratio {h / t:.2f}", flush=True)
    names = list(data)
    grouped_bars(REPORTS / "single_process.png", names,
                 {impl: [median(data[n][impl]) for n in names] for impl in ("hpdl", "torch")}, "training samples/s")
    body = (f"Training throughput (forward, backward, SGD momentum update), batch {args.batch_size}, "
            f"{args.threads} threads, float32, median of {args.repeats} alternating repeats of "
            f"{args.steps} steps.\n\n"
            + markdown_table(["model", "hpdl samples/s", "PyTorch samples/s", "hpdl / PyTorch"], rows)
            + "\n\n![throughput](single_process.png)\n\n" + WHY + "\n\n" + "\n\n".join(profiles) + "\n")
    print(write_report("single_process", "Single process: hpdl vs PyTorch CPU", body, {"samples_per_s": data}))


WHY = """Both sides run in this one process, so both get the memory setting hpdl applies
(`hpdl/hostmem.py`: freed blocks kept for reuse instead of unmapped and page-faulted back in);
`benchmarks/reports/peers.md` compares them in separate processes, each as shipped. The mlp is
three matrix products per pass and NumPy hands them straight to OpenBLAS in float32; hpdl also
skips the input gradient of the first layer. The cnn's threads split each batch into row blocks
(`--thread-split auto`), because NumPy runs its element-wise and copy work on one core whatever
BLAS gets; its convolutions and pooling keep activations batch-innermost, and the second
convolution uses Winograd F(2x2, 3x3). The per-layer tables below are one thread, the whole
batch, minimum of 5 calls: the second convolution remains the largest single cost, and what is
not a matrix product (ReLU, pooling masks, the Winograd transforms) is memory traffic that
PyTorch's oneDNN kernels fuse."""


if __name__ == "__main__":
    main()

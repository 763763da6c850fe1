"""hpdl against PyTorch on the same machine: single process, DDP, pipelining, time to 98% accuracy."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.common import REPORTS, alternate, markdown_table, median, write_report
from hpdl.hostmem import MMAP_THRESHOLD_MAX, TRIM_THRESHOLD

MPIRUN = str(Path(sys.executable).parent / "mpirun")
TARGET_ACC = 0.98
WEIGHT_DECAY = 5e-4   # hpdl's default, on weights only (biases are in its no_decay)
LR = 0.05             # hpdl's default for the mlp, on both sides
WARMUP_STEPS = 3      # untimed steps before a single-process run's timed ones
LABELS = {"hpdl": "hpdl", "torch": "PyTorch", "hpdl_blas": "hpdl, OpenBLAS's own kernels"}
# Set on some machines (this one: Haswell) because older OpenBLAS builds fail on their CPUs;
# --native-blas removes both from hpdl's runs alone, so OpenBLAS picks its kernels itself.
PINNED_BLAS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


# ---- launching: every run is a fresh process (under mpirun when ranks > 1) ---------------

def launch(ranks: int, argv: list[str], threads: int, extra_env: dict[str, str | None] | None = None) -> dict:
    """Run `python ARGV` on `ranks` ranks and return the RESULT record it prints (None in
    `extra_env` removes that variable)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           **(extra_env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    cmd = [sys.executable, *argv]
    if ranks > 1:
        cmd = [MPIRUN, "-n", str(ranks), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd)} printed no RESULT line:\n{out.stdout[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def variants(args) -> dict[str, dict[str, str | None] | None]:
    """The sides of every pair: hpdl, PyTorch, and hpdl with OpenBLAS's own kernel choice when asked."""
    sides: dict[str, dict[str, str | None] | None] = {"hpdl": None, "torch": None}
    if args.native_blas:
        sides["hpdl_blas"] = dict.fromkeys(PINNED_BLAS)
    return sides


def blas_kernel(env: dict[str, str | None] | None) -> str:
    """The OpenBLAS kernel family NumPy runs under `env` (threadpoolctl's 'architecture')."""
    code = ("import numpy, threadpoolctl; print(next(i.get('architecture', '?') for i in "
            "threadpoolctl.threadpool_info() if i['internal_api'] == 'openblas'))")
    full = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full).stdout.strip()


def pair(args, hpdl: Callable[[dict | None], float], torch: Callable[[], float],
         repeats: int) -> dict[str, list[float]]:
    """Alternate the sides (A B A B ...), `repeats` runs each."""
    runs = {name: (torch if name == "torch" else (lambda env=env: hpdl(env)))
            for name, env in variants(args).items()}
    return alternate(runs, repeats)


def hpdl_cli(ranks: int, args, env: dict | None, *flags: str) -> float:
    """samples/s of one `python -m hpdl.train` run, one BLAS thread per rank."""
    res = launch(ranks, ["-m", "hpdl.train", "--no-progress", "--threads", "1", "--data", args.data,
                         "--poll", args.poll, "--lr", str(LR), *flags], 1, env)
    return res["samples_per_s"]


def worker_run(ranks: int, args, mode: str, threads: int, env: dict | None, *flags: str) -> dict:
    """One run of this module's --worker MODE (PyTorch's side, or hpdl's library in one process)."""
    return launch(ranks, ["-m", "benchmarks.peers", "--worker", mode, "--data", args.data,
                          "--threads", str(threads), *flags], threads, env)


# ---- workers: one process (one rank) of a run --------------------------------------------

def worker(args) -> None:
    if args.worker == "single":
        result = single_worker(args)
    elif args.worker == "race":
        result = race_worker(args)
    else:
        result = torch_distributed_worker(args)
    if result is not None:
        print("RESULT " + json.dumps(result), flush=True)


def single_worker(args) -> dict:
    """samples/s of one side in one process, after a warm-up run (benchmarks.single_process's runners)."""
    import torch
    from threadpoolctl import threadpool_limits

    from benchmarks.single_process import hpdl_runner, torch_runner
    from benchmarks.torch_models import torch_model
    from hpdl.data import Loader
    from hpdl.models import build_model

    torch.set_num_threads(args.threads)
    batches = [(x.copy(), y.copy()) for x, y in
               itertools.islice(Loader(args.data, "train", args.batch_size, seed=0).epoch(0), 8)]
    model = build_model(args.model)
    params = model.init(0)
    if args.impl == "hpdl":
        def runner(n: int):
            return hpdl_runner(model, params, batches, n, args.threads)
    else:
        net = torch_model(model, params)

        def runner(n: int):
            return torch_runner(net, batches, n)
    with threadpool_limits(args.threads):
        runner(WARMUP_STEPS)()   # first-touch allocations, thread pools
        return {"samples_per_s": runner(args.steps)()}


def torch_distributed_worker(args) -> dict | None:
    """One rank of a PyTorch run: DDP over gloo, or a torch.distributed.pipelining stage."""
    import torch
    import torch.distributed as dist

    from benchmarks.torch_models import torch_model
    from hpdl.data import Loader
    from hpdl.models import build_model
    from hpdl.optim import make_schedule
    from hpdl.pipeline.partition import balance, flop_costs, stage_bounds

    torch.set_num_threads(1)
    rank, world = int(os.environ.get("PMI_RANK", 0)), int(os.environ.get("PMI_SIZE", 1))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    model = build_model("mlp")
    full = torch_model(model, model.init(0))
    sched = make_schedule("cosine", LR, args.steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    if args.worker == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(full)
        opt = make_torch_sgd(full, LR)
        batches = Loader(args.data, "train", args.batch_size, replica=rank, replicas=world, seed=0).epoch(0)
        dist.barrier()
        t0 = time.perf_counter()
        for step in range(args.steps):
            x, y = next(batches)
            set_lr(opt, sched(step))
            opt.zero_grad(set_to_none=True)
            loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
            opt.step()
        elapsed = time.perf_counter() - t0
        reporter, samples = rank == 0, args.steps * args.batch_size * world
    else:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
        # The same FLOP-balanced cut as hpdl's --partition flops.
        a, b = stage_bounds(balance(flop_costs(model), world))[rank]
        part = torch.nn.Sequential(*list(full)[a:b])
        stage = PipelineStage(part, rank, world, torch.device("cpu"))
        kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[args.worker]
        # scale_grads (the default) divides the summed micro-batch gradients by their number:
        # the gradient of the mini-batch mean, as hpdl's loss weights give.
        schedule = kind(stage, args.microbatches, loss_fn=loss_fn)
        opt = make_torch_sgd(part, LR)
        first, last = rank == 0, rank == world - 1
        batches = Loader(args.data, "train", args.batch_size, seed=0).epoch(0) if first or last else None
        dist.barrier()
        t0 = time.perf_counter()
        for step in range(args.steps):
            x, y = next(batches) if batches is not None else (None, None)
            set_lr(opt, sched(step))
            opt.zero_grad(set_to_none=True)
            if first:
                schedule.step(torch.from_numpy(x))
            elif last:
                schedule.step(target=torch.from_numpy(y), losses=[])
            else:
                schedule.step()
            opt.step()
        elapsed = time.perf_counter() - t0
        reporter, samples = last, args.steps * args.batch_size
    dist.destroy_process_group()
    return {"samples_per_s": samples / elapsed, "train_s": elapsed} if reporter else None


def race_worker(args) -> dict:
    """Train the mlp until the test accuracy reaches 98%: training seconds, evaluations excluded."""
    import torch
    from threadpoolctl import threadpool_limits

    from benchmarks.torch_models import torch_model
    from hpdl.data import Loader
    from hpdl.models import build_model
    from hpdl.optim import make_optimizer, make_schedule
    from hpdl.hostmem import keep_freed_memory
    from hpdl.trainer import EVAL_BATCH, evaluate, loss_and_grads

    torch.set_num_threads(args.threads)
    model = build_model("mlp")
    train = Loader(args.data, "train", 128, seed=0)
    test = Loader(args.data, "test", EVAL_BATCH, shuffle=False, drop_last=False)
    total = args.acc_epochs * len(train)
    sched = make_schedule("cosine", LR, total)

    if args.impl == "hpdl":
        keep_freed_memory()  # as hpdl.train does
        params = model.init(0)
        opt = make_optimizer("sgd", model.layers, momentum=0.9, weight_decay=WEIGHT_DECAY)

        def step(k: int, x, y) -> None:
            _, grads = loss_and_grads(model.layers, params, x, y, (0, k))
            opt.step(params, grads, sched(k))

        def acc() -> float:
            return evaluate(model.layers, params, test)[1]
    else:
        net = torch_model(model, model.init(0))
        topt = make_torch_sgd(net, LR)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step(k: int, x, y) -> None:
            set_lr(topt, sched(k))
            topt.zero_grad(set_to_none=True)
            loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
            topt.step()

        def acc() -> float:
            correct = n = 0
            with torch.no_grad():
                for x, y in test.epoch(0):
                    correct += int((net(torch.from_numpy(x)).argmax(1) == torch.from_numpy(y)).sum())
                    n += len(y)
            return correct / n

    batches = (b for epoch in range(args.acc_epochs) for b in train.epoch(epoch))
    curve, elapsed = [], 0.0
    with threadpool_limits(args.threads):
        t0 = time.perf_counter()
        for k, (x, y) in enumerate(batches, start=1):
            step(k - 1, x, y)
            if k % args.eval_every == 0 or k == total:
                elapsed += time.perf_counter() - t0
                curve.append((elapsed, k, acc()))
                if curve[-1][2] >= TARGET_ACC:
                    break
                t0 = time.perf_counter()
    return {"curve": curve, "reached": curve[-1][2] >= TARGET_ACC, "seconds": curve[-1][0], "steps": curve[-1][1]}


def make_torch_sgd(net, lr: float):
    """torch.optim.SGD as hpdl's default run: momentum 0.9, weight decay on weights, none on biases."""
    import torch
    decay = [p for n, p in net.named_parameters() if not n.endswith("bias")]
    plain = [p for n, p in net.named_parameters() if n.endswith("bias")]
    return torch.optim.SGD([{"params": decay, "weight_decay": WEIGHT_DECAY},
                            {"params": plain, "weight_decay": 0.0}], lr=lr, momentum=0.9)


def set_lr(opt, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


# ---- the workloads ------------------------------------------------------------------------

def single_run(args, impl: str, model: str, env: dict | None) -> float:
    """samples/s of one single-process run of `impl` on `model`, batch 128, `--threads` threads."""
    return worker_run(1, args, "single", args.threads, env, "--impl", impl, "--model", model, "--batch-size", "128",
                      "--steps", str(args.sp_steps))["samples_per_s"]


def single_process(args) -> tuple[list[list], dict]:
    """1: one process, batch 128, `--threads` threads (hpdl's layers and optimizer from Python)."""
    rows, raw = [], {}
    for name in ("mlp", "cnn"):
        raw[name] = pair(args, lambda env: single_run(args, "hpdl", name, env),
                         lambda: single_run(args, "torch", name, None), args.repeats)
        rows.append(row(f"single process `{name}`, batch 128, {args.threads} threads", raw[name]))
        print(rows[-1], flush=True)
    return rows, raw


def allocator_check(args) -> tuple[list[list], dict]:
    """The single-process pairs again, PyTorch now run with the glibc malloc settings hpdl applies
    to itself (hpdl.hostmem): how much of hpdl's margin is its allocator setting."""
    env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_MAX), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
    rows, raw = [], {}
    for name in ("mlp", "cnn"):
        raw[name] = alternate({"hpdl": lambda: single_run(args, "hpdl", name, None),
                               "torch": lambda: single_run(args, "torch", name, env)}, args.repeats)
        rows.append(row(f"single process `{name}`, batch 128, {args.threads} threads", raw[name]))
        print("allocator check", rows[-1], flush=True)
    return rows, raw


def data_parallel(args) -> tuple[list[list], dict]:
    """2: hpdl `sync` against DDP (gloo), 2 ranks x 1 thread, batch 128 per rank."""
    steps = str(args.dp_steps)
    raw = pair(args, lambda env: hpdl_cli(2, args, env, "--model", "mlp", "--stages", "1", "--algorithm", "sync",
                                          "--batch-size", "128", "--max-steps", steps),
               lambda: worker_run(2, args, "ddp", 1, None, "--batch-size", "128",
                                  "--steps", steps)["samples_per_s"], args.repeats)
    rows = [row("data parallel `mlp`, 2 ranks x 1 thread, batch 128 per rank, hpdl `sync` / DDP gloo", raw)]
    print(rows[-1], flush=True)
    return rows, raw


def pipelines(args) -> tuple[list[list], dict]:
    """3: GPipe and 1F1B, P = 2 and 4, against torch.distributed.pipelining, one thread per rank."""
    steps, M = str(args.pipe_steps), str(args.microbatches)
    rows, raw = [], {}
    for P in (2, 4):
        for schedule in ("gpipe", "1f1b"):
            key = f"P{P} {schedule}"
            raw[key] = pair(
                args, lambda env, s=schedule, P=P: hpdl_cli(
                    P, args, env, "--model", "mlp", "--stages", str(P), "--schedule", s, "--microbatches", M,
                    "--partition", "flops", "--batch-size", "256", "--max-steps", steps),
                lambda s=schedule, P=P: worker_run(P, args, s, 1, None, "--batch-size", "256", "--steps", steps,
                                                   "--microbatches", M)["samples_per_s"], args.repeats)
            peer = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}[schedule]
            rows.append(row(f"pipeline `mlp`, P = {P}, {M} micro-batches, batch 256, {schedule} / `{peer}`",
                            raw[key]))
            print(rows[-1], flush=True)
    return rows, raw


def time_to_accuracy(args) -> tuple[list[list], dict]:
    """4: training seconds to 98% test accuracy, mlp, one process, same init, batches and lr."""
    flags = ("--acc-epochs", str(args.acc_epochs), "--eval-every", str(args.eval_every))
    raw: dict[str, list] = {}
    # The race is the longest workload: it runs hpdl as shipped and PyTorch only (the
    # BLAS variant's gain is the throughput tables' and the race's time ratio follows them).
    sides = {name: env for name, env in variants(args).items() if name != "hpdl_blas"}
    for _ in range(args.acc_repeats):
        for name, env in sides.items():
            impl = "torch" if name == "torch" else "hpdl"
            raw.setdefault(name, []).append(worker_run(1, args, "race", args.threads, env, "--impl", impl, *flags))
            print(name, {k: v for k, v in raw[name][-1].items() if k != "curve"}, flush=True)
    secs = {name: median([r["seconds"] for r in runs]) for name, runs in raw.items()}
    rows = [[LABELS[name], f"{secs[name]:.1f}", f"{secs['torch'] / secs[name]:.2f}",
             f"{median([r['steps'] for r in runs]):.0f}",
             "yes" if all(r["reached"] for r in runs) else "NO"] for name, runs in raw.items()]
    return rows, raw


def row(workload: str, res: dict[str, list[float]]) -> list:
    """Table row: medians and hpdl / PyTorch ratios."""
    t = median(res["torch"])
    cells = [workload, f"{median(res['hpdl']):.0f}", f"{t:.0f}", f"{median(res['hpdl']) / t:.2f}"]
    if "hpdl_blas" in res:
        cells += [f"{median(res['hpdl_blas']):.0f}", f"{median(res['hpdl_blas']) / t:.2f}"]
    return cells


# ---- report ------------------------------------------------------------------------------

def plot_throughput(throughput: dict[str, dict[str, list[float]]]) -> None:
    """Bars of median samples/s per workload and side, each workload scaled to PyTorch = 1."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(throughput)
    sides = [s for s in ("hpdl", "torch", "hpdl_blas") if s in throughput[names[0]]]
    width = 0.8 / len(sides)
    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    xs = np.arange(len(names))
    for i, side in enumerate(sides):
        rel = [median(throughput[n][side]) / median(throughput[n]["torch"]) for n in names]
        bars = ax.bar(xs + (i - (len(sides) - 1) / 2) * width, rel, width, label=LABELS[side])
        if side != "torch":
            ax.bar_label(bars, [f"{r:.2f}" for r in rel], fontsize=7)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(xs, names, fontsize=8)
    ax.set_ylabel("samples/s relative to PyTorch")
    ax.legend(fontsize=8)
    ax.set_title("training throughput, median of alternating runs (PyTorch = 1)", fontsize=9)
    fig.tight_layout()
    fig.savefig(REPORTS / "peers.png", dpi=120)
    plt.close(fig)


def plot_accuracy(raw: dict[str, list]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    colors = {"hpdl": "C0", "torch": "C1", "hpdl_blas": "C2"}
    for name, runs in raw.items():
        for i, r in enumerate(runs):
            t, _, acc = zip(*r["curve"])
            ax.plot(t, [100 * a for a in acc], marker=".", color=colors[name], alpha=0.8,
                    label=LABELS[name] if i == 0 else None)
    ax.axhline(100 * TARGET_ACC, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("training seconds (evaluations excluded)")
    ax.set_ylabel("MNIST test accuracy (%)")
    ax.set_ylim(95, 99)
    ax.legend()
    fig.tight_layout()
    fig.savefig(REPORTS / "peers_accuracy.png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="data/mnist.h5")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each side per workload")
    ap.add_argument("--threads", type=int, default=2, help="threads of the single-process runs")
    ap.add_argument("--sp-steps", type=int, default=40, help="timed steps per single-process run")
    ap.add_argument("--dp-steps", type=int, default=150, help="steps per data-parallel run")
    ap.add_argument("--pipe-steps", type=int, default=80, help="mini-batches per pipeline run")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--poll", default="sleep", choices=("sleep", "spin"), help="hpdl's --poll")
    ap.add_argument("--acc-epochs", type=int, default=5, help="cosine length and cap of the accuracy race")
    ap.add_argument("--acc-repeats", type=int, default=3)
    ap.add_argument("--eval-every", type=int, default=117, help="steps between test evaluations in the race")
    ap.add_argument("--native-blas", action="store_true",
                    help=f"also run hpdl with {' and '.join(PINNED_BLAS)} unset (OpenBLAS's own kernel choice)")
    ap.add_argument("--only", default="single,dp,pipe,acc", help="comma-separated subset of the workloads")
    # Internal: one process of a run, launched by this module.
    ap.add_argument("--worker", choices=("single", "race", "ddp", "gpipe", "1f1b"), help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=("hpdl", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--model", default="mlp", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=50, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import torch  # noqa: F401  (imported so that the report's machine line names its version)
    only = set(args.only.split(","))
    rows, throughput, data = [], {}, {"variants": {k: v for k, v in variants(args).items()}}
    load = data["load_average"] = {"start": os.getloadavg()[0]}
    malloc_rows: list[list] = []
    if "single" in only:
        r, raw = single_process(args)
        rows += r
        throughput |= {f"1 proc {n}": v for n, v in raw.items()}
        data["single_process"], load["single"] = raw, os.getloadavg()[0]
        malloc_rows, data["allocator_check"] = allocator_check(args)
    if "dp" in only:
        r, raw = data_parallel(args)
        rows += r
        throughput["DP 2x1"] = raw
        data["data_parallel"], load["dp"] = raw, os.getloadavg()[0]
    if "pipe" in only:
        r, raw = pipelines(args)
        rows += r
        throughput |= raw
        data["pipeline"], load["pipe"] = raw, os.getloadavg()[0]
    if throughput:
        plot_throughput(throughput)
    acc_rows: list[list] = []
    if "acc" in only:
        acc_rows, acc_raw = time_to_accuracy(args)
        data["time_to_98"], load["acc"] = acc_raw, os.getloadavg()[0]
        plot_accuracy(acc_raw)
    body = report_body(args, rows, malloc_rows, acc_rows, load)
    print(write_report("peers", "hpdl vs PyTorch on the same machine", body, data))


def report_body(args, rows: list[list], malloc_rows: list[list], acc_rows: list[list], load: dict[str, float]) -> str:
    kernels = {name: blas_kernel(env) for name, env in variants(args).items() if name != "torch"}
    blas = ", hpdl with OpenBLAS's own kernels (C)" if args.native_blas else ""
    header = ["workload", f"hpdl samples/s (A, OpenBLAS {kernels['hpdl']})", "PyTorch samples/s (B)", "A / B"]
    if args.native_blas:
        header += [f"hpdl samples/s (C, OpenBLAS {kernels['hpdl_blas']})", "C / B"]
    parts = [f"""Every pair runs in this one invocation, alternating the sides (hpdl (A), PyTorch (B){blas}:
A B A B ...), each run a fresh process; a figure is the median of {args.repeats} runs. Same model
(PyTorch gets hpdl's initial weights, `benchmarks/torch_models.py`), same batches (both sides
read them with hpdl's `Loader`), same threads per rank, float32, SGD with momentum 0.9.

- **Single process**: hpdl's layers and optimizer called from Python against `nn.Sequential`
  and `torch.optim.SGD` (the runners of `benchmarks/single_process.py`), {args.sp_steps} timed
  steps after {WARMUP_STEPS} untimed ones, {args.threads} threads.
- **Data parallel**: `mpirun -n 2 python -m hpdl.train --stages 1 --algorithm sync --threads 1`
  (its RESULT `samples_per_s`) against `DistributedDataParallel` over gloo, launched by the same
  `mpirun` (env:// rendezvous), {args.dp_steps} steps of 128 samples per rank.
- **Pipeline**: `mpirun -n P python -m hpdl.train --stages P --schedule S --microbatches
  {args.microbatches} --partition flops --batch-size 256 --threads 1` against
  `torch.distributed.pipelining` (one `PipelineStage` per rank holding the layers of the same
  FLOP-balanced cut, `ScheduleGPipe` / `Schedule1F1B`), {args.pipe_steps} mini-batches per run.

The multi-rank sides both time their training steps from a barrier after set-up to the last
step, on the rank that reports (the last stage), data loading included; both use weight decay
5e-4 (weights, not biases) and the same cosine learning rate from {LR}; hpdl polls with
`--poll {args.poll}` (its default).

Other jobs shared this {os.cpu_count()}-core machine during the run: its 1-minute load average was
{", ".join(f"{v:.1f} ({k})" for k, v in load.items())}. Load slows both sides, and the
alternation spreads it over both alike, but it is noise all the same.

""" + markdown_table(header, rows) + "\n\n![throughput relative to PyTorch](peers.png)\n"]
    if malloc_rows:
        parts.append(MALLOC_TEXT + markdown_table(["workload", "hpdl samples/s", "PyTorch samples/s, malloc kept",
                                                   "hpdl / PyTorch"], malloc_rows) + "\n")
    if any("P = 4" in str(r[0]) for r in rows):
        parts.append(P4_TEXT)
    if acc_rows:
        parts.append(f"""## Time to {100 * TARGET_ACC:.0f}% test accuracy

`mlp`, one process, {args.threads} threads, batch 128, SGD momentum 0.9, weight decay 5e-4 (weights
only), learning rate {LR} with a cosine decay over {args.acc_epochs} epochs, the same initial
weights and batch order on both sides. The test set is evaluated every {args.eval_every} steps and
the clock stops during evaluations, so the figure is training time. Median of {args.acc_repeats}
alternating runs each.

""" + markdown_table(["side", "seconds to 98%", "speed-up over PyTorch", "steps", "reached"], acc_rows)
            + "\n\n![test accuracy against training time](peers_accuracy.png)\n")
    parts.append(ANALYSIS)
    return "\n".join(parts)


MALLOC_TEXT = """## PyTorch with hpdl's allocator setting

hpdl keeps the memory a training step frees for the next one (`hpdl/hostmem.py`: glibc's
mmap threshold raised to 32 MiB and trimming off, set by `hpdl.train` and by the runners
above); by default glibc returns every large freed block to the kernel and the next step
page-faults it in again. PyTorch as shipped runs with the default, and the table above
measures it so. The same pairs again, PyTorch now started with `MALLOC_MMAP_THRESHOLD_` and
`MALLOC_TRIM_THRESHOLD_` set to the values hpdl applies (alternating, same runs as above).
Where a ratio here is below the one above, that much of hpdl's margin is the allocator
setting rather than the computation; PyTorch gains from the setting the way hpdl does
(its cnn step allocates as many large temporaries).

"""


P4_TEXT = """## P = 4: PyTorch runs it too

The issue expected PyTorch to be unable to run this mlp as four stages: it has six layers
(Flatten, Linear, ReLU, Linear, ReLU, Linear) of which three hold parameters, so any cut
into four stages leaves a stage without parameters (the FLOP-balanced cut used on both sides
is 1, 2, 1, 2 layers: stage 0 holds the Flatten alone). PyTorch 2.13's
`torch.distributed.pipelining` runs such a stage (its backward has no weights to update and
its optimizer an empty parameter list), so P = 4 is measured as a pair like P = 2. With four
ranks on this machine's two cores, two ranks share each core on both sides.
"""

ANALYSIS = """## Where hpdl was slower: what was found, what changed

Profiles taken on 2026-11-29 on this machine; each comparison below takes the minimum CPU or
wall time of repeated calls (`time.process_time`, one BLAS thread, unless it says otherwise).

**The BLAS kernel.** This machine's environment pins `OPENBLAS_CORETYPE=Haswell` (with
`OPENBLAS_L2_SIZE`), because older OpenBLAS builds compute wrong results or crash on some
processors; hpdl, its tests and CI leave both as they are, so column A runs NumPy's OpenBLAS
0.3.31 on its AVX2 kernels. Column C (`--native-blas`) removes both variables from hpdl's
processes alone, as a machine without them would run: OpenBLAS then picks its AVX-512 kernels
(the column heads name what threadpoolctl reports). PyTorch's MKL and oneDNN are not affected
by either variable. The cnn's second convolution as im2col + one product,
(64 x 288) @ (288 x 25088): 8.7-9.3 ms with the Haswell kernels, 6.0 with SkylakeX; oneDNN's
whole convolution forward 4.7-5.0 ms.

**The cnn (0.53 before this round; four changes, each measured on its own).** A step of batch
128 was 52-55 ms with 2 threads against PyTorch's 23-30 ms. Per layer (one thread, ms forward /
backward) the second convolution took 11.7 / 23.0 of about 50, and what was not a matrix product
(im2col copies, col2im adds, the transposes between NCHW and the product's channel-major
layout, pooling masks, ReLU) about half of the rest.

1. *Row blocks over threads* (`hpdl/threads.py`, `--thread-split`). NumPy runs its element-wise
   and copy work on one core whatever BLAS is given, so with 2 BLAS threads half the cnn's step
   ran on one core. Split into row blocks, one per thread with one BLAS thread each, every core
   runs a whole block's step; the gradients are summed (the same step up to rounding; dropout
   draws each block's rows of the batch's mask). `loss_and_grads` of batch 128: 43-56 ms with
   2 BLAS threads, 29 ms as 2 blocks. `auto` splits convolutional nets only: the mlp, matrix
   products alone, measured 6.9 ms with BLAS threads and 7.6-8.7 ms split (the split adds the
   gradient sum). BatchNorm rules the split out.
2. *Freed memory kept* (`hpdl/hostmem.py`). Every step allocates tens of megabytes of
   activations and temporaries; glibc unmapped each freed block above its threshold, and the
   next step page-faulted it back: about 9000 faults per cnn step of 64 rows
   (`getrusage`), which was half the block's time (64 rows, one thread: 43 ms wall with the
   default, 21-24 ms with freed memory kept, zero faults). `hpdl.train` sets it at start-up.
   PyTorch pays the same faults as shipped: see the section above for it with the setting.
3. *Batch-innermost activations* (`hpdl/layers/conv.py`). Arrays stay indexed NCHW, but Conv2d
   and MaxPool2d store their outputs as (C, H, W, N) and hand on transposed views. im2col then
   copies runs of W x N contiguous floats (it copied runs of W = 14), the product
   `W @ cols` lands in that layout (no output transpose), col2im adds whole slabs, the pooling
   windows are strided views with runs of N, and backward needs no transpose of dy.
4. *Winograd F(2x2, 3x3)* for 3 x 3 stride-1 convolutions with enough channels (the cnn's
   second): 16 products (64 x 32) @ (32 x tiles) do 2.25x fewer multiplications than im2col's
   one. Its forward takes one row of the transformed tile at a time and its backward one dM
   slice at a time, so that the 16 product outputs are reduced while in cache and never go to
   memory (backward 7.9 -> 6.7 ms, forward 4.9 -> 4.2). Second convolution, 64 rows, one
   thread, forward + backward: 10.9 ms against 14.9 for im2col in the same layout; for the
   first convolution (1 input channel) im2col stays, 1.9 against 12 ms.

Per block of 64 rows after all four (one thread, CPU ms forward / backward): Conv2d 1->32 0.6 /
0.8 (weight gradient only), ReLU 0.5 / 0.4, MaxPool 0.8 / 0.5, Conv2d 32->64 4.2 / 6.7, ReLU
0.2 / 0.1, MaxPool 0.3 / 0.2, Linear 0.4 / 0.9: about 17 ms. Two blocks at once take 25-26 ms
rather than 17: the two cores share the memory bandwidth, and the element-wise layers slow
most (ReLU and pooling 1.5-2x when both blocks run).

Tried, measured, and not kept:

- The 2-D Winograd transforms as one (16 x 16) or (4 x 16) product each (Kronecker form of
  B^T and A^T) instead of separable row and column passes: input transform 0.77 -> 0.98 ms,
  output 0.51 -> 0.57 ms. Not applied.
- Max pooling with an argmax index (uint8) instead of one mask per window offset: forward
  0.57 -> 5.4 ms (`np.copyto(where=)` is slow). ReLU as `maximum` with `y > 0` in backward:
  0.33 / 0.27 -> 0.48 / 0.43 ms. Not applied.
- Conv2d as one product per sample (the earlier round): NumPy runs a stacked matmul as one
  threaded OpenBLAS call per sample. Reverted then.

**Pipeline, P = 2** (cProfile of both ranks, GPipe, 100 mini-batches): stage 0 spends 5.9 s of
its 8.3 s in `time.sleep` waiting for stage 1, which is the bottleneck: the FLOP-balanced cut
(3 + 3 layers, the same on both sides) gives stage 1 the 1024 x 1024 layer and its input
gradient, stage 0 the 784 x 1024 layer without one (the model's first layer). Stage 1's time is
its three GEMMs per micro-batch; Python-side costs are small (gradient accumulation into the
flat vector 0.33 s, SGD 0.64 s of 8.3 s). PyTorch's stages do the same arithmetic with more
per-micro-batch overhead, which is where hpdl's margin comes from.

**Data parallel**: hpdl starts each bucket's `Iallreduce` during backward, as DDP does; with
one thread per rank both are bound by the same GEMMs.

**Load.** The figures that move most between runs of the same code are the two-thread
single-process ones and the time-to-accuracy race, whose runs are minutes long: a quiet
window during one side's run and not the other's shifts the ratio far more than any change
above (raw runs in `peers.json`; the race's curves show the speed of each interval).
"""


if __name__ == "__main__":
    main()

"""The planner's predictions against measured `hpdl.train` runs here, and extrapolated to clusters of 8-1024 nodes."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import REPORTS, markdown_table, write_report
from benchmarks.pipeline import MPIRUN, train
from hpdl.comm.topology import Layout
from hpdl.cost import Cluster, Link, Prediction, micro_size, predict, short
from hpdl.models import build_model
from hpdl.plan import ALGORITHMS, algorithm_cost, candidates, measure, micro_count, predict_all

# Ping-pong between two ranks of this machine: the "link" every measured run uses.
PINGPONG = """
import json, sys, time
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
rank, out = comm.Get_rank(), {}
for n in (8, 1 << 22):
    buf = np.zeros(n, np.uint8)
    best = 1e9
    for _ in range(30):
        comm.Barrier()
        t0 = time.perf_counter()
        if rank == 0:
            comm.Send(buf, 1); comm.Recv(buf, 1)
        else:
            comm.Recv(buf, 0); comm.Send(buf, 0)
        best = min(best, (time.perf_counter() - t0) / 2)
    out[n] = best
if rank == 0:
    print(json.dumps({"latency": out[8], "bandwidth": (1 << 22) / (out[1 << 22] - out[8])}))
"""

NETWORKS = {"Gigabit Ethernet (1 Gbit/s, 50 us)": Link(1e9 / 8, 50e-6),
            "100 Gbit/s (2 us)": Link(100e9 / 8, 2e-6)}
INTRA = Link(10e9, 5e-6)   # inside a node, as hpdl.plan's default
NODES = [8, 16, 32, 64, 128, 256, 512, 1024]
GPUS_PER_NODE = 4


@dataclass(frozen=True)
class Case:
    """One measured run: its layout, algorithm and schedule, and extra flags."""

    layout: Layout
    algorithm: str
    schedule: str = "1f1b"
    tau: int | None = None

    @property
    def label(self) -> str:
        tau = f" τ={self.tau}" if self.tau else ""
        return f"{short(self.layout)} {self.algorithm}{tau} {self.schedule if self.layout.stages > 1 else ''}".strip()


CASES = [
    Case(Layout(1, 1), "sync"),
    Case(Layout(1, 2), "sync"),
    Case(Layout(1, 2), "avg", tau=10),
    Case(Layout(2, 1), "sync", "gpipe"),
    Case(Layout(2, 1), "sync", "1f1b"),
    Case(Layout(2, 1), "sync", "pipedream"),
    Case(Layout(1, 1, 1), "asgd"),
    Case(Layout(1, 4), "sync"),
    Case(Layout(2, 2), "sync", "1f1b"),
    Case(Layout(4, 1), "sync", "1f1b"),
    Case(Layout(1, 3, 1), "asgd"),
    Case(Layout(1, 3, 1), "dcasgd-a"),
    Case(Layout(1, 3, 1), "easgd", tau=10),
]


def pingpong() -> Link:
    """This machine's rank-to-rank link (shared memory), measured with mpirun -n 2."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(PINGPONG)
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        out = subprocess.run(["timeout", "120", MPIRUN, "-n", "2", sys.executable, f.name], capture_output=True,
                             text=True, env=env, check=True)
    finally:
        os.unlink(f.name)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    return Link(figures["bandwidth"], figures["latency"])


def flags(args, case: Case, partition: list[int], micro: int) -> list[str]:
    out = ["--data", args.data, "--model", args.model, "--batch-size", str(args.batch_size),
           "--max-steps", str(args.steps), "--stages", str(case.layout.stages),
           "--replicas", str(case.layout.replicas), "--ps", str(case.layout.ps), "--algorithm", case.algorithm,
           "--schedule", case.schedule, "--microbatches", str(micro), "--lr-schedule", "constant",
           "--partition", ",".join(map(str, partition))]
    return out + (["--tau", str(case.tau)] if case.tau else [])


def runnable_others(samples: int = 20, every: float = 0.05) -> float:
    """Mean count of other runnable tasks (other sessions' work on the same cores), sampled for a second.

    /proc/loadavg's fourth field is running/total tasks right now; the reader itself is one of them.
    """
    counts = []
    for _ in range(samples):
        counts.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1)
        time.sleep(every)
    return statistics.mean(counts)


def train_retrying(ranks: int, *flags: str, tries: int = 3, wait: float = 60.0) -> dict:
    """benchmarks.pipeline.train, tried again after a pause: other sessions edit the tree these runs import."""
    for _ in range(tries - 1):
        try:
            return train(ranks, *flags)
        except RuntimeError as e:
            print(f"run failed, retrying in {wait:.0f} s: {str(e).splitlines()[-1]}", flush=True)
            time.sleep(wait)
    return train(ranks, *flags)


def compare(args, model, link: Link) -> tuple[list[list], list[dict]]:
    """Every case run in alternating rounds (A B C ... A B C), so drifting load hits all alike.

    Right before each run the model is profiled again and both the case and the single
    process are predicted from that profile: the prediction sees the load the run meets.
    """
    cores = os.cpu_count() or 1
    base_case = CASES[0]
    plans = []
    for case in CASES:
        micro = micro_count(case.layout.stages, args.batch_size)
        algo = algorithm_cost(case.algorithm, case.tau, model_size(model), 3)
        plans.append((micro, algo))
    first = measure(model, [micro_size(args.batch_size, m) for m, _ in plans], "sgd", 3)
    cuts = [predict(first, Cluster(1, case.layout.world, link, link, cores), case.layout, al, case.schedule,
                    args.batch_size, m).partition for case, (m, al) in zip(CASES, plans)]
    got: list[list[dict]] = [[] for _ in CASES]
    for round_ in range(args.repeats):
        for i, (case, (micro, algo), cut) in enumerate(zip(CASES, plans, cuts)):
            prof = measure(model, [micro_size(args.batch_size, micro), args.batch_size], "sgd", 3)
            others = runnable_others()
            cluster = Cluster(1, case.layout.world, link, link, cores, background=others)
            pred = predict(prof, cluster, case.layout, algo, case.schedule, args.batch_size, micro, cut)
            base = predict(prof, Cluster(1, 1, link, link, cores, background=others), base_case.layout,
                           plans[0][1], base_case.schedule, args.batch_size, 1)
            res = train_retrying(case.layout.world, *flags(args, case, cut, micro))
            got[i].append({"measured": res["samples_per_s"], "predicted": pred.samples_per_s,
                           "predicted_single": base.samples_per_s, "others": others,
                           "slowdown": cluster.slowdown, "bubble": pred.bubble, "comm_s": pred.comm_s,
                           "step_s": pred.step_s})
            print(round_, case.label, {k: round(v, 4) for k, v in got[i][-1].items()}, flush=True)
    base_measured = statistics.median(r["measured"] for r in got[0])
    rows, raw = [], []
    for case, (micro, _), cut, runs in zip(CASES, plans, cuts, got):
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        error = med["predicted"] / med["measured"] - 1
        speedup = statistics.median(r["predicted"] / r["predicted_single"] for r in runs)
        measured_speedup = med["measured"] / base_measured
        speedup_error = speedup / measured_speedup - 1
        over = case.layout.world > cores
        rows.append([case.label, f"{case.layout.world}" + (f" (> {cores} cores)" if over else ""), f"{med['others']:.1f}",
                     f"{med['slowdown']:.1f}", f"{med['measured']:.0f}", f"{med['predicted']:.0f}",
                     f"{100 * error:+.0f}%", f"{measured_speedup:.2f}", f"{speedup:.2f}",
                     f"{100 * speedup_error:+.0f}%", f"{med['bubble']:.0%}", f"{1e3 * med['comm_s']:.2f}"])
        raw.append({"case": case.label, "ranks": case.layout.world, "oversubscribed": over,
                    "partition": cut, "microbatches": micro, "runs": runs,
                    "measured_samples_per_s": med["measured"], "predicted_samples_per_s": med["predicted"],
                    "error": error, "measured_speedup": measured_speedup, "predicted_speedup": speedup,
                    "speedup_error": speedup_error})
    return rows, raw


def model_size(model) -> int:
    return model.n_params(model.init(0))


def extrapolate(args, profile) -> dict:
    """Best predicted samples/s per algorithm, for each network, compute scale and node count."""
    n_params = sum(profile.layer_params)
    costs = {a: algorithm_cost(a, args.tau, n_params, 3) for a in ALGORITHMS}
    out: dict = {}
    for net, link in NETWORKS.items():
        for scale in args.compute_scales:
            series: dict[str, list] = {a: [] for a in ALGORITHMS}
            for nodes in NODES:
                cluster = Cluster(nodes, GPUS_PER_NODE, link, INTRA, compute_scale=scale)
                lays = candidates(cluster.world, profile.n_layers, ALGORITHMS, sorted({*args.ps, nodes}))
                preds = predict_all(profile, costs, cluster, lays, list(args.schedules), args.batch_size)
                for a in ALGORITHMS:
                    best: Prediction = next(p for p in preds if p.algorithm == a)
                    series[a].append({"nodes": nodes, "layout": short(best.layout), "schedule": best.schedule,
                                      "samples_per_s": best.samples_per_s, "step_s": best.step_s,
                                      "comm_s": best.comm_s, "bubble": best.bubble})
            out[f"{net} | scale {scale:g}"] = series
    return out


def plot(curves: dict, path: Path, scales: list[float]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(NETWORKS), len(scales), figsize=(6 * len(scales), 4.5 * len(NETWORKS)),
                             squeeze=False, sharex=True)
    for i, net in enumerate(NETWORKS):
        for j, scale in enumerate(scales):
            ax = axes[i][j]
            for k, (a, pts) in enumerate(curves[f"{net} | scale {scale:g}"].items()):
                # equal curves (sync and easgd-sync, avg and bmuf) stay visible: markers shrink along the list
                ax.plot([p["nodes"] for p in pts], [p["samples_per_s"] for p in pts], marker="os^vD<>px"[k],
                        ms=9 - 0.6 * k, mfc="none", label=a,
                        ls="--" if a in ("asgd", "dcasgd-c", "dcasgd-a", "easgd", "eamsgd") else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{net}\ncompute {scale:g}x one core here", fontsize=9)
            ax.set_xlabel(f"nodes ({GPUS_PER_NODE} ranks each)")
            ax.set_ylabel("predicted samples/s (best layout)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_errors(raw: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    for over, color, label in ((False, "tab:blue", "ranks <= cores"), (True, "tab:red", "oversubscribed")):
        pts = [r for r in raw if r["oversubscribed"] == over]
        measured = [r["measured_samples_per_s"] for r in pts]
        ax.scatter(measured, [r["predicted_samples_per_s"] for r in pts], c=color, label=label)
        for m, r in zip(measured, pts):
            ax.annotate(r["case"], (m, r["predicted_samples_per_s"]), fontsize=6)
    lim = [0, 1.1 * max(max(r["measured_samples_per_s"], r["predicted_samples_per_s"]) for r in raw)]
    ax.plot(lim, lim, "k:", lw=1, label="prediction = measurement")
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_xlabel("measured samples/s")
    ax.set_ylabel("predicted samples/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(raw: list[dict], over: bool, key: str = "error") -> str:
    errs = [abs(r[key]) for r in raw if r["oversubscribed"] == over]
    if not errs:
        return "none"
    return f"{len(errs)} cases, median |error| {100 * statistics.median(errs):.0f}%, worst {100 * max(errs):.0f}%"


def rank_agreement(raw: list[dict]) -> float:
    """Spearman's rank correlation of predicted and measured samples/s: 1 when the planner orders the runs right."""
    def ranks(xs: list[float]) -> list[int]:
        order = sorted(range(len(xs)), key=xs.__getitem__)
        out = [0] * len(xs)
        for rank, i in enumerate(order):
            out[i] = rank
        return out
    n = len(raw)
    measured = ranks([r["measured_samples_per_s"] for r in raw])
    predicted = ranks([r["predicted_samples_per_s"] for r in raw])
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(measured, predicted)) / (n * (n * n - 1))


def best_table(curves: dict, scale: float) -> list[list]:
    rows = []
    for net in NETWORKS:
        series = curves[f"{net} | scale {scale:g}"]
        for nodes_i, nodes in enumerate(NODES):
            if nodes not in (8, 64, 1024):
                continue
            best = max(((a, pts[nodes_i]) for a, pts in series.items()), key=lambda t: t[1]["samples_per_s"])
            sync = series["sync"][nodes_i]
            rows.append([net.split(" (")[0], nodes, best[0], best[1]["layout"], best[1]["schedule"],
                         f"{best[1]['samples_per_s']:.3g}", f"{sync['samples_per_s']:.3g}", sync["layout"],
                         f"{sync['comm_s'] / sync['step_s']:.0%}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="data/mnist.h5")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=60, help="mini-batch steps per measured run")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of runs; each case's median counts")
    ap.add_argument("--tau", type=int, default=None, help="period of avg/bmuf/easgd in the extrapolation")
    ap.add_argument("--ps", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--schedules", type=lambda s: s.split(","), default=["gpipe", "1f1b", "pipedream"])
    ap.add_argument("--compute-scales", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 100.0])
    args = ap.parse_args()
    model = build_model(args.model)
    sizes = {micro_size(args.batch_size, micro_count(p, args.batch_size)) for p in range(1, len(model.layers) + 1)}
    profile = measure(model, sorted(sizes), "sgd", 5)
    link = pingpong()
    print(f"link: {link.bandwidth / 1e9:.2f} GB/s, {link.latency * 1e6:.1f} us", flush=True)
    rows, raw = compare(args, model, link)
    curves = extrapolate(args, profile)
    plot_errors(raw, REPORTS / "plan_error.png")
    plot(curves, REPORTS / "plan_scaling.png", args.compute_scales)
    cores = os.cpu_count() or 1
    body = f"""`python -m hpdl.plan` predicts each layout's time per step from per-layer forward+backward times it
measures on one core (one BLAS thread), the optimizer's and parameter server's measured update times,
and the formulas of ALGORITHMS.md §7 and §10 (hpdl/cost.py). Here its predictions are checked against
real `mpirun -n K python -m hpdl.train` runs on this machine, then extrapolated to clusters.

## Prediction against measurement

Model `{args.model}`, batch {args.batch_size} per replica, {args.steps} steps per run, {args.repeats} rounds
in which every case runs once in turn (medians count), one BLAS thread per rank, the planner's partition
passed as `--partition`, micro-batches hpdl.train's default (2 x stages). The link between ranks is this
machine's shared memory, measured by an MPI ping-pong: {link.bandwidth / 1e9:.2f} GB/s,
{link.latency * 1e6:.1f} us per message; the model uses it for both kinds of link.

The planner times layers on the thread's CPU clock, so its profile is the work itself, whatever else
runs. This machine has {cores} cores, and other sessions kept it busy while these runs went on, so the
model is given the time-sharing a run meets: right before each run the benchmark profiles the model
again and counts the other runnable tasks ("others": the mean of /proc/loadavg's running count over one
second), and the prediction slows every rank's compute by (ranks + others) / cores ("slowdown"). Runs
of more ranks than cores are **oversubscribed** by themselves. This sharing term is a first
approximation: ranks that block (pipeline stages waiting for a neighbour, a parameter server
polling with sleeps) give their share away, and the count of others is itself a sample of a
fluctuating load.

The error is prediction / measurement - 1 (positive: the planner is optimistic). The speed-up
columns divide each case by the single-process run (measured: its median over the rounds;
predicted: from the same profile and load as the case): the model's error in how a layout scales,
which is what the ranking depends on.

{markdown_table(["run", "ranks", "others", "slowdown", "measured samples/s", "predicted samples/s", "error",
                 "measured speed-up", "predicted speed-up", "speed-up error", "predicted bubble",
                 "predicted comm ms/step"], rows)}

Error, ranks <= cores: {summary(raw, False)}; oversubscribed: {summary(raw, True)}.
Speed-up error, ranks <= cores: {summary(raw, False, "speedup_error")}; oversubscribed:
{summary(raw, True, "speedup_error")}. Order: Spearman's rank correlation between predicted and measured
samples/s over all {len(raw)} runs is {rank_agreement(raw):.2f} (1: the planner ranks them as measured).

![predicted against measured](plan_error.png)

## Extrapolation: 8 to 1024 nodes

{GPUS_PER_NODE} ranks per node; between nodes Gigabit Ethernet (1 Gbit/s, 50 us per message) or
100 Gbit/s links (2 us); inside a node {INTRA.bandwidth / 1e9:g} GB/s, {INTRA.latency * 1e6:g} us. For each
algorithm the best layout (stages x replicas [+ K servers, K in {args.ps} or the node count]) and schedule
({", ".join(args.schedules)}) at batch {args.batch_size} per replica (K also one server per node); periods are each algorithm's default
(avg/bmuf τ = 50, easgd/eamsgd τ = 100) unless --tau is given. Compute is one core of this machine
("1x") or a device {max(args.compute_scales):g} times faster ("{max(args.compute_scales):g}x"), the case
where communication dominates. Dashed: parameter-server algorithms. These are predictions of
throughput only: asynchronous and periodic algorithms pay in convergence (benchmarks/reports/staleness.md),
which the planner does not model.

![predicted scaling](plan_scaling.png)

Best algorithm against synchronous SGD (sync), compute {max(args.compute_scales):g}x:

{markdown_table(["network", "nodes", "best", "its layout", "schedule", "samples/s", "sync samples/s",
                 "sync layout", "sync comm share"], best_table(curves, max(args.compute_scales)))}

What the model leaves out: overlap of the allreduce with backward (it adds them), contention of
several transfers for one link (each link is charged on its own), the network's topology above a
node (every inter-node link is the given one), and stragglers. The ring allreduce's 2(N-1)
latencies dominate sync at 1024 nodes on Gigabit Ethernet.
"""
    print(write_report("plan", "Cost model and planner: predicted against measured", body,
                       {"link": {"bandwidth": link.bandwidth, "latency": link.latency}, "runs": raw,
                        "extrapolation": curves}))


if __name__ == "__main__":
    main()

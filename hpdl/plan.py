"""`python -m hpdl.plan`: measure a model's per-layer costs here, predict every layout on a cluster, rank them."""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from typing import Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from .algorithms import registry
from .comm.topology import Layout
from .cost import (AlgoCost, Cluster, Link, Prediction, Profile, default_micro, layouts, micro_size, predict,
                   ranked, short)
from .layers.base import Mode
from .models import BUILDERS, Model, build_model
from .optim import make_optimizer
from .pipeline.partition import profile_costs
from .pipeline.schedules import SCHEDULES
from .pipeline.stash import nbytes

# Planned algorithms: hogwild is left out (one node's shared memory, no link to model).
ALGORITHMS = ("sync", "avg", "bmuf", "easgd-sync", "asgd", "dcasgd-c", "dcasgd-a", "easgd", "eamsgd")
# State an allreduce algorithm keeps beside the weights, in weight-sized vectors, read off
# hpdl/dataparallel.py: WeightAverage holds w_global, delta and sum; the EASGD exchange center and x_sum.
ALLREDUCE_VECTORS = {"sync": 0.0, "avg": 3.0, "bmuf": 3.0, "easgd-sync": 2.0}
FLUSHED = tuple(name for name, spec in SCHEDULES.items() if spec.flush)

_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2.0 ** 10, "mi": 2.0 ** 20, "gi": 2.0 ** 30,
           "ti": 2.0 ** 40}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


class PlanError(ValueError):
    """A bad command-line value; one line for the user."""


def parse_bandwidth(text: str) -> float:
    """Bytes per second from "1Gbit", "100Gbit/s", "10Gbps", "1.25GB/s", "125MB" or a plain number of bytes/s.

    A lower-case b, bit or bps counts bits; B, byte or Bps counts bytes; no unit means bytes.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtT]i?)?(bits?|bps|b|Bps|B|bytes?)?(/s)?\s*",
                     text)
    if not m:
        raise PlanError(f"bandwidth {text!r}: expected a number and a unit such as 1Gbit, 100Gbit/s, 10GB/s "
                        "or a plain number of bytes/s")
    unit = m.group(3) or "B"
    bits = unit in ("b", "bit", "bits", "bps")
    value = float(m.group(1)) * _PREFIX[(m.group(2) or "").lower()] / (8 if bits else 1)
    if not value > 0:
        raise PlanError(f"bandwidth {text!r} must be positive")
    return value


def parse_latency(text: str) -> float:
    """Seconds from "50us", "0.2ms", "1e-5" (seconds) or "2s"."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(s|ms|us|µs|ns)?\s*", text)
    if not m:
        raise PlanError(f"latency {text!r}: expected a number and a unit such as 50us, 0.2ms or 1e-5 (seconds)")
    return float(m.group(1)) * _TIME[m.group(2) or "s"]


def _checked(parse):
    """An argparse type that reports a PlanError's message as the option's error."""
    def convert(text: str):
        try:
            return parse(text)
        except PlanError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except None (whose help says what happens instead)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, but a user's mistake is one line on stderr and exit code 2 (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"hpdl.plan: error: {message}\n")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} has a negative entry")
    return values


def _names(choices: Sequence[str]):
    def convert(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",")]
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad[0]!r}; choose from {', '.join(choices)}")
        return names
    return convert


def parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="python -m hpdl.plan",
        description="Predict, for every layout (stages x replicas [+ parameter servers]) that fits NODES x "
                    "GPUS_PER_NODE ranks, every algorithm and pipeline schedule: time per step, pipeline bubble, "
                    "memory per rank and bytes on each link (ALGORITHMS.md sections 7 and 10), from per-layer "
                    "timings measured on this machine; then rank the layouts, fastest first.",
        epilog="Units: bandwidth in bytes/s unless a unit says otherwise: 1Gbit (= 125e6 bytes/s), 100Gbit/s, "
               "10Gbps, 1.25GB/s, 125MB, 1e9. Latency in seconds unless a unit says otherwise: 50us, 0.2ms, 1e-5. "
               "Compute times are those of one core of this machine (one BLAS thread per rank) divided by "
               "--compute-scale.",
        formatter_class=_Help)
    ap.add_argument("--model", default="mlp", choices=list(BUILDERS), help="architecture (hpdl.models)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes in the cluster")
    ap.add_argument("--gpus-per-node", type=int, default=4, help="ranks (one per GPU) per node")
    ap.add_argument("--bandwidth", type=_checked(parse_bandwidth), default="1Gbit", metavar="RATE",
                    help="between nodes, per link: 1Gbit, 100Gbit/s, 10GB/s, or bytes/s")
    ap.add_argument("--latency", type=_checked(parse_latency), default="50us", metavar="TIME",
                    help="between nodes, per message: 50us, 0.2ms, or seconds")
    ap.add_argument("--intra-bandwidth", type=_checked(parse_bandwidth), default="10GB/s", metavar="RATE",
                    help="between ranks on one node")
    ap.add_argument("--intra-latency", type=_checked(parse_latency), default="5us", metavar="TIME",
                    help="between ranks on one node, per message")
    ap.add_argument("--batch-size", type=int, default=128, help="samples per replica per step (as hpdl.train)")
    ap.add_argument("--microbatches", type=int, default=0, help="per mini-batch; 0: 2 x stages, 1 for one stage")
    ap.add_argument("--algorithms", type=_names(ALGORITHMS), default=",".join(ALGORITHMS), metavar="A,B",
                    help="which to plan (hogwild is left out: it shares one node's memory)")
    ap.add_argument("--schedules", type=_names(tuple(SCHEDULES)), default=",".join(SCHEDULES), metavar="S,T",
                    help="which pipeline schedules to plan")
    ap.add_argument("--ps", type=_int_list, default="1,2,4", metavar="K,L",
                    help="parameter-server rank counts to try (parameter-server algorithms only)")
    ap.add_argument("--tau", type=int, default=None,
                    help="communication period of avg, bmuf, easgd, eamsgd (default: each algorithm's own)")
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="local optimizer (its state "
                    "counts in memory)")
    ap.add_argument("--cores-per-node", type=int, default=None,
                    help="cores shared by a node's ranks; fewer than --gpus-per-node slows compute by the ratio "
                         "(default: one per rank)")
    ap.add_argument("--compute-scale", type=float, default=1.0,
                    help="how many times faster a rank computes than one core of this machine")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats per layer (the minimum counts)")
    ap.add_argument("--top", type=int, default=20, help="rows of the ranking to print (0: all)")
    ap.add_argument("--json", metavar="FILE", help="also write every prediction and the profile as JSON")
    return ap


def check(args: argparse.Namespace) -> None:
    for name in ("nodes", "gpus_per_node", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise PlanError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.microbatches < 0:
        raise PlanError(f"--microbatches must be at least 0, got {args.microbatches}")
    if args.microbatches > args.batch_size:
        raise PlanError(f"--microbatches {args.microbatches} exceeds --batch-size {args.batch_size}")
    if args.tau is not None and args.tau < 1:
        raise PlanError(f"--tau must be at least 1, got {args.tau}")
    if args.cores_per_node is not None and args.cores_per_node < 1:
        raise PlanError(f"--cores-per-node must be at least 1, got {args.cores_per_node}")
    if not args.compute_scale > 0:
        raise PlanError(f"--compute-scale must be positive, got {args.compute_scale}")


# ---------------------------------------------------------------------------------------
# measurements on this machine


def cache_bytes(model: Model, batch: int = 4) -> list[float]:
    """Bytes per sample each layer keeps from forward for backward (its cache), measured."""
    params = model.init(0)
    x = np.random.default_rng(0).standard_normal((batch, *model.in_shape)).astype(np.float32)
    out = []
    for i, (layer, p) in enumerate(zip(model.layers, params)):
        x, cache = layer.forward(p, x, Mode(train=True, key=(0, i)))
        out.append(nbytes(cache) / batch)
    return out


def optimizer_cost(model: Model, name: str, repeats: int) -> tuple[float, float]:
    """(seconds per value of one optimizer step, state in parameter-sized vectors), measured on the model."""
    params = model.init(0)
    kw = {"momentum": 0.9} if name == "sgd" else {}
    opt = make_optimizer(name, model.layers, weight_decay=5e-4, **kw)
    grads = [{k: np.ones_like(p[k]) for k in layer.trainable} for layer, p in zip(model.layers, params)]
    n = model.n_params(params)
    best = math.inf
    for _ in range(repeats + 1):  # the first step allocates the state
        t0 = time.thread_time()
        opt.step(params, grads, 1e-3)
        best = min(best, time.thread_time() - t0)
    state = sum(v.nbytes for v in opt.state_dict().values() if isinstance(v, np.ndarray) and v.size > 1)
    return best / n, state / (4 * n)


def algorithm_cost(name: str, tau: int | None, size: int, repeats: int) -> AlgoCost:
    """An algorithm's period and state, and for a parameter server its rule's apply time on `size` values, measured.

    Server state is measured on a small vector with one and with two workers, and scaled:
    DC-ASGD keeps a backup (and DC-ASGD-a a mean square) per worker.
    """
    spec = registry.get(name)
    takes_tau = any(h.name == "tau" for h in spec.hyper)
    hyper = spec.resolve({"tau": tau} if takes_tau and tau is not None else {}, 2, 0.05)
    period = int(hyper.get("tau", 1))
    schedules = tuple(SCHEDULES) if name == "sync" else FLUSHED
    if spec.kind != "ps":
        return AlgoCost(name, spec.kind, period, ALLREDUCE_VECTORS[name], schedules=schedules)

    def run(n: int, workers: int, applies: int) -> tuple[float, float, float]:
        """(best apply seconds, server state, worker state), states in vectors of n values."""
        rng = np.random.default_rng(0)
        w = rng.standard_normal(n).astype(np.float32)
        server, worker = spec.make_server(w, workers, hyper), spec.make_worker(w.copy(), hyper)
        local = w.copy()
        worker.local_step(local, (0.01 * rng.standard_normal(n)).astype(np.float32), 0.05)
        payload = worker.payload(local)
        best = math.inf
        for i in range(applies):
            t0 = time.thread_time()
            server.apply(i % workers, payload, 0.05)
            best = min(best, time.thread_time() - t0)
        vectors = [sum(v.nbytes for v in rule.state_dict().values() if v.size >= n) / w.nbytes
                   for rule in (server, worker)]
        return best, vectors[0], vectors[1]

    small = 1000
    _, one, worker_vectors = run(small, 1, 2)
    _, two, _ = run(small, 2, 4)
    apply_s, _, _ = run(size, 2, max(repeats, 2))
    return AlgoCost(name, "ps", period, worker_vectors, 2 * one - two, apply_s / size, schedules,
                    server_per_worker=two - one)


def measure(model: Model, micro_sizes: Sequence[int], optimizer: str, repeats: int) -> Profile:
    """The model's per-layer costs on this machine, one BLAS thread (one core per rank), in CPU time."""
    params = model.init(0)
    with threadpool_limits(1):
        # CPU time: the machine may be shared (partition.profile_costs says why)
        seconds = {b: profile_costs(model, b, repeats=repeats, clock=time.thread_time) for b in sorted(set(micro_sizes))}
        update, vectors = optimizer_cost(model, optimizer, repeats)
    shapes = model.shapes()
    return Profile(seconds, [sum(int(p[k].size) for k in layer.trainable) for layer, p in zip(model.layers, params)],
                   [math.prod(s) for s in shapes[1:]], cache_bytes(model), update, vectors)


# ---------------------------------------------------------------------------------------
# the plan


def candidates(world: int, n_layers: int, algorithms: Sequence[str], ps_choices: Sequence[int]) -> list[Layout]:
    """The layouts of `world` ranks the algorithms can use: without servers, and with each of ps_choices."""
    kinds = {registry.get(a).kind for a in algorithms}
    out = layouts(world, n_layers, [0]) if kinds - {"ps"} else []
    if "ps" in kinds:
        out += layouts(world, n_layers, [k for k in ps_choices if 0 < k < world])
    return out


def micro_count(stages: int, batch: int, microbatches: int = 0) -> int:
    """Micro-batches per mini-batch: as given, else hpdl.train's default; never more than the batch."""
    return min(microbatches or default_micro(stages), batch)


def predict_all(profile: Profile, costs: dict[str, AlgoCost], cluster: Cluster, candidates: Sequence[Layout],
                schedules: Sequence[str], batch: int, microbatches: int = 0) -> list[Prediction]:
    """Every layout x algorithm x schedule that can run, ranked fastest first."""
    out = []
    for lay in candidates:
        for algo in costs.values():
            if (algo.kind == "ps") != (lay.ps > 0):
                continue
            usable = [s for s in schedules if s in algo.schedules]
            # one stage has no pipeline: every schedule is the same run
            for s in usable[:1] if lay.stages == 1 else usable:
                out.append(predict(profile, cluster, lay, algo, s, batch, micro_count(lay.stages, batch, microbatches)))
    return ranked(out)


def plan(model: Model, cluster: Cluster, algorithms: Sequence[str], schedules: Sequence[str], ps_choices: Sequence[int],
         batch: int, microbatches: int = 0, tau: int | None = None, optimizer: str = "sgd",
         repeats: int = 3) -> tuple[Profile, list[Prediction]]:
    """Measure the model here, then predict every fitting layout, algorithm and schedule."""
    layouts_ = candidates(cluster.world, len(model.layers), algorithms, ps_choices)
    profile = measure(model, [micro_size(batch, micro_count(lay.stages, batch, microbatches)) for lay in layouts_],
                      optimizer, repeats)
    with threadpool_limits(1):
        costs = {a: algorithm_cost(a, tau, sum(profile.layer_params), repeats) for a in algorithms}
    return profile, predict_all(profile, costs, cluster, layouts_, schedules, batch, microbatches)


def _mib(x: float) -> str:
    return f"{x / 2 ** 20:.1f}"


def table(predictions: Sequence[Prediction], top: int) -> str:
    rows = predictions[:top] if top else predictions
    head = (f"{'#':>3} {'layout':<10} {'algorithm':<11} {'schedule':<12} {'M':>3} {'step ms':>9} {'samples/s':>10} "
            f"{'bubble':>6} {'comm ms':>8} {'MiB/rank':>8} {'MiB/ps':>7} {'MB/step inter':>13} {'MB/step intra':>13}")
    lines = [head]
    for i, p in enumerate(rows, 1):
        inter = sum(v for k, v in p.link_bytes.items() if k.endswith("inter-node")) / 1e6
        intra = sum(v for k, v in p.link_bytes.items() if k.endswith("intra-node")) / 1e6
        lines.append(f"{i:>3} {short(p.layout):<10} {p.algorithm:<11} {p.schedule:<12} {p.microbatches:>3} "
                     f"{1e3 * p.step_s:>9.2f} {p.samples_per_s:>10.0f} {p.bubble:>6.1%} {1e3 * p.comm_s:>8.2f} "
                     f"{_mib(sum(p.worker_memory.values())):>8} {_mib(p.ps_memory) if p.layout.ps else '-':>7} "
                     f"{inter:>13.2f} {intra:>13.2f}")
    return "\n".join(lines)


def details(p: Prediction) -> str:
    """The memory and link bytes of one prediction, by kind."""
    memory = ", ".join(f"{k} {_mib(v)}" for k, v in p.worker_memory.items() if v)
    links = ", ".join(f"{k} {v / 1e6:.3f}" for k, v in sorted(p.link_bytes.items())) or "none"
    return (f"{short(p.layout)} {p.algorithm} {p.schedule}: partition {p.partition}; MiB on its fullest worker: "
            f"{memory}" + (f"; on its fullest server {_mib(p.ps_memory)}" if p.layout.ps else "") +
            f"; MB per step by traffic and link: {links}")


def to_json(profile: Profile, predictions: Sequence[Prediction]) -> dict:
    return {"profile": {"layer_seconds": {str(k): v for k, v in profile.layer_seconds.items()},
                        "layer_params": profile.layer_params, "layer_out": profile.layer_out,
                        "layer_cache": profile.layer_cache, "update_s_per_value": profile.update_s_per_value,
                        "optimizer_vectors": profile.optimizer_vectors},
            "predictions": [{"layout": short(p.layout), "stages": p.layout.stages, "replicas": p.layout.replicas,
                             "ps": p.layout.ps, "algorithm": p.algorithm, "schedule": p.schedule,
                             "microbatches": p.microbatches, "partition": p.partition, "step_s": p.step_s,
                             "compute_s": p.compute_s, "comm_s": p.comm_s, "samples_per_s": p.samples_per_s,
                             "bubble": p.bubble, "worker_memory": p.worker_memory, "ps_memory": p.ps_memory,
                             "link_bytes": p.link_bytes} for p in predictions]}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check(args)
        model = build_model(args.model)
        cluster = Cluster(args.nodes, args.gpus_per_node, Link(args.bandwidth, args.latency),
                          Link(args.intra_bandwidth, args.intra_latency), args.cores_per_node, args.compute_scale)
        profile, predictions = plan(model, cluster, args.algorithms, args.schedules, args.ps, args.batch_size,
                                    args.microbatches, args.tau, args.optimizer, args.repeats)
    except (PlanError, ValueError) as e:
        print(f"hpdl.plan: error: {e}", file=sys.stderr)
        return 2
    if not predictions:
        print(f"hpdl.plan: error: no layout of {cluster.world} ranks fits the model's {len(model.layers)} layers "
              "with the algorithms and schedules asked for", file=sys.stderr)
        return 2
    print(f"{args.model}: {sum(profile.layer_params):,} parameters, {len(model.layers)} layers; {args.nodes} nodes "
          f"x {args.gpus_per_node} ranks; between nodes {args.bandwidth * 8 / 1e9:g} Gbit/s, "
          f"{args.latency * 1e6:g} us; inside {args.intra_bandwidth / 1e9:g} GB/s, {args.intra_latency * 1e6:g} us; "
          f"batch {args.batch_size} per replica")
    print(table(predictions, args.top))
    print("#1 in detail: " + details(predictions[0]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(profile, predictions), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

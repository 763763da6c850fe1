"""Staleness simulator: N workers and one server in one process, pushes ordered by a delay model or a log.

    python -m hpdl.simulate --algorithm A --workers N [--delay DIST] [--model mlp|cnn]
        [--epochs E | --steps S] [--batch-size b] [--lr LR] [--seed S] [--data FILE]
        [--record FILE] [--metrics FILE] [hyper-parameter flags]

ends with `RESULT {json}`: test_acc, test_loss, train_loss, updates, mean_delay, max_delay,
wall_s and the run's shape. Everything is a function of the arguments, so equal arguments
give equal numbers.

How a parameter-server run is simulated
---------------------------------------
Worker m is what a real replica m would be: its own flat parameter copy, the batches of
`Loader(replica=m, replicas=N, seed)` in order, dropout keys `worker_key(seed, m, step)`,
learning rate `schedule(step)` at its local step, and the algorithm's WorkerRule. It pushes
after each step its rule names and after its last step. The server is the algorithm's
ServerRule, the same code an MPI parameter server runs. A run is fully described by its
PUSH ORDER: for each server version t = 0, 1, ... the worker whose push is applied, and
the version f_t = t - delay_t of the weights that push was computed from. Event loop:

  * at version f, a worker due to start its next push receives the server's state: the
    reply to its previous push if f is right after it (f = t_prev + 1), else a fresh
    `fetch` (parameter servers whose reply is the weights: asgd, dcasgd). Its first push
    starts from w0, which it shares with the server. It then runs its local steps up to
    its next push, which waits;
  * push t is applied (`server.apply`) and recorded (version, worker, worker step, delay).

So worker m's k-th push is computed from exactly what it received after its (k-1)-th,
each worker has one push in flight, and the server applies pushes in order: replaying a
recorded order (`--delay log:FILE`, from this simulator's or an MPI run's `--record`)
reproduces that run's final parameters bit for bit, given equal rules, data, seed and
learning rates. The delay of a push is the server's `staleness` when it is applied.

Push orders for `--delay constant:D` and `uniform:A,B`:
  * asgd, dcasgd-c, dcasgd-a (the reply is the weights): workers push ROUND-ROBIN, push t
    by worker t mod N, and push t is computed from version t - d_t (d_t = D, or drawn
    uniformly from A..B by a generator seeded with --seed): the worker fetches that
    version and computes. So every push has exactly the requested delay, except that the
    first pushes cannot be older than version 0 (delay min(d_t, t)). One push in flight
    per worker means d_t <= N-1; d_t = N-1 is the reply to the worker's previous push, so
    constant:N-1 is N round-robin workers that never wait.
  * easgd, eamsgd (the reply is the elastic difference, always used at once): a push's
    delay is the number of other pushes applied since the worker's previous one. After
    each push the worker asks to come back d_t + 1 versions later; the server takes the
    requests in that order (ties: lower worker first), starting with workers 0..N-1. So
    constant:N-1 is round-robin with every delay N-1 after the first round, while with N
    workers always busy the realized mean delay is about N-1 whatever is asked: other
    distributions only shape the order. The realized delays are reported.
Allreduce algorithms (sync, avg, bmuf, easgd-sync) run the N workers in lockstep and have
no delay. Sequential SGD is `--algorithm asgd --workers 1 --delay constant:0`.
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import yaml
from threadpoolctl import threadpool_limits

from .algorithms import registry
from .algorithms.avg import avg_sync
from .algorithms.easgd import easgd_sync_center, easgd_sync_worker
from .algorithms.registry import AlgorithmError, AlgorithmSpec
from .algorithms.sync import sync_sgd
from .backend import Backend, BackendError, to_host
from .data import DataError, Loader
from .data.loader import open_split
from .delaylog import DelayLog, DelayLogError
from .flat import Flat
from .metrics import Metrics, print_result, progress
from .models import Model, build_model
from .optim import make_schedule
from .trainer import evaluate, loss_and_grads


class SimulationError(ValueError):
    """Simulator options that cannot run; one line for the CLI."""


USER_ERRORS = (SimulationError, AlgorithmError, DelayLogError, DataError, BackendError)


@dataclass
class SimConfig:
    algorithm: str
    workers: int = 4
    delay: str = ""              # "" = constant:N-1 for parameter-server algorithms
    model: str = "mlp"
    model_options: dict = field(default_factory=dict)
    epochs: int = 1
    steps: int = 0               # local steps per worker; 0 = epochs x batches per epoch
    batch_size: int = 128
    lr: float = 0.05
    lr_schedule: str = "constant"
    seed: int = 0
    data: str = "data/mnist.h5"
    dtype: str = "float32"
    device: str = "cpu"
    record: str = ""
    metrics: str = ""
    log_every: int = 100
    progress: bool = False
    hyper: dict = field(default_factory=dict)  # given hyper-parameters; the rest default


@dataclass
class Outcome:
    result: dict
    final: np.ndarray            # host copy of the evaluated flat parameters
    log: DelayLog | None         # the push order (parameter-server algorithms)


def worker_key(seed: int, worker: int, step: int) -> tuple[int, ...]:
    """The dropout key of a worker's local step (a real worker must use the same to replay exactly)."""
    return (seed, step, worker)


# ---------------------------------------------------------------------------------------
# delay models


@dataclass(frozen=True)
class DelayModel:
    """--delay: constant:D, uniform:A,B (inclusive) or log:FILE."""

    kind: str
    low: int = 0
    high: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> "DelayModel":
        kind, _, arg = text.partition(":")
        if kind == "log" and arg:
            return cls("log", path=arg)
        try:
            bounds = [int(a) for a in arg.split(",")]
        except ValueError:
            bounds = []
        if (kind, len(bounds)) not in (("constant", 1), ("uniform", 2)):
            raise SimulationError(f"--delay must be constant:D, uniform:A,B or log:FILE, got {text!r}")
        low, high = bounds[0], bounds[-1]
        if not 0 <= low <= high:
            raise SimulationError(f"--delay {text}: delays must satisfy 0 <= A <= B")
        return cls(kind, low, high)

    def sampler(self, seed: int) -> Callable[[], int]:
        if self.kind == "constant":
            return lambda: self.low
        rng = np.random.default_rng((seed, 0xDE1A7))  # its own stream: data order is untouched
        return lambda: int(rng.integers(self.low, self.high + 1))


def round_robin_fetch_order(delays: DelayModel, n_workers: int, pushes: int, seed: int) -> list[tuple[int, int]]:
    """(worker, fetch version) per push, for servers that reply with weights: push t is
    worker t mod N's, computed from version t - min(d_t, t)."""
    if delays.high > n_workers - 1:
        raise SimulationError(f"--delay: with {n_workers} workers and one push in flight each, delays can "
                              f"be at most workers-1 = {n_workers - 1}")
    draw = delays.sampler(seed)
    return [(t % n_workers, t - min(draw(), t)) for t in range(pushes * n_workers)]


def arrival_order(delays: DelayModel, n_workers: int, pushes: int, seed: int) -> list[tuple[int, int]]:
    """(worker, fetch version) per push, for servers whose reply the worker must take at once:
    after each push the worker asks to come back d_t + 1 versions later; requests are served
    in order (ties: lower worker first), so a fetch is always right after the previous push."""
    draw = delays.sampler(seed)
    queue = [(m, m) for m in range(n_workers)]  # (requested version, worker): first round in order
    left, previous, order = [pushes] * n_workers, [-1] * n_workers, []
    while queue:
        _, m = heapq.heappop(queue)
        t = len(order)
        order.append((m, previous[m] + 1))
        previous[m], left[m] = t, left[m] - 1
        if left[m]:
            heapq.heappush(queue, (t + 1 + draw(), m))
    return order


def logged_order(log: DelayLog, n_workers: int, path: str) -> list[tuple[int, int]]:
    if log.n_workers != n_workers:
        raise SimulationError(f"{path}: recorded with {log.n_workers} workers, not --workers {n_workers}")
    if len(log) and next(iter(log)).version != 0:
        raise SimulationError(f"{path}: starts at version {next(iter(log)).version}; a replay needs version 0")
    return [(r.worker, r.version - r.delay) for r in log]


# ---------------------------------------------------------------------------------------
# workers


class Workers:
    """N workers' parameters, batch streams and step counters; gradients come out flat.

    With `copies=1` every worker shares one parameter set (synchronous SGD).
    """

    def __init__(self, model: Model, n: int, copies: int, train: tuple, cfg: SimConfig, backend: Backend,
                 steps: int, steps_per_epoch: int):
        xp, dtype = backend.xp, backend.dtype
        self.layers, self.xp, self.seed, self.n = model.layers, xp, cfg.seed, n
        self.params, self.flats = [], []
        for _ in range(copies):
            params = model.init(cfg.seed, xp, dtype)
            self.params.append(params)
            self.flats.append(Flat.adopt(model.layers, params, xp, dtype))
        if copies == 1:
            self.params, self.flats = self.params * n, self.flats * n
        self.batches = [self._stream(Loader(train, "train", cfg.batch_size, replica=m, replicas=n,
                                            seed=cfg.seed, xp=xp, dtype=dtype)) for m in range(n)]
        self.step = [0] * n
        self.steps = steps
        # The training loss reported is the mean over each worker's last epoch of steps.
        self.tail_from = steps - min(steps, steps_per_epoch)
        self.tail_sum, self.tail_n = 0.0, 0
        self.loss_sum, self.loss_n = 0.0, 0

    @staticmethod
    def _stream(loader: Loader):
        for epoch in itertools.count():
            yield from loader.epoch(epoch)

    def w(self, m: int):
        return self.flats[m].vector

    def grad(self, m: int):
        """The gradient of worker m's next batch at its parameters, as one flat vector."""
        k = self.step[m]
        if k >= self.steps:
            raise SimulationError(f"worker {m} would need more than the {self.steps} local steps "
                                  "of --steps/--epochs")
        x, y = next(self.batches[m])
        loss, grads = loss_and_grads(self.layers, self.params[m], x, y, worker_key(self.seed, m, k))
        self.step[m] = k + 1
        loss = float(loss)
        self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + 1
        if k >= self.tail_from:
            self.tail_sum, self.tail_n = self.tail_sum + loss, self.tail_n + 1
        # Flat's layout: layer by layer, each layer's trainable names in order.
        return self.xp.concatenate([grads[i][name].ravel() for i, layer in enumerate(self.layers)
                                    for name in layer.trainable])

    def take_loss(self) -> float:
        """Mean loss since the last call."""
        mean = self.loss_sum / self.loss_n if self.loss_n else float("nan")
        self.loss_sum, self.loss_n = 0.0, 0
        return mean

    def advance(self, m: int, rule, schedule: Callable[[int], float]):
        """Worker m's local steps up to its next push: (payload, push step, its lr)."""
        w = self.w(m)
        while True:
            k = self.step[m]
            rule.lookahead(w)
            g = self.grad(m)
            lr = schedule(k)
            rule.local_step(w, g, lr)
            if rule.should_push(k) or k == self.steps - 1:
                return rule.payload(w), k, lr


def pushes_per_worker(rule, steps: int) -> int:
    return sum(1 for k in range(steps) if rule.should_push(k) or k == steps - 1)


# ---------------------------------------------------------------------------------------
# runners: each returns (evaluated flat weights, delay log or None, number of updates)


def run_ps(spec: AlgorithmSpec, hyper: dict, cfg: SimConfig, workers: Workers, schedule, metrics: Metrics):
    """The parameter-server event loop described in the module docstring."""
    n = workers.n
    server = spec.make_server(workers.w(0), n, hyper)
    rules = [spec.make_worker(workers.w(m), hyper) for m in range(n)]
    if any(rules[0].should_fetch(k) != rules[0].should_push(k) for k in range(workers.steps - 1)):
        raise SimulationError("the simulator ties each fetch to a push (a delay log records pushes only): "
                              "use --n-fetch equal to --n-push")
    delay_text = cfg.delay or f"constant:{n - 1}"
    delays = DelayModel.parse(delay_text)
    logged_steps = None
    if delays.kind == "log":
        recorded = DelayLog.read(delays.path)
        order = logged_order(recorded, n, delays.path)
        logged_steps = recorded.column("worker_step")
    else:
        make = round_robin_fetch_order if server.replies_weights else arrival_order
        order = make(delays, n, pushes_per_worker(rules[0], workers.steps), cfg.seed)
    where = delays.path or f"--delay {delay_text}"

    mine: list[list[int]] = [[] for _ in range(n)]  # each worker's push versions, in order
    for t, (m, _) in enumerate(order):
        mine[m].append(t)
    nth = [0] * n                 # the worker's next push: mine[m][nth[m]]
    pending: list[Any] = [None] * n
    due: dict[int, list[int]] = {}  # version -> workers that fetch it before it is applied to

    def start(m: int, t_prev: int, reply) -> None:
        """After its push t_prev (-1: none yet), worker m gets the state its next push starts from."""
        t_next = mine[m][nth[m]]
        f = order[t_next][1]
        if f <= t_prev:
            raise SimulationError(f"{where}: worker {m}'s push at version {t_next} was computed from version {f}, "
                                  f"before its previous push (version {t_prev}) was applied")
        if f == t_prev + 1:  # the reply (or, before its first push, w0 which it shares with the server)
            if reply is not None:
                rules[m].on_reply(workers.w(m), reply)
            pending[m] = workers.advance(m, rules[m], schedule)
        elif server.replies_weights:
            due.setdefault(f, []).append(m)
        else:
            raise SimulationError(f"{where}: worker {m}'s push at version {t_next} was computed from version {f}, "
                                  f"but a {spec.name} worker continues from the reply to its previous push")

    log = DelayLog(n, {"algorithm": spec.name, "source": "hpdl.simulate", "delay": delay_text,
                       "steps": workers.steps, "hyper": hyper})
    for m in range(n):
        if mine[m]:
            start(m, -1, None)
    bar = progress(len(order), 0, cfg.progress, desc="simulate")
    delay_sum = 0
    for t, (m, _) in enumerate(order):
        for other in due.pop(t, ()):
            rules[other].on_reply(workers.w(other), server.fetch(other))
            pending[other] = workers.advance(other, rules[other], schedule)
        payload, step, lr = pending[m]
        pending[m] = None
        if logged_steps is not None and logged_steps[t] != step:
            raise SimulationError(f"{where}: row {t}: worker {m} pushed after step {logged_steps[t]} there but "
                                  f"after step {step} here (different --n-push, --tau, --steps or --epochs?)")
        delay = server.staleness(m)
        log.append(server.version, m, step, delay)
        reply = server.apply(m, payload, lr)
        nth[m] += 1
        if nth[m] < len(mine[m]):
            start(m, t, reply)
        bar.update()
        delay_sum += delay
        if (t + 1) % cfg.log_every == 0:
            metrics.write(kind="train", update=t + 1, loss=workers.take_loss(),
                          mean_delay=delay_sum / cfg.log_every)
            delay_sum = 0
    bar.close()
    return server.w, log, len(order)


def worker_sum(vectors: list):
    """Σ of the workers' vectors in worker order (an allreduce's sum, in one fixed order)."""
    total = vectors[0].copy()
    for v in vectors[1:]:
        total += v
    return total


def run_periodic(spec: AlgorithmSpec, hyper: dict, cfg: SimConfig, workers: Workers, schedule, metrics: Metrics):
    """avg and bmuf: each worker runs its local steps to its push; the mean of their weights
    goes through avg_sync (and bmuf_sync), and every worker continues from the result."""
    n = workers.n
    rules = [spec.make_worker(workers.w(m), hyper) for m in range(n)]
    sync_kw = spec.server_kwargs(hyper)
    w_global, delta = workers.w(0).copy(), workers.xp.zeros_like(workers.w(0))  # BMUF's state
    rounds = pushes_per_worker(rules[0], workers.steps)
    bar = progress(rounds, 0, cfg.progress, desc="simulate")
    new = w_global
    for r in range(rounds):
        mean = avg_sync(worker_sum([workers.advance(m, rules[m], schedule)[0] for m in range(n)]), n)
        new = mean if spec.server is avg_sync else spec.server(w_global, mean, delta, **sync_kw)
        for m in range(n):
            rules[m].on_reply(workers.w(m), new)
        bar.update()
        if (r + 1) % cfg.log_every == 0:
            metrics.write(kind="train", update=r + 1, loss=workers.take_loss())
    bar.close()
    return new, None, rounds


def run_sync(spec: AlgorithmSpec, hyper: dict, cfg: SimConfig, workers: Workers, schedule, metrics: Metrics):
    """Synchronous SGD: every step, the workers' gradients at the one shared weight vector."""
    w = workers.w(0)
    bar = progress(workers.steps, 0, cfg.progress, desc="simulate")
    for k in range(workers.steps):
        sync_sgd(w, worker_sum([workers.grad(m) for m in range(workers.n)]), workers.n, schedule(k))
        bar.update()
        if (k + 1) % cfg.log_every == 0:
            metrics.write(kind="train", update=k + 1, loss=workers.take_loss())
    bar.close()
    return w, None, workers.steps


def run_easgd_sync(spec: AlgorithmSpec, hyper: dict, cfg: SimConfig, workers: Workers, schedule,
                   metrics: Metrics):
    """Synchronous EASGD: every step, each worker's elastic SGD step, then the centre's."""
    n, rho = workers.n, hyper["rho"]
    center = workers.w(0).copy()  # x̃ starts at w0 like every worker
    bar = progress(workers.steps, 0, cfg.progress, desc="simulate")
    for k in range(workers.steps):
        lr = schedule(k)
        x_sum = worker_sum([workers.w(m) for m in range(n)])  # before the workers' steps
        for m in range(n):
            easgd_sync_worker(workers.w(m), center, workers.grad(m), lr, rho)
        easgd_sync_center(center, x_sum, n, lr, rho)
        bar.update()
        if (k + 1) % cfg.log_every == 0:
            metrics.write(kind="train", update=k + 1, loss=workers.take_loss())
    bar.close()
    return center, None, workers.steps


RUNNERS = {"sync": run_sync, "avg": run_periodic, "bmuf": run_periodic, "easgd-sync": run_easgd_sync}


def simulate(cfg: SimConfig) -> Outcome:
    """Run the simulation that `cfg` describes."""
    t0 = time.perf_counter()
    spec = registry.get(cfg.algorithm)
    if spec.kind == "shared-memory":
        raise SimulationError("hogwild has no server to simulate: its update is asgd's with --n-push 1 "
                              "and no lock, so simulate it with --algorithm asgd")
    _check(cfg, spec)
    backend = Backend(cfg.device, cfg.dtype)
    try:
        model = build_model(cfg.model, **cfg.model_options)
    except ValueError as e:
        raise SimulationError(str(e)) from None
    hyper = spec.resolve(cfg.hyper, cfg.workers, cfg.lr)
    train = open_split(cfg.data, "train")
    spe = len(train[1]) // (cfg.batch_size * cfg.workers)
    if spe == 0:
        raise SimulationError(f"--batch-size {cfg.batch_size} x {cfg.workers} workers exceeds the "
                              f"{len(train[1])} training samples")
    steps = cfg.steps or cfg.epochs * spe
    copies = 1 if spec.name == "sync" else cfg.workers
    workers = Workers(model, cfg.workers, copies, train, cfg, backend, steps, spe)
    schedule = make_schedule(cfg.lr_schedule, cfg.lr, steps)
    metrics = Metrics(cfg.metrics)
    run = run_ps if spec.kind == "ps" else RUNNERS[spec.name]
    final, log, updates = run(spec, hyper, cfg, workers, schedule, metrics)

    test = Loader(cfg.data, "test", 1000, shuffle=False, drop_last=False, xp=backend.xp, dtype=backend.dtype)
    params = model.init(cfg.seed, backend.xp, backend.dtype)
    Flat.adopt(model.layers, params, backend.xp, backend.dtype).vector[...] = final
    test_loss, test_acc = evaluate(model.layers, params, test)
    metrics.write(kind="eval", test_loss=test_loss, test_acc=test_acc)
    metrics.close()
    if log is not None and cfg.record:
        log.write(cfg.record)
    done = max(workers.step)
    result = {"algorithm": spec.name, "workers": cfg.workers, "model": cfg.model,
              "delay": (cfg.delay or f"constant:{cfg.workers - 1}") if log is not None else None,
              "hyper": hyper, "test_acc": test_acc, "test_loss": test_loss,
              "train_loss": workers.tail_sum / workers.tail_n if workers.tail_n else float("nan"),
              "updates": updates, "steps": done, "epochs": done / spe,
              "samples": sum(workers.step) * cfg.batch_size,
              **(log.stats() if log is not None else {"mean_delay": 0.0, "max_delay": 0}),
              "wall_s": time.perf_counter() - t0}
    return Outcome(result, to_host(final).copy(), log)


def _check(cfg: SimConfig, spec: AlgorithmSpec) -> None:
    if cfg.workers < 1 or cfg.batch_size < 1 or cfg.epochs < 1 or cfg.steps < 0 or cfg.log_every < 1:
        raise SimulationError("--workers, --batch-size, --epochs and --log-every must be >= 1, --steps >= 0")
    if not cfg.lr > 0:
        raise SimulationError(f"--lr must be positive, got {cfg.lr}")
    if cfg.model not in ("mlp", "cnn"):
        # Their parameters are all trainable: no per-worker buffers (BatchNorm) to reconcile.
        raise SimulationError(f"--model must be mlp or cnn, got {cfg.model!r}")
    if spec.kind != "ps" and (cfg.delay or cfg.record):
        raise SimulationError(f"--delay and --record apply to parameter-server algorithms; {spec.name} "
                              "is synchronous")
    if cfg.delay:
        DelayModel.parse(cfg.delay)  # a malformed --delay fails before any work


# ---------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpdl.simulate", description=__doc__.split("\n")[0],
                                epilog="The push orders and their delays are explained in hpdl/simulate.py.")
    p.add_argument("--algorithm", required=True, help=", ".join(
        f"{name} ({spec.kind})" for name, spec in registry.ALGORITHMS.items()))
    p.add_argument("--workers", type=int, default=4, help="simulated workers N")
    p.add_argument("--delay", default="", help="constant:D | uniform:A,B | log:FILE (parameter-server "
                   "algorithms; default constant:N-1)")
    p.add_argument("--model", default="mlp", help="mlp or cnn")
    p.add_argument("--model-options", default="{}", help="builder options as a YAML mapping, e.g. '{hidden: [32]}'")
    p.add_argument("--epochs", type=int, default=1, help="passes over each worker's share of the data")
    p.add_argument("--steps", type=int, default=0, help="local steps per worker (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=128, help="samples per worker step")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--lr-schedule", default="constant", choices=("constant", "step", "cosine"),
                   help="over each worker's local steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="data/mnist.h5")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu", "auto"))
    p.add_argument("--threads", type=int, default=0, help="BLAS threads (0: all cores)")
    p.add_argument("--record", default="", help="write the push order as a delay log (HDF5) here")
    p.add_argument("--metrics", default="", help="append JSON-lines metrics here")
    p.add_argument("--log-every", type=int, default=100, help="updates between metrics lines")
    p.add_argument("--progress", action="store_true", help="progress bar on stderr")
    registry.add_arguments(p)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[SimConfig, int]:
    """(the configuration, BLAS threads) from the command line."""
    args = build_parser().parse_args(argv)
    try:
        options = yaml.safe_load(args.model_options)
    except yaml.YAMLError as e:
        raise SimulationError(f"--model-options is not YAML: {' '.join(str(e).split())}") from None
    if not isinstance(options, dict):
        raise SimulationError(f"--model-options must be a mapping like '{{hidden: [32]}}', got {args.model_options!r}")
    cfg = SimConfig(
        algorithm=args.algorithm, workers=args.workers, delay=args.delay, model=args.model,
        model_options=options, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, lr_schedule=args.lr_schedule, seed=args.seed, data=args.data, dtype=args.dtype,
        device=args.device, record=args.record, metrics=args.metrics, log_every=args.log_every,
        progress=args.progress, hyper=registry.given_hyper(args))
    return cfg, args.threads


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, threads = parse_args(argv)
        with threadpool_limits(threads or os.cpu_count()):
            outcome = simulate(cfg)
    except USER_ERRORS as e:
        print(f"hpdl.simulate: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("hpdl.simulate: interrupted", file=sys.stderr)
        return 130
    print_result(outcome.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

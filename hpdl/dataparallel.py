"""Multi-rank training for every algorithm but `sync`: parameter servers, weight averaging, elastic and shared updates.

The ranks are pipeline stages x replicas (+ parameter servers), as for `sync`;
docs/hyperparallel.md draws what each rank does. A worker runs its stage through the
pipeline runtime (StageRunner), which at every step hands the stage's flat gradient to
an updater instead of an optimizer:

  RuleWorker     the algorithm's WorkerRule (local step, payload, reply) and an exchange:
                 PsClient (asgd, dcasgd-c/-a, easgd, eamsgd, pipelined-*: the stage's
                 parameter servers) or WeightAverage (avg, bmuf: an allreduce of the
                 weights over the stage's replicas)
  ElasticSync    easgd-sync: every step an allreduce of the weights and the elastic update
  HogwildWorker  hogwild: lock-free updates of the stage's shared-memory window

A parameter-server rank serves the shards it holds (hpdl.ps.server.serve) until every
worker is done, then sends the trained weights to replica 0 of each stage, which
evaluates them. Flushed schedules (gpipe, 1f1b) make one local step per mini-batch; the
pipelined-* algorithms run `pipedream`, one local step per micro-batch, as one stream.

With one stage, a run matches `hpdl.simulate` step for step: worker m (replica m) takes
the batches of Loader(replica=m, replicas=N, seed), dropout keys worker_key(seed, m, k)
and learning rate schedule(k) at its local step k, and pushes after the steps its rule
names and after its last; its k-th push is computed from the reply to its previous one.
The server applies pushes in arrival order and can record them (--record) so that the
simulator replays the run bit for bit.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from .algorithms.avg import avg_sync
from .algorithms.easgd import easgd_sync_center, easgd_sync_worker
from .algorithms.hogwild import hogwild_apply
from .algorithms.registry import AlgorithmSpec
from .backend import Backend, array_module, to_host
from .comm.device import stager_for
from .comm.p2p import PipeChannel
from .comm.topology import Topology
from .comm.wait import allreduce, wait, waitall
from .config import Config
from .data import Loader
from .delaylog import DelayLog
from .distributed import (
    FAULT_ENV,
    Batches,
    Plan,
    announce,
    check_replicas,
    evaluate_stage,
    gather_trace,
    injected_fault,
    partition,
)
from .flat import Flat
from .hogwild import SharedVector
from .metrics import Metrics, progress
from .optim import make_schedule
from .pipeline import microbatch
from .pipeline.partition import stage_bounds
from .pipeline.runtime import Feed, StageRunner, stage_shapes
from .pipeline.schedules import SCHEDULES
from .ps_checkpoints import PsCheckpoints
from .ps.client import PsClient
from .ps.pipelined import PIPELINED, SCHEDULE, backup_slots, base_spec
from .ps.server import ShardServer, serve
from .ps.shards import stage_servers, stage_shards
from .simulate import worker_key
from .trace import Tracer
from .trainer import test_loader, total_steps

# Test hook for workers of different speeds: "RANK:SECONDS,..." makes those ranks sleep
# that long after every local update.
SLOW_ENV = "HPDL_SLOW_WORKERS"


def injected_sleep(rank: int) -> float:
    """Seconds this rank sleeps after each local update (0 unless HPDL_SLOW_WORKERS names it)."""
    for item in filter(None, os.environ.get(SLOW_ENV, "").split(",")):
        who, _, seconds = item.partition(":")
        if int(who) == rank:
            return float(seconds)
    return 0.0


@dataclass(frozen=True)
class Algorithm:
    """cfg.algorithm resolved: the registry spec whose rules run, its hyper-parameters, the schedule."""

    name: str
    spec: AlgorithmSpec
    hyper: dict
    schedule: str

    @classmethod
    def resolve(cls, cfg: Config, replicas: int) -> "Algorithm":
        spec = base_spec(cfg.algorithm)
        schedule = SCHEDULE if cfg.algorithm in PIPELINED else cfg.schedule
        return cls(cfg.algorithm, spec, spec.resolve(cfg.hyper, replicas, cfg.lr), schedule)


@dataclass(frozen=True)
class Shape:
    """How long a run is: mini-batch steps per worker, and local updates (one per micro-batch when asynchronous)."""

    steps: int
    steps_per_epoch: int
    per_step: int        # local updates per mini-batch step

    @property
    def updates(self) -> int:
        return self.steps * self.per_step

    @classmethod
    def of(cls, cfg: Config, plan: Plan, flush: bool) -> "Shape":
        spe = plan.n_train // (cfg.batch_size * plan.layout.replicas)
        return cls(total_steps(cfg, spe), spe, 1 if flush else plan.n_micro)


# ---------------------------------------------------------------------------------------
# updaters: the StageRunner's step hook, one per kind of algorithm


class RuleWorker:
    """A worker's local updates by its algorithm's WorkerRule, exchanging through `exchange`.

    Update k (0-based) is the rule's local step; then, if the rule pushes after k (or k is
    the last), exchange.push(payload), asking for a reply if the rule fetches after k and
    k is not the last; otherwise, if the rule fetches after k, exchange.fetch(). The rule
    takes whatever comes back: a server answers only when asked, an average always. The
    gradient was taken at `w` after `lookahead`.
    """

    def __init__(self, rule, exchange, w, updates: int):
        self.rule, self.exchange, self.w, self.last = rule, exchange, w, updates - 1
        self.xp = rule.xp
        self.k = 0

    def lookahead(self) -> None:
        self.rule.lookahead(self.w)

    def __call__(self, g, lr: float) -> None:
        k, rule = self.k, self.rule
        rule.local_step(self.w, g, lr)
        reply = None
        if rule.should_push(k) or k == self.last:
            reply = self.exchange.push(rule.payload(self.w), k, lr, rule.should_fetch(k) and k != self.last)
        elif rule.should_fetch(k):
            reply = self.exchange.fetch()
        if reply is not None:
            rule.on_reply(self.w, self.xp.asarray(reply))
        self.k += 1

    def finish(self, final: bool):
        return self.exchange.finish(final)

    def counters(self) -> dict[str, float]:
        return self.exchange.counters()


class WeightAverage:
    """avg and bmuf (§2) as an exchange: a push averages the replicas' weights over the
    stage's communicator (one allreduce) and, for BMUF, filters them by block momentum."""

    def __init__(self, comm: MPI.Comm, spec: AlgorithmSpec, hyper: dict, w, poll: str, check_every: int):
        self.comm, self.n, self.poll, self.check_every = comm, comm.Get_size(), poll, check_every
        self.combine, self.kw = spec.server, spec.server_kwargs(hyper)
        self.w_global, self.delta = w.copy(), array_module(w).zeros_like(w)  # BMUF's state, alike on every replica
        self.sum = w.copy()
        self.new = w
        self.rounds = self.bytes_reduced = 0

    def push(self, payload, step: int, lr: float, reply: bool):
        """The replicas' new common weights (every replica takes them, whatever `reply` says)."""
        self.sum[...] = payload
        allreduce(self.comm, self.sum, poll=self.poll)
        self.bytes_reduced += self.sum.nbytes
        mean = avg_sync(self.sum, self.n)
        self.new = mean if self.combine is avg_sync else self.combine(self.w_global, mean, self.delta, **self.kw)
        self.rounds += 1
        if self.check_every and self.rounds % self.check_every == 0:
            check_replicas(self.comm, [self.new], step + 1, self.poll)
        return self.new

    def finish(self, final: bool):
        return self.new

    def counters(self) -> dict[str, float]:
        return {"allreduce_bytes": self.bytes_reduced, "updates": self.rounds}


class ElasticSync:
    """easgd-sync (§5): every step the replicas' weights are summed (one allreduce); each
    replica takes its elastic SGD step and updates its copy of the centre, alike on all."""

    def __init__(self, comm: MPI.Comm, hyper: dict, w, poll: str, check_every: int):
        self.comm, self.n, self.poll, self.check_every = comm, comm.Get_size(), poll, check_every
        self.w, self.rho = w, hyper["rho"]
        self.center, self.x_sum = w.copy(), w.copy()  # x̃ starts at w0 like every replica
        self.steps = self.bytes_reduced = 0

    def lookahead(self) -> None:
        """Nothing: the elastic step needs no look-ahead."""

    def __call__(self, g, lr: float) -> None:
        self.x_sum[...] = self.w  # the sum is of the weights before this step
        allreduce(self.comm, self.x_sum, poll=self.poll)
        self.bytes_reduced += self.x_sum.nbytes
        easgd_sync_worker(self.w, self.center, g, lr, self.rho)
        easgd_sync_center(self.center, self.x_sum, self.n, lr, self.rho)
        self.steps += 1
        if self.check_every and self.steps % self.check_every == 0:
            check_replicas(self.comm, [self.center], self.steps, self.poll)

    def finish(self, final: bool):
        return self.center

    def counters(self) -> dict[str, float]:
        return {"allreduce_bytes": self.bytes_reduced, "updates": self.steps}


class HogwildWorker:
    """hogwild (§6): each gradient is applied to the stage's shared window without a lock,
    and the next one is taken at the shared weights as they are then (a racy snapshot)."""

    def __init__(self, shared: SharedVector, w):
        self.shared, self.w, self.xp = shared, w, array_module(w)
        self.applied = 0

    def lookahead(self) -> None:
        """Nothing: the snapshot was taken after the previous update."""

    def __call__(self, g, lr: float) -> None:
        hogwild_apply(self.shared.vector, to_host(g), lr)
        self.w[...] = self.xp.asarray(self.shared.vector)
        self.applied += 1

    def finish(self, final: bool):
        self.shared.barrier()  # every replica's last update is in
        out = self.shared.vector.copy()
        self.shared.free()
        return out

    def counters(self) -> dict[str, float]:
        return {"updates": self.applied}


def make_updater(cfg: Config, algo: Algorithm, topo: Topology, w, updates: int, ps_comm: MPI.Comm):
    """The step hook of this worker's stage for `algo`."""
    spec, hyper, replicas = algo.spec, algo.hyper, topo.stage_comm
    if spec.kind == "ps":
        shards = stage_shards(topo.stage, topo.n_stages, topo.layout.ps, w.size)
        client = PsClient(ps_comm, shards, [topo.ps_ranks[sh.ps_index] for sh in shards], w.size, w.dtype, cfg.poll,
                          stager_for(array_module(w)))
        return RuleWorker(spec.make_worker(w, hyper), client, w, updates)
    if spec.kind == "shared-memory":
        return HogwildWorker(SharedVector(replicas, to_host(w), cfg.poll), w)
    if spec.worker is easgd_sync_worker:
        return ElasticSync(replicas, hyper, w, cfg.poll, cfg.debug_checksum)
    average = WeightAverage(replicas, spec, hyper, w, cfg.poll, cfg.debug_checksum)
    return RuleWorker(spec.make_worker(w, hyper), average, w, updates)


# ---------------------------------------------------------------------------------------
# the two roles


class AfterUpdate:
    """Feed.on_step: after each local update, the progress bar, loss metrics, and the test
    hooks (HPDL_SLOW_WORKERS sleeps, HPDL_INJECT_FAULT failures)."""

    def __init__(self, runner: StageRunner, shape: Shape, cfg: Config, sched, reporter: bool, rank: int):
        self.runner, self.shape, self.sched, self.reporter = runner, shape, sched, reporter
        self.log_every = cfg.log_every
        self.bar = progress(shape.steps, 0, cfg.progress and rank == 0)
        self.metrics = Metrics(cfg.metrics, enabled=reporter)
        self.sleep, self.fail_at = injected_sleep(rank), injected_fault(rank)
        self.losses: list[float] = []   # the reporter's loss of each update

    def __call__(self, mb: int) -> None:
        n, per = self.runner.updates, self.shape.per_step
        if (n - 1) // (per * self.shape.steps_per_epoch) == self.fail_at:
            raise RuntimeError(f"fault injected by {FAULT_ENV} in epoch {self.fail_at}")
        if self.reporter:  # the last stage adds an update's loss at its forward passes
            self.losses.append(self.runner.loss_sum)
            self.runner.loss_sum = 0.0
        if n % per == 0:
            self.bar.update()
            step = n // per
            if self.reporter and step % self.log_every == 0:
                self.metrics.write(kind="train", step=step, epoch=(step - 1) // self.shape.steps_per_epoch,
                                   loss=float(np.mean(self.losses[-self.log_every * per:])), lr=self.sched(step - 1))
        if self.sleep:
            time.sleep(self.sleep)

    def train_loss(self) -> float:
        """Mean loss over the last epoch's worth of updates (NaN off the reporter)."""
        tail = self.losses[-self.shape.steps_per_epoch * self.shape.per_step:]
        return float(np.mean(tail)) if tail else float("nan")

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()


def run_worker(cfg: Config, backend: Backend, plan: Plan, algo: Algorithm, topo: Topology, counts: list[int],
               shape: Shape, ps_comm: MPI.Comm, tracer: Tracer) -> tuple[dict, np.ndarray, bytes]:
    """Train this rank's stage replica; (figures, per-stage server figures (none here), weights' digest)."""
    s, P, m = topo.stage, topo.n_stages, topo.replica
    start, stop = stage_bounds(counts)[s]
    xp, dtype, n_micro = backend.xp, backend.dtype, plan.n_micro
    layers = plan.model.layers[start:stop]
    params = plan.model.init(cfg.seed, xp, dtype, start, stop)
    w = Flat.adopt(layers, params, xp, dtype).vector   # the runner's parameters are views of w
    updater = make_updater(cfg, algo, topo, w, shape.updates, ps_comm)
    spec = SCHEDULES[algo.schedule]
    channel = PipeChannel(topo.pipe, s, P, poll=cfg.poll, stager=stager_for(xp)) if P > 1 else None
    tracer.set_name(f"stage {s} / replica {m}")
    runner = StageRunner(layers, params, start, s, P, algo.schedule, n_micro if spec.flush else max(shape.updates, P),
                         None, channel, stage_shapes(plan.model.shapes(), (start, stop)), xp, dtype,
                         tracer=tracer, poll=cfg.poll, update=updater, on_nonfinite=cfg.on_nonfinite)
    has_data = runner.is_first or runner.is_last
    train = Loader(cfg.data, "train", cfg.batch_size, replica=m, replicas=plan.layout.replicas, seed=cfg.seed,
                   xp=xp, dtype=dtype) if has_data else None
    data = EpochBatches(train, shape.steps_per_epoch, n_micro)
    sched = make_schedule(cfg.lr_schedule, cfg.lr, shape.steps, warmup_steps=cfg.warmup_steps)
    hook = AfterUpdate(runner, shape, cfg, sched, runner.is_last and m == 0, topo.rank)
    ckpt = PsCheckpoints(cfg, ps_comm, plan.layout.replicas, counts, shape.steps, shape.steps_per_epoch)
    first = ckpt.restore_worker(plan.resume, updater, w, s, m)
    sizes = microbatch.sizes(cfg.batch_size, n_micro)

    t0 = time.perf_counter()
    if spec.flush:
        weights = microbatch.loss_weights(cfg.batch_size, n_micro)  # this replica's own mean loss
        for k in range(first, shape.steps):
            updater.lookahead()
            runner.run(spec.generator(s, P, n_micro), Feed(
                x=lambda mb: data.part(k, mb, 0), y=lambda mb: data.part(k, mb, 1),
                weight=lambda mb: weights[mb], size=lambda mb: sizes[mb],
                key=lambda mb: worker_key(cfg.seed, m, k) + ((mb,) if n_micro > 1 else ()),
                lr=lambda mb: sched(k), on_step=hook))
            ckpt.worker_step_done(k + 1, updater, w, s, m)
    else:  # one stream: micro-batch j is local update j, of its own mean loss
        runner.run(spec.generator(s, P, shape.updates), Feed(
            x=lambda j: data.part(j // n_micro, j % n_micro, 0), y=lambda j: data.part(j // n_micro, j % n_micro, 1),
            weight=lambda j: 1.0, size=lambda j: sizes[j % n_micro], key=lambda j: worker_key(cfg.seed, m, j),
            lr=lambda j: sched(j // n_micro), on_step=hook))
    backend.synchronize()
    train_time = time.perf_counter() - t0

    final = updater.finish(m == 0)
    figures = {"stage": s, "replica": m, "train_s": train_time, "train_loss": hook.train_loss(),
               "pipe_bytes": channel.bytes_sent if channel is not None else 0, **updater.counters()}
    digest = bytes(32)
    if m == 0:  # replica 0 of every stage evaluates the trained weights, through the pipeline
        w[...] = xp.asarray(final)
        test = test_loader(cfg, xp, dtype) if has_data else None
        loss_sum, correct, n = evaluate_stage(runner, test, plan.n_test)
        if runner.is_last:
            figures |= {"test_loss": loss_sum / n, "test_acc": correct / n}
            hook.metrics.write(kind="eval", step=shape.steps, epoch=shape.steps / shape.steps_per_epoch,
                               test_loss=loss_sum / n, test_acc=correct / n)
        digest = hashlib.sha256(to_host(w).tobytes()).digest()
    hook.close()
    return figures, np.zeros((3, P)), digest


def run_server(cfg: Config, plan: Plan, algo: Algorithm, topo: Topology, counts: list[int], shape: Shape,
               ps_comm: MPI.Comm, tracer: Tracer) -> tuple[dict, np.ndarray, bytes]:
    """Serve the shards this rank holds; (figures, per-stage updates / delay sum / max delay, digest)."""
    P, R, me = topo.n_stages, topo.layout.replicas, topo.role.ps_index
    tracer.set_name(f"parameter server {me}")
    servers = []
    for stage, (start, stop) in enumerate(stage_bounds(counts)):
        if me not in stage_servers(stage, P, topo.layout.ps):
            continue
        layers = plan.model.layers[start:stop]
        w0 = Flat.adopt(layers, plan.model.init(cfg.seed, np, cfg.dtype, start, stop), np, cfg.dtype).vector
        slots = backup_slots(algo.name, stage, P)
        workers = [topo.world_rank(stage, r) for r in range(R)]
        for sh in stage_shards(stage, P, topo.layout.ps, w0.size):
            if sh.ps_index == me:
                rule = algo.spec.make_server(w0[sh.lo:sh.hi], R * slots, algo.hyper)
                log = DelayLog(R) if cfg.record else None
                servers.append(ShardServer(ps_comm, sh, workers, rule, slots, log, cfg.poll))
    ckpt = PsCheckpoints(cfg, ps_comm, R, counts, shape.steps, shape.steps_per_epoch)
    ckpt.restore_servers(plan.resume, servers, algo.spec, algo.hyper)
    t0 = time.perf_counter()
    serve(servers, cfg.poll, tracer, ckpt.server_checkpoint(servers, me))
    train_time = time.perf_counter() - t0
    waitall([srv.send_final(topo.world_rank(srv.shard.stage, 0)) for srv in servers], cfg.poll, peer="replicas 0")
    if cfg.record:  # the layout check left one server holding the whole model
        record(cfg, algo, shape, servers[0])
    per_stage = np.zeros((3, P))
    for srv in servers:
        st = srv.shard.stage
        per_stage[:, st] = (per_stage[0, st] + srv.updates, per_stage[1, st] + srv.delay_sum,
                            max(per_stage[2, st], srv.delay_max))
    figures = {"server": 1, "train_s": train_time, "bytes_sent": sum(s.bytes_sent for s in servers),
               "bytes_received": sum(s.bytes_received for s in servers), "messages": sum(s.messages for s in servers)}
    return figures, per_stage, bytes(32)


def record(cfg: Config, algo: Algorithm, shape: Shape, server: ShardServer) -> None:
    """Write the server's delay log, with what a replay needs to know in its metadata."""
    server.log.meta = {"algorithm": algo.name, "source": "hpdl.train", "workers": server.n_workers,
                       "steps": shape.steps, "hyper": algo.hyper, "batch_size": cfg.batch_size, "lr": cfg.lr,
                       "lr_schedule": cfg.lr_schedule, "seed": cfg.seed, "dtype": cfg.dtype,
                       "params_sha256": hashlib.sha256(server.rule.w.tobytes()).hexdigest()}
    server.log.write(cfg.record)


class EpochBatches:
    """The micro-batches of mini-batch step k, over as many epochs as the run takes, in order."""

    def __init__(self, loader: Loader | None, steps_per_epoch: int, n_micro: int):
        self.loader, self.spe, self.n_micro = loader, steps_per_epoch, n_micro
        self.epoch, self.batches = -1, None

    def part(self, step: int, mb: int, which: int):
        epoch, k = divmod(step, self.spe)
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, Batches(self.loader, epoch, 0, self.n_micro)
        return self.batches.part(k, mb, which)


# ---------------------------------------------------------------------------------------
# the run and its RESULT

# Per-rank figures gathered on rank 0 as float64; then 3 x P per-stage server figures.
FIELDS = ("server", "stage", "replica", "bytes_sent", "bytes_received", "messages", "allreduce_bytes",
          "pipe_bytes", "pushes", "updates", "test_loss", "test_acc", "train_loss", "train_s")
NOT_MEASURED = {"test_loss": np.nan, "test_acc": np.nan, "train_loss": np.nan}  # off the last stage's replica 0


def train_dataparallel(cfg: Config, backend: Backend, plan: Plan, comm=MPI.COMM_WORLD) -> dict | None:
    """Train with cfg.algorithm over all ranks of comm; rank 0 returns the RESULT record, the others None."""
    rank, layout = comm.Get_rank(), plan.layout
    algo = Algorithm.resolve(cfg, layout.replicas)
    topo = Topology.create(comm, layout)
    ps_comm = comm.Dup()  # parameter-server messages never meet other traffic
    counts = partition(cfg, plan.model, layout.stages, plan.n_micro, comm)
    shape = Shape.of(cfg, plan, SCHEDULES[algo.schedule].flush)
    if rank == 0:
        hyper = ", ".join(f"{k} {v}" for k, v in algo.hyper.items())
        announce(f"layout: {layout}; algorithm {algo.name}{f' ({hyper})' if hyper else ''}; "
                 f"schedule {algo.schedule}, {plan.n_micro} micro-batches", counts, plan.model, topo)
    tracer = Tracer(rank, enabled=bool(cfg.trace))
    wait(comm.Ibarrier(), cfg.poll, peer="start")
    if topo.is_ps:
        figures, per_stage, digest = run_server(cfg, plan, algo, topo, counts, shape, ps_comm, tracer)
    else:
        figures, per_stage, digest = run_worker(cfg, backend, plan, algo, topo, counts, shape, ps_comm, tracer)
    if cfg.trace:
        gather_trace(comm, tracer, cfg.trace)
    row = np.array([figures.get(f, NOT_MEASURED.get(f, 0.0)) for f in FIELDS] + per_stage.ravel().tolist())
    rows, digests = gather(comm, row, digest, cfg.poll)
    ps_comm.Free()
    if rank != 0:
        return None
    return summarize(cfg, plan, algo, shape, counts, rows, digests)


def gather(comm: MPI.Comm, row: np.ndarray, digest: bytes, poll: str):
    """Every rank's figures and digest on rank 0 (None elsewhere)."""
    root = comm.Get_rank() == 0
    rows = np.empty((comm.Get_size(), row.size)) if root else None
    digests = np.empty((comm.Get_size(), len(digest)), np.uint8) if root else None
    waitall([comm.Igather(row, rows, root=0), comm.Igather(np.frombuffer(digest, np.uint8), digests, root=0)],
            poll, peer="figures")
    return rows, digests


def summarize(cfg: Config, plan: Plan, algo: Algorithm, shape: Shape, counts: list[int], rows: np.ndarray,
              digests: np.ndarray) -> dict:
    """The RESULT record from every rank's figures."""
    P, R = plan.layout.stages, plan.layout.replicas
    ranks = [dict(zip(FIELDS, r[:len(FIELDS)])) for r in rows]
    per_stage = rows[:, len(FIELDS):].reshape(len(rows), 3, P)
    workers = [r for r in ranks if not r["server"]]
    servers = [r for r in ranks if r["server"]]
    lead = {(int(r["stage"]), int(r["replica"])): i for i, r in enumerate(ranks) if not r["server"]}
    last = ranks[lead[(P - 1, 0)]]
    updates, delay_sum, delay_max = per_stage[:, 0].sum(0), per_stage[:, 1].sum(0), per_stage[:, 2].max(0)
    if algo.spec.kind == "ps":
        total = int(updates.sum())
    elif algo.spec.kind == "shared-memory":  # every replica's every update lands in the shared vector
        total = int(sum(r["updates"] for r in workers if r["stage"] == 0))
    else:
        total = int(ranks[lead[(0, 0)]]["updates"])
    train_s = max(r["train_s"] for r in workers)

    def per_step(rs: list[dict], key: str) -> float:
        return float(np.mean([r[key] for r in rs])) / shape.steps if rs else 0.0

    return {"algorithm": algo.name, "hyper": algo.hyper, "test_acc": float(last["test_acc"]),
            "test_loss": float(last["test_loss"]), "train_loss": float(last["train_loss"]),
            "epochs": shape.steps / shape.steps_per_epoch, "steps": shape.steps, "local_updates": shape.updates,
            "updates": total, "pushes": int(sum(r["pushes"] for r in workers)),
            "mean_delay": float(delay_sum.sum() / updates.sum()) if updates.sum() else 0.0,
            "max_delay": int(delay_max.max()),
            "stage_delays": [{"stage": s, "updates": int(updates[s]),
                              "mean_delay": float(delay_sum[s] / updates[s]) if updates[s] else 0.0,
                              "max_delay": int(delay_max[s])} for s in range(P)] if servers else [],
            "samples_per_s": shape.steps * cfg.batch_size * R / train_s if train_s else 0.0, "train_s": train_s,
            "layout": str(plan.layout), "partition": counts, "schedule": algo.schedule,
            "microbatches": plan.n_micro,
            "bytes_per_step": {"worker_sent": per_step(workers, "bytes_sent"),
                               "worker_received": per_step(workers, "bytes_received"),
                               "server_sent": per_step(servers, "bytes_sent"),
                               "server_received": per_step(servers, "bytes_received"),
                               "allreduce": per_step(workers, "allreduce_bytes"),
                               "pipeline": per_step(workers, "pipe_bytes")},
            "params_sha256": [digests[lead[(s, 0)]].tobytes().hex() for s in range(P)]}

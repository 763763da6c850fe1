"""Multi-rank training: layout, partition, and the epoch loop over pipeline stages x replicas."""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from mpi4py import MPI

from .backend import Backend, to_host
from .checkpoint_sharded import Resume
from .comm.device import stager_for
from .comm.p2p import PipeChannel
from .comm.topology import Layout, Topology, choose_layout
from .comm.wait import wait
from .config import Config, ConfigError
from .data import Loader, split_size
from .metrics import Metrics, progress
from .models import Model, build_model
from .optim import make_schedule
from .optim.largebatch import GAIN_METHODS
from .pipeline import microbatch
from .pipeline.partition import balance, describe, flop_costs, parse_partition, profile_costs, stage_bounds
from .pipeline.runtime import Feed, StageRunner, stage_shapes
from .pipeline.schedules import SCHEDULES
from .ps.pipelined import PIPELINED
from .ps_checkpoints import PsResume
from .stage_checkpoints import StageCheckpoints, plan_resume
from .trace import Tracer, from_bytes, to_bytes, write_trace
from .trainer import (EVAL_BATCH, lr_record, make_run_lr_method, make_run_optimizer, make_run_scaler, scaler_record,
                      test_loader, total_steps)

RESULT_TAG = 0x4844  # "HD": the final figures, last stage -> rank 0
# Fault injection for the tests of job-wide failure: "RANK:EPOCH" raises on that rank when
# that epoch starts, while its peers are blocked in communication.
FAULT_ENV = "HPDL_INJECT_FAULT"


def injected_fault(rank: int) -> int:
    """The epoch at whose start this rank must fail, or -1."""
    fault_rank, _, fault_epoch = os.environ.get(FAULT_ENV, "-1").partition(":")
    return int(fault_epoch or 0) if int(fault_rank) == rank else -1


@dataclass
class Plan:
    """What every rank decides alike before any communication."""

    model: Model
    layout: Layout
    n_micro: int
    n_train: int
    n_test: int
    resume: Resume | PsResume | None = None


def plan_run(cfg: Config, world: int) -> Plan:
    """Model, layout and data sizes; raises a user error (identically on every rank) on a misfit."""
    if cfg.eval_every:
        raise ConfigError("--eval-every: multi-rank runs evaluate at epoch ends only")
    model = build_model(cfg.model, **cfg.model_options)
    layout, n_micro = plan_layout(cfg, model, world)
    if cfg.partition not in ("auto", "flops"):
        partition(cfg, model, layout.stages, n_micro, None)
    n_train = split_size(cfg.data, "train")
    if n_train < cfg.batch_size * layout.replicas * cfg.accumulate:
        raise ConfigError(f"--batch-size {cfg.batch_size} x {layout.replicas} replicas x --accumulate "
                          f"{cfg.accumulate} exceeds the {n_train} training samples")
    return Plan(model, layout, n_micro, n_train, split_size(cfg.data, "test"), plan_resume(cfg, model))


def plan_layout(cfg: Config, model: Model, world: int):
    """Layout and micro-batch count; raises ConfigError on a misfit."""
    try:
        layout = choose_layout(world, len(model.layers), cfg.stages or None, cfg.replicas or None, cfg.ps)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_algorithm_layout(cfg, layout)
    # One stage is no pipeline: its mini-batch goes through in one pass, as in one process.
    n_micro = cfg.microbatches or (1 if layout.stages == 1 else min(cfg.batch_size, 2 * layout.stages))
    if not 1 <= n_micro <= cfg.batch_size:
        raise ConfigError(f"--microbatches must be between 1 and --batch-size {cfg.batch_size}, got {n_micro}")
    check_large_batch(cfg, layout, n_micro)
    check_precision(cfg, layout)
    return layout, n_micro


def check_precision(cfg: Config, layout: Layout) -> None:
    """Where fp16's dynamic loss scaling applies: every rank must agree on each update's overflow, which
    the gradient allreduce settles among the replicas of one stage but nothing settles between stages."""
    if cfg.precision == "fp16" and (layout.stages > 1 or not SCHEDULES[cfg.schedule].flush):
        raise ConfigError(f"--precision fp16: dynamic loss scaling supports --stages 1 with --schedule gpipe or "
                          f"1f1b, not {layout.stages} stages with {cfg.schedule}; use --precision fp32 or tf32")


def check_large_batch(cfg: Config, layout: Layout, n_micro: int) -> None:
    """Where gradient accumulation and the large-batch learning-rate methods apply."""
    if (cfg.accumulate > 1 or cfg.lr_method != "none") and \
            (cfg.algorithm != "sync" or not SCHEDULES[cfg.schedule].flush):
        raise ConfigError("--accumulate and --lr-method shape the updates of synchronous data parallelism: "
                          "use --algorithm sync with --schedule gpipe or 1f1b")
    if cfg.lr_method in GAIN_METHODS and (layout.stages, n_micro) != (1, 1):
        raise ConfigError(f"--lr-method {cfg.lr_method} compares whole-model gradients of --batch-size "
                          f"samples each: use --stages 1 --microbatches 1")


def check_algorithm_layout(cfg: Config, layout: Layout) -> None:
    """What an algorithm needs of the layout and schedule (the rest is in config.validate_algorithm)."""
    if cfg.record and (layout.stages, layout.ps) != (1, 1):
        raise ConfigError("--record: the simulator replays one server holding the whole model; use "
                          "--stages 1 --ps 1")
    if cfg.algorithm not in ("sync", *PIPELINED) and not SCHEDULES[cfg.schedule].flush:
        raise ConfigError(f"{cfg.algorithm} makes one local step per mini-batch: use --schedule gpipe or 1f1b "
                          f"(the asynchronous pipeline is --algorithm {' or '.join(PIPELINED)})")


def partition(cfg: Config, model: Model, n_stages: int, n_micro: int, comm) -> list[int]:
    """Layers per stage: by hand, by FLOPs, or balanced from a timing profile taken on rank 0."""
    try:
        if cfg.partition not in ("auto", "flops"):
            return parse_partition(cfg.partition, len(model.layers))
        if cfg.partition == "flops":
            return balance(flop_costs(model), n_stages)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    counts = np.zeros(n_stages, dtype=np.int64)
    if comm.Get_rank() == 0:  # timings differ between ranks: one rank decides for all
        counts[:] = balance(profile_costs(model, max(1, cfg.batch_size // n_micro)), n_stages)
    comm.Bcast(counts, root=0)
    return [int(c) for c in counts]


class Batches:
    """The micro-batches of a run, fetched lazily in order from a replica's loader."""

    def __init__(self, loader: Loader | None, epoch: int, start: int, n_micro: int):
        self.it: Iterator | None = loader.epoch(epoch, start) if loader is not None else None
        self.n_micro, self.start = n_micro, start
        self.index, self.parts = start - 1, None

    def part(self, batch_index: int, mb: int, which: int):
        """Slice `which` (0: x, 1: y) of micro-batch mb of the epoch's batch `batch_index`."""
        while self.index < batch_index:
            x, y = next(self.it)
            self.parts = [(x[a:b], y[a:b]) for a, b in microbatch.bounds(len(y), self.n_micro)]
            self.index += 1
        return self.parts[mb][which]


def train_distributed(cfg: Config, backend: Backend, plan: Plan, comm=MPI.COMM_WORLD) -> dict | None:
    """Train over all ranks of comm; rank 0 returns the RESULT record, the others None."""
    rank = comm.Get_rank()
    model, layout, n_micro, n_train, n_test = plan.model, plan.layout, plan.n_micro, plan.n_train, plan.n_test
    topo = Topology.create(comm, layout)
    counts = partition(cfg, model, layout.stages, n_micro, comm)
    if rank == 0:
        announce(f"layout: {layout}; schedule {cfg.schedule}, {n_micro} micro-batches of "
                 f"{cfg.batch_size // n_micro}-{-(-cfg.batch_size // n_micro)} samples", counts, model, topo)

    s, P, R = topo.stage, layout.stages, layout.replicas
    start, stop = stage_bounds(counts)[s]
    xp, dtype = backend.xp, backend.dtype
    layers = model.layers[start:stop]
    params = model.init(cfg.seed, xp, dtype, start, stop)
    tracer = Tracer(rank, enabled=bool(cfg.trace))
    tracer.set_name(f"stage {s} / replica {topo.replica}")
    channel = PipeChannel(topo.pipe, s, P, stager=stager_for(xp)) if P > 1 else None
    # An update runs I = --accumulate mini-batches of n_micro micro-batches through the pipeline.
    # Asynchronous schedules run an epoch's micro-batches as one stream: size the stash for it.
    I = cfg.accumulate
    stream = n_micro * I if SCHEDULES[cfg.schedule].flush else max(n_micro, P)
    spe = n_train // (cfg.batch_size * R * I)
    total = total_steps(cfg, spe)
    method = make_run_lr_method(cfg, layers, R, total) if cfg.lr_method != "none" else None
    scaler = make_run_scaler(cfg)
    runner = StageRunner(layers, params, start, s, P, cfg.schedule, stream, make_run_optimizer(cfg, layers),
                         channel, stage_shapes(model.shapes(), (start, stop)), xp, dtype,
                         stage_comm=topo.stage_comm, tracer=tracer, poll=cfg.poll, lr_method=method, scaler=scaler)
    has_data = runner.is_first or runner.is_last
    train = Loader(cfg.data, "train", cfg.batch_size, replica=topo.replica, replicas=R, seed=cfg.seed,
                   xp=xp, dtype=dtype) if has_data else None
    test = test_loader(cfg, xp, dtype) if has_data and topo.replica == 0 else None

    sched = make_schedule(cfg.lr_schedule, cfg.lr, total, warmup_steps=cfg.warmup_steps)
    spec = SCHEDULES[cfg.schedule]
    reporter = runner.is_last and topo.replica == 0
    metrics = Metrics(cfg.metrics, enabled=reporter)
    ckpt = StageCheckpoints(cfg, comm, topo, params, runner.optimizer, (start, stop), spe, method, scaler)
    resumed = ckpt.restore(plan.resume)
    bar = progress(total, resumed, cfg.progress and rank == 0)
    sizes = microbatch.sizes(cfg.batch_size, n_micro)
    # Flushed: each micro-batch's loss weighs b_i / (R B I), so the sum is the global mean.
    # Asynchronous: every micro-batch is its own update of its mean loss.
    weights = [w / I for w in microbatch.loss_weights(cfg.batch_size, n_micro, R)] if spec.flush \
        else [1.0 / R] * n_micro

    step, train_time, last_eval = resumed, 0.0, (float("nan"), float("nan"))
    fail_at = injected_fault(rank)
    comm.Barrier()
    while step < total:
        epoch = step // spe
        if epoch == fail_at:
            raise RuntimeError(f"fault injected by {FAULT_ENV} at epoch {epoch}")
        first_k = step - epoch * spe  # > 0 when resumed inside an epoch
        steps_now = min(spe, total - epoch * spe)
        t0 = time.perf_counter()
        runner.loss_sum = 0.0
        if spec.flush:
            for k in range(first_k, steps_now):
                src = Batches(train, epoch, k * I, n_micro)
                g = epoch * spe + k
                runner.run(spec.generator(s, P, n_micro * I), Feed(
                    x=lambda mb: src.part(k * I + mb // n_micro, mb % n_micro, 0),
                    y=lambda mb: src.part(k * I + mb // n_micro, mb % n_micro, 1),
                    weight=lambda mb: weights[mb % n_micro], size=lambda mb: sizes[mb % n_micro],
                    key=lambda mb: (cfg.seed, g, mb), lr=lambda mb: sched(g)))
                bar.update()
                ckpt.after_step(g + 1)
                if reporter and method is not None:
                    metrics.write(kind="lr", step=g + 1, **lr_record(layers, method, runner.optimizer, start))
                if cfg.debug_checksum and (g + 1) % cfg.debug_checksum == 0:
                    check_replicas(topo.stage_comm, trainable(layers, params), g + 1, cfg.poll)
                if reporter and (g + 1) % cfg.log_every == 0:
                    metrics.write(kind="train", step=g + 1, epoch=epoch, loss=runner.loss_sum, lr=sched(g),
                                  **scaler_record(scaler))
                runner.loss_sum = 0.0
        else:
            src = Batches(train, epoch, 0, n_micro)

            def on_step(mb: int) -> None:
                if mb % n_micro == n_micro - 1:
                    bar.update()
                if cfg.debug_checksum and runner.updates % cfg.debug_checksum == 0:
                    check_replicas(topo.stage_comm, trainable(layers, params), runner.updates, cfg.poll)

            runner.run(spec.generator(s, P, steps_now * n_micro), Feed(
                x=lambda mb: src.part(mb // n_micro, mb % n_micro, 0),
                y=lambda mb: src.part(mb // n_micro, mb % n_micro, 1),
                weight=lambda mb: weights[mb % n_micro], size=lambda mb: sizes[mb % n_micro],
                key=lambda mb: (cfg.seed, epoch * spe + mb // n_micro, mb % n_micro),
                lr=lambda mb: sched(epoch * spe + mb // n_micro), on_step=on_step))
            if reporter:
                metrics.write(kind="train", step=epoch * spe + steps_now, epoch=epoch,
                              loss=runner.loss_sum / (steps_now * n_micro), lr=sched(epoch * spe + steps_now - 1))
        step = epoch * spe + steps_now
        backend.synchronize()
        train_time += time.perf_counter() - t0
        if topo.replica == 0:
            loss_sum, correct, n = evaluate_stage(runner, test, n_test)
            if reporter:
                last_eval = (loss_sum / n, correct / n)
                metrics.write(kind="eval", step=step, epoch=epoch + 1, test_loss=last_eval[0], test_acc=last_eval[1])
        ckpt.at_epoch_end(step)
    if resumed >= total and topo.replica == 0:  # resumed at the end: nothing trained, still report
        loss_sum, correct, n = evaluate_stage(runner, test, n_test)
        last_eval = (loss_sum / n, correct / n) if reporter else last_eval
    bar.close()
    metrics.close()

    stash = gather_stash(comm, topo, runner)
    traffic = comm_bytes(comm, channel)
    reduced = sum_over_ranks(comm, runner.reducer.bytes_reduced if runner.reducer is not None else 0)
    if cfg.trace:
        gather_trace(comm, tracer, cfg.trace)
    figures = np.array([*last_eval, train_time, runner.updates], dtype=np.float64)
    last_rank = topo.world_rank(P - 1, 0)
    if rank == last_rank and rank != 0:
        comm.Send(figures, dest=0, tag=RESULT_TAG)
    if rank != 0:
        return None
    if last_rank != 0:
        comm.Recv(figures, source=last_rank, tag=RESULT_TAG)
    test_loss, test_acc = figures[0], figures[1]
    return {"algorithm": "sync", "test_acc": float(test_acc), "test_loss": float(test_loss),
            "epochs": step / spe, "steps": step,
            "samples_per_s": (step - resumed) * cfg.batch_size * R * I / train_time if train_time else 0.0,
            "train_s": train_time,
            "layout": str(layout), "partition": counts, "schedule": cfg.schedule, "microbatches": n_micro,
            "stash": stash, "p2p_bytes": traffic,
            "bytes_per_step": {"allreduce": reduced / (step * layout.workers),   # per worker rank and step
                               "pipeline": traffic / (step * layout.workers)},
            **scaler_record(scaler)}


def evaluate_stage(runner: StageRunner, test: Loader | None, n_test: int) -> tuple[float, float, int]:
    """This stage's part of one pass over the test set (the loss and counts are the last stage's)."""
    sizes = [min(EVAL_BATCH, n_test - i) for i in range(0, n_test, EVAL_BATCH)]
    batches = test.epoch(0) if test is not None else iter([(None, None)] * len(sizes))
    return runner.evaluate(batches, sizes)


def announce(first_line: str, counts: list[int], model: Model, topo: Topology) -> None:
    """What rank 0 prints at start-up: the layout, the partition, and which rank is what."""
    print(first_line, flush=True)
    print(describe(counts, model, flop_costs(model)), flush=True)
    print(topo.describe(), flush=True)


def trainable(layers, params) -> list:
    """The trainable tensors of a stage, in Flat's order (buffers such as BatchNorm statistics stay local)."""
    return [p[name] for layer, p in zip(layers, params) for name in layer.trainable]


def fingerprint(arrays) -> int:
    """A 64-bit fingerprint of the arrays' bytes: equal arrays, equal digests."""
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(np.ascontiguousarray(to_host(a)).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


class ReplicasDiverged(RuntimeError):
    """Replicas that must hold bitwise equal weights do not."""


def check_replicas(stage_comm, arrays, step: int, poll: str = "sleep") -> None:
    """--debug-checksum: raise on every replica of the stage if their arrays differ anywhere."""
    if stage_comm == MPI.COMM_NULL or stage_comm.Get_size() == 1:
        return
    mine = np.array([fingerprint(arrays)], dtype=np.int64)
    every = np.empty(stage_comm.Get_size(), dtype=np.int64)
    wait(stage_comm.Iallgather(mine, every), poll, peer="replica checksums")
    if (every != every[0]).any():
        odd = [r for r in range(len(every)) if every[r] != every[0]]
        raise ReplicasDiverged(f"after step {step}, replicas {odd} of this stage differ from replica 0 "
                               "(parameter checksums)")


def sum_over_ranks(comm, value: int) -> int:
    """The sum of one integer over all ranks, on rank 0 (0 elsewhere)."""
    total = np.zeros(1, dtype=np.int64)
    comm.Reduce(np.array([value], dtype=np.int64), total, op=MPI.SUM, root=0)
    return int(total[0])


def gather_stash(comm, topo: Topology, runner: StageRunner) -> list[dict]:
    """Each stage's stash report (replica 0's), gathered on rank 0 as int64 buffers."""
    rep = runner.stash.report()
    mine = np.array([topo.stage, topo.replica, rep["capacity"], rep["weight_versions"], rep["weight_bytes"],
                     rep["peak_cache_bytes"]], dtype=np.int64)
    rows = np.zeros((comm.Get_size(), len(mine)), dtype=np.int64) if comm.Get_rank() == 0 else None
    comm.Gather(mine, rows, root=0)
    if rows is None:
        return []
    keys = ("stage", "replica", "capacity", "weight_versions", "weight_bytes", "peak_cache_bytes")
    return [dict(zip(keys, map(int, r))) for r in rows if r[1] == 0]


def comm_bytes(comm, channel: PipeChannel | None) -> int:
    """Point-to-point bytes sent by all ranks together."""
    return sum_over_ranks(comm, channel.bytes_sent if channel is not None else 0)


def gather_trace(comm, tracer: Tracer, path: str) -> None:
    """Every rank's events to rank 0 as JSON bytes (Gatherv of uint8), written as one trace."""
    mine = to_bytes(tracer.events())
    counts = np.zeros(comm.Get_size(), dtype=np.int64) if comm.Get_rank() == 0 else None
    comm.Gather(np.array([mine.size], dtype=np.int64), counts, root=0)
    buf = np.empty(int(counts.sum()), dtype=np.uint8) if counts is not None else None
    comm.Gatherv(mine, (buf, counts) if buf is not None else None, root=0)
    if buf is not None:
        offsets = np.concatenate([[0], np.cumsum(counts)])
        write_trace(path, [from_bytes(buf[a:b]) for a, b in zip(offsets[:-1], offsets[1:])])

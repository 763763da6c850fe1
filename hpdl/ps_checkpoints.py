"""What a parameter-server run checkpoints and restores: the servers' shards (weights and rule state), each worker's own state.

A checkpoint after mini-batch step N is a consistent cut of an asynchronous run: each
worker, after its step N, sends CHECKPOINT to its servers behind its pushes and joins the
collective save; a server parks each worker whose CHECKPOINT arrives and, once all are
parked, holds exactly the pushes of every worker's first N steps, and saves. The servers'
shards are the authoritative weights and rule state (version, per-worker versions,
DC-ASGD's backups); a worker's shard holds its local weights (EASGD's x_i, ASGD's last
reply), its rule's buffers (EAMSGD's momentum, an unsent accumulation) and its counters.

Resuming with the same number of replicas restores all of it. With another number, the
per-worker state has no owner: the servers keep their weights and version and treat
every worker as having just fetched them (DC-ASGD backups = the weights, adaptive mean
squares reset to 0), and every worker starts from the servers' weights with fresh local
state (zero momentum; EASGD's local copies restart at the centre).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mpi4py import MPI

from .algorithms.registry import AlgorithmSpec
from .backend import to_host
from .checkpoint import CheckpointError
from .checkpoint_sharded import newest_complete, read_manifest, read_shard, save_sharded
from .config import Config, ConfigError
from .ps.pipelined import PIPELINED, base_spec


def check_ps_options(cfg: Config) -> None:
    """Which non-sync algorithms can be checkpointed: the parameter-server ones with flushed schedules."""
    if base_spec(cfg.algorithm).kind != "ps" or cfg.algorithm in PIPELINED:
        raise ConfigError(f"--checkpoint-dir: multi-rank checkpoints cover --algorithm sync and the parameter-server "
                          f"algorithms asgd, dcasgd-c, dcasgd-a, easgd, eamsgd; {cfg.algorithm} runs cannot be "
                          "checkpointed yet")


@dataclass
class PsResume:
    """A complete parameter-server checkpoint: each server shard's state, each worker's state."""

    path: Path
    step: int
    replicas: int
    partition: list[int]
    servers: dict[tuple[int, int, int], dict[str, np.ndarray]] = field(default_factory=dict)  # (stage, lo, hi)
    workers: dict[tuple[int, int], dict[str, np.ndarray]] = field(default_factory=dict)       # (stage, replica)

    def stage_weights(self, stage: int, size: int) -> np.ndarray:
        """Stage `stage`'s weights, assembled from its servers' shards."""
        w, covered = None, 0
        for (s, lo, hi), state in sorted(self.servers.items()):
            if s == stage:
                w = np.empty(size, state["rule/w"].dtype) if w is None else w
                w[lo:hi] = state["rule/w"]
                covered += hi - lo
        if covered != size:
            raise CheckpointError(f"{self.path}: the server shards hold {covered} of stage {stage}'s {size} weights")
        return w


def find_ps_resume(directory: str, algorithm: str) -> PsResume | None:
    """The newest complete checkpoint of a parameter-server run of `algorithm`, read and checked, or None."""
    path = newest_complete(directory)
    if path is None:
        return None
    manifest = read_manifest(path)
    if manifest.get("algorithm") != algorithm or "replicas" not in manifest:
        raise CheckpointError(f"{path}: a checkpoint of --algorithm {manifest.get('algorithm')}, not of {algorithm}")
    try:
        resume = PsResume(path, int(manifest["step"]), int(manifest["replicas"]), [int(c) for c in manifest["partition"]])
        for entry in manifest["shards"]:
            _, state, _ = read_shard(path, entry)
            if entry.role == "worker":
                resume.workers[(entry.stage, entry.replica)] = state
            elif entry.role == "ps":
                for key, value in state.items():
                    stage, lo, hi, rest = key.split("/", 3)
                    resume.servers.setdefault((int(stage), int(lo), int(hi)), {})[rest] = value
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a parameter-server checkpoint ({' '.join(str(e).split())})") from None
    if not resume.servers:
        raise CheckpointError(f"{path}: holds no parameter-server shard")
    return resume


class PsCheckpoints:
    """One rank's part of a parameter-server run's checkpoints (a worker or a server)."""

    def __init__(self, cfg: Config, comm: MPI.Comm, replicas: int, partition: list[int], steps: int,
                 steps_per_epoch: int):
        self.cfg, self.comm, self.replicas, self.partition = cfg, comm, replicas, partition
        self.steps, self.spe = steps, steps_per_epoch

    def due(self, step: int) -> bool:
        """Checkpoint after `step`: every --checkpoint-every steps and at epoch ends, but never after the run's
        last step, whose exchange ends the run (a final push, no reply) where a longer run would go on."""
        every = self.cfg.checkpoint_every
        return bool(self.cfg.checkpoint_dir) and step < self.steps and ((every and step % every == 0)
                                                                         or step % self.spe == 0)

    def save(self, step: int, shard: dict) -> None:
        meta = {"epoch": step // self.spe, "algorithm": self.cfg.algorithm, "replicas": self.replicas,
                "partition": self.partition, "config": self.cfg.to_dict()}
        save_sharded(self.comm, self.cfg.checkpoint_dir, step, shard, meta, self.cfg.keep_checkpoints, self.cfg.poll)

    def check_partition(self, resume: PsResume) -> None:
        if resume.partition != self.partition:
            raise CheckpointError(f"{resume.path}: written with the partition {resume.partition}, this run has "
                                  f"{self.partition}; pass --partition {','.join(map(str, resume.partition))}")

    # -- a worker ---------------------------------------------------------------------------
    def restore_worker(self, resume: PsResume | None, worker, w, stage: int, replica: int) -> int:
        """Load this worker's state (or the servers' weights, on another replica count); the step to continue from."""
        if resume is None:
            return 0
        self.check_partition(resume)
        mine = resume.workers.get((stage, replica)) if resume.replicas == self.replicas else None
        if mine is not None:
            w[...] = worker.xp.asarray(mine["w"])
            try:
                worker.rule.load_state_dict({k[len("rule/"):]: v for k, v in mine.items() if k.startswith("rule/")})
            except ValueError as e:
                raise CheckpointError(f"{resume.path}: {e}") from None
            worker.k, worker.exchange.pushes = int(mine["k"]), int(mine["pushes"])
        else:
            w[...] = worker.xp.asarray(resume.stage_weights(stage, w.size))
            worker.k = resume.step
        if (stage, replica) == (0, 0):
            print(f"resumed from step {resume.step} ({resume.path}, written by {resume.replicas} replicas)", flush=True)
        return resume.step

    def worker_step_done(self, step: int, worker, w, stage: int, replica: int) -> None:
        """After mini-batch `step`: if due, a checkpoint (the servers first see this worker's CHECKPOINT)."""
        if not self.due(step):
            return
        worker.exchange.checkpoint(step)
        state = {"w": np.array(to_host(w)), "k": np.array(worker.k, np.int64),
                 "pushes": np.array(worker.exchange.pushes, np.int64),
                 **{f"rule/{k}": v for k, v in worker.rule.state_dict().items()}}
        self.save(step, {"params": [], "opt_state": state, "role": "worker", "stage": stage, "replica": replica,
                         "first": 0, "stop": 0})

    # -- a server ---------------------------------------------------------------------------
    def restore_servers(self, resume: PsResume | None, servers: list, spec: AlgorithmSpec, hyper: dict) -> None:
        """Load each shard server's rule state; on another replica count, rebuild its rule around the saved weights."""
        if resume is None:
            return
        self.check_partition(resume)
        for srv in servers:
            sh = srv.shard
            saved = resume.servers.get((sh.stage, sh.lo, sh.hi))
            if saved is None:
                raise CheckpointError(f"{resume.path}: no server shard holds stage {sh.stage} elements {sh.lo}-{sh.hi} "
                                      "(was it written with another --ps?)")
            rule = {k[len("rule/"):]: v for k, v in saved.items() if k.startswith("rule/")}
            if resume.replicas == self.replicas:
                try:
                    srv.rule.load_state_dict(rule)
                except ValueError as e:
                    raise CheckpointError(f"{resume.path}: {e}") from None
                srv.applied = [int(a) for a in saved["applied"]]
            else:  # every worker starts from the saved weights, as if it had just fetched them
                version = int(rule["version"])
                srv.rule = spec.make_server(srv.rule.xp.asarray(rule["w"]), srv.rule.n_workers, hyper)
                srv.rule.version = version
                srv.rule.sent_version = [version] * srv.rule.n_workers

    def server_checkpoint(self, servers: list, ps_index: int):
        """serve()'s on_checkpoint: this server rank's shards, saved collectively."""
        def save(step: int) -> None:
            state = {}
            for srv in servers:
                key = f"{srv.shard.stage}/{srv.shard.lo}/{srv.shard.hi}"
                state |= {f"{key}/rule/{k}": v for k, v in srv.rule.state_dict().items()}
                state[f"{key}/applied"] = np.array(srv.applied, np.int64)
            self.save(step, {"params": [], "opt_state": state, "role": "ps", "stage": -1, "replica": ps_index,
                             "first": 0, "stop": 0})
        return save

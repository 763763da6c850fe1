"""What a `sync` multi-rank run checkpoints and restores: option checks, the resume point, the per-step hook.

Each stage's replica 0 writes its stage's parameters and optimizer state; the loader
position, dropout keys and learning rate are functions of the step, so a run resumed
with the same global batch (--batch-size x replicas) and the same --lr-schedule length
repeats the uninterrupted run's batches exactly. Flushed schedules (gpipe, 1f1b) can stop
after any step; the asynchronous ones (pipedream, pipelined-bp) drain only at epoch ends,
so they checkpoint there.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .backend import to_host
from .checkpoint import CheckpointError, load_into
from .checkpoint_sharded import Resume, find_resume, save_sharded
from .comm.topology import Topology
from .config import Config, ConfigError
from .models import Model
from .pipeline.schedules import SCHEDULES
from .ps_checkpoints import PsResume, check_ps_options, find_ps_resume
from .optim import LRMethod
from .optim.largebatch import pack_state, restore_state
from .optim.loss_scale import LossScaler
from .trainer import make_run_optimizer


def plan_resume(cfg: Config, model: Model) -> Resume | PsResume | None:
    """Checks the checkpoint options; with --resume, the newest complete checkpoint, validated (or None).

    Every rank runs this before any communication and reaches the same verdict.
    """
    if not cfg.checkpoint_dir:
        return None
    if cfg.algorithm != "sync":
        check_ps_options(cfg)
        return find_ps_resume(cfg.checkpoint_dir, cfg.algorithm) if cfg.resume else None
    if cfg.checkpoint_every and not SCHEDULES[cfg.schedule].flush:
        raise ConfigError(f"--checkpoint-every: --schedule {cfg.schedule} drains its pipeline only at epoch ends, "
                          "where it checkpoints; use --checkpoint-every 0")
    if not cfg.resume:
        return None
    host = model.init(cfg.seed, np, np.dtype(cfg.dtype))
    return find_resume(cfg.checkpoint_dir, host, make_run_optimizer(cfg, model.layers))


class StageCheckpoints:
    """One rank's part of a sync run's checkpoints: restore at start, save every N steps and at epoch ends."""

    def __init__(self, cfg: Config, comm: MPI.Comm, topo: Topology, params: list, optimizer,
                 bounds: tuple[int, int], steps_per_epoch: int, lr_method: LRMethod | None = None,
                 scaler: LossScaler | None = None):
        self.cfg, self.comm, self.topo = cfg, comm, topo
        self.params, self.optimizer, self.bounds = params, optimizer, bounds
        self.lr_method, self.scaler = lr_method, scaler
        self.spe = steps_per_epoch
        self.flush = SCHEDULES[cfg.schedule].flush
        self.saved = -1

    def restore(self, resume: Resume | None) -> int:
        """Load this stage's slice of `resume`; the step to continue from (0 without)."""
        if resume is None:
            return 0
        if not self.flush and resume.step % self.spe:
            raise CheckpointError(f"{resume.path}: step {resume.step} is inside an epoch of {self.spe} steps; "
                                  f"--schedule {self.cfg.schedule} resumes only at epoch ends (use gpipe or 1f1b)")
        params, opt_state = resume.stage(*self.bounds)
        load_into(self.params, params)
        try:
            restore_state(self.optimizer, self.lr_method, opt_state | resume.lr_state, resume.step, self.scaler)
        except ValueError as e:
            raise CheckpointError(f"{resume.path}: {e}") from None
        if self.comm.Get_rank() == 0:
            print(f"resumed from step {resume.step} ({resume.path}, written by {resume.layout})", flush=True)
        self.saved = resume.step
        return resume.step

    def after_step(self, step: int) -> None:
        """Collective: a checkpoint if --checkpoint-every divides `step`."""
        every = self.cfg.checkpoint_every
        if self.cfg.checkpoint_dir and every and step % every == 0:
            self.save(step)

    def at_epoch_end(self, step: int) -> None:
        """Collective: the checkpoint at an epoch end (or at the run's last step, where flushed schedules stop)."""
        if self.cfg.checkpoint_dir and (self.flush or step % self.spe == 0):
            self.save(step)

    def save(self, step: int) -> None:
        if step == self.saved:
            return
        shard = None
        if self.topo.replica == 0:  # replicas hold bitwise equal weights and state
            first, stop = self.bounds
            shard = {"params": [{k: to_host(v) for k, v in p.items()} for p in self.params],
                     "opt_state": pack_state(self.optimizer, self.lr_method, self.scaler), "role": "stage",
                     "stage": self.topo.stage, "replica": 0, "first": first, "stop": stop}
        meta = {"epoch": step // self.spe, "layout": str(self.topo.layout), "algorithm": self.cfg.algorithm,
                "config": self.cfg.to_dict()}
        save_sharded(self.comm, self.cfg.checkpoint_dir, step, shard, meta, self.cfg.keep_checkpoints, self.cfg.poll)
        self.saved = step

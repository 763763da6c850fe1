"""Ranks as pipeline stages x data-parallel replicas + parameter servers, placed node-aware."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
from mpi4py import MPI

# Without --stages, pipelines are at most this deep: a pipeline of P stages idles a
# fraction (P-1)/(M+P-1) of each flushed step (ALGORITHMS.md §7), so deeper pipelines need
# proportionally more micro-batches per mini-batch to stay efficient.
MAX_AUTO_STAGES = 4

# Testing override: pretend ranks sit on nodes of k consecutive ranks each, so that one
# machine can exercise multi-node placement.
RANKS_PER_NODE_ENV = "HPDL_RANKS_PER_NODE"


class TopologyError(ValueError):
    """The requested stages, replicas and parameter servers do not fit the world size or the model."""


@dataclass(frozen=True)
class Layout:
    """How many pipeline stages, replicas of each stage and parameter-server ranks a run uses."""

    stages: int
    replicas: int
    ps: int = 0

    @property
    def workers(self) -> int:
        return self.stages * self.replicas

    @property
    def world(self) -> int:
        return self.workers + self.ps

    def __str__(self) -> str:
        return (f"{self.stages} stages x {self.replicas} replicas + {self.ps} PS = {self.world} ranks")


def _flags(stages: int, replicas: int, ps: int) -> str:
    return f"--stages {stages} --replicas {replicas}" + (f" --ps {ps}" if ps else "")


def _fits(workers: int, n_layers: int) -> list[tuple[int, int]]:
    """Every (stages, replicas) that uses exactly `workers` ranks and has a layer per stage."""
    return [(s, workers // s) for s in range(1, min(workers, n_layers) + 1) if workers % s == 0]


def _suggest(workers: int, n_layers: int, stages: int, replicas: int, ps: int) -> str:
    """The (at most two) fitting layouts nearest to the requested one, as command-line flags."""
    near = sorted(_fits(workers, n_layers), key=lambda f: (abs(f[0] - stages) + abs(f[1] - replicas), -f[0]))
    return " or ".join(_flags(s, r, ps) for s, r in near[:2])


def choose_layout(world: int, n_layers: int, stages: int | None = None, replicas: int | None = None,
                  ps: int | None = None) -> Layout:
    """The layout for `world` ranks: the given counts checked, the missing ones filled in.

    With neither stages nor replicas, stages is the largest divisor of the worker count
    that is at most min(n_layers, MAX_AUTO_STAGES); replicas take the rest. ps defaults to 0.
    Raises TopologyError with a one-line message that names a layout that fits.
    """
    ps = 0 if ps is None else ps
    if ps < 0:
        raise TopologyError(f"--ps must be at least 0, got {ps}")
    if stages is not None and stages < 1:
        raise TopologyError(f"--stages must be at least 1, got {stages}")
    if replicas is not None and replicas < 1:
        raise TopologyError(f"--replicas must be at least 1, got {replicas}")
    if stages is not None and stages > n_layers:
        raise TopologyError(f"the model has {n_layers} layers; --stages must be at most {n_layers}")
    workers = world - ps
    if workers < 1:
        raise TopologyError(f"--ps {ps} leaves no worker ranks in a world of {world}; use --ps {max(world - 1, 0)} "
                            f"or fewer")
    if stages is not None and replicas is not None:
        if stages * replicas != workers:
            raise TopologyError(f"{_flags(stages, replicas, ps)} needs {stages * replicas + ps} ranks, world has "
                                f"{world}; try {_suggest(workers, n_layers, stages, replicas, ps)}")
        return Layout(stages, replicas, ps)
    if stages is not None:
        if workers % stages:
            raise TopologyError(f"--stages {stages} does not divide the {workers} worker ranks; try "
                                f"{_suggest(workers, n_layers, stages, workers // stages, ps)}")
        return Layout(stages, workers // stages, ps)
    if replicas is not None:
        if workers % replicas or workers // replicas > n_layers:
            raise TopologyError(f"--replicas {replicas} does not fit {workers} worker ranks and {n_layers} layers; "
                                f"try {_suggest(workers, n_layers, workers // replicas, replicas, ps)}")
        return Layout(workers // replicas, replicas, ps)
    stages = max(s for s, _ in _fits(workers, min(n_layers, MAX_AUTO_STAGES)))
    return Layout(stages, workers // stages, ps)


class Role(NamedTuple):
    """What one rank does: a worker (stage, replica) or parameter server number ps_index; -1 where n/a."""

    kind: str        # "worker" | "ps"
    stage: int
    replica: int
    ps_index: int


def place(layout: Layout, node_of_rank: Sequence[int]) -> list[Role]:
    """Each rank's role, given each rank's node id.

    Ranks are ordered by (node id, rank). Workers take the first stages x replicas positions,
    stage 0's replicas 0..R-1 first, then stage 1's, and so on: a stage's replicas are
    consecutive, so they share a node (fast links for their gradient allreduce) whenever a
    node has room, and with R workers per node consecutive stages sit on different nodes
    (only activations and their gradients cross the slow links; ALGORITHMS.md §7-8).
    Parameter servers take the last `ps` positions, so they never split a stage's replicas
    across nodes; they talk to every stage, so no position would keep their traffic local.
    """
    if len(node_of_rank) != layout.world:
        raise TopologyError(f"layout {layout} needs {layout.world} ranks, got node ids for {len(node_of_rank)}")
    order = sorted(range(layout.world), key=lambda r: (node_of_rank[r], r))
    roles: list[Role] = [Role("ps", -1, -1, -1)] * layout.world
    for position, rank in enumerate(order):
        if position < layout.workers:
            roles[rank] = Role("worker", position // layout.replicas, position % layout.replicas, -1)
        else:
            roles[rank] = Role("ps", -1, -1, position - layout.workers)
    return roles


def node_ids(comm: MPI.Comm) -> list[int]:
    """Each rank's node, named by the lowest rank (in comm) on that node.

    HPDL_RANKS_PER_NODE=k overrides what the MPI library reports: ranks 0..k-1 are one
    node, k..2k-1 the next, and so on. Every rank must see the same value.
    """
    size = comm.Get_size()
    override = os.environ.get(RANKS_PER_NODE_ENV)
    if override:
        if not override.isdigit() or int(override) < 1:
            raise TopologyError(f"{RANKS_PER_NODE_ENV} must be a positive integer, got {override!r}")
        k = int(override)
        return [r - r % k for r in range(size)]
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    leader = np.array([comm.Get_rank()], dtype=np.int64)
    local.Allreduce(MPI.IN_PLACE, leader, op=MPI.MIN)
    local.Free()
    nodes = np.empty(size, dtype=np.int64)
    comm.Allgather(leader, nodes)
    return [int(n) for n in nodes]


@dataclass(eq=False)
class Topology:
    """This rank's role and the communicators its role needs.

    pipe: the stages of this rank's replica, pipe rank == stage (COMM_NULL on PS ranks).
    stage_comm: the replicas of this rank's stage, rank == replica (COMM_NULL on PS ranks).
    ps_ranks: ranks (in comm) of the parameter servers, by ps_index.
    """

    comm: MPI.Comm
    layout: Layout
    roles: list[Role]
    nodes: list[int]
    pipe: MPI.Comm
    stage_comm: MPI.Comm
    ps_ranks: list[int]

    @classmethod
    def create(cls, comm: MPI.Comm, layout: Layout) -> Topology:
        """Collective over comm: place every rank and split off the pipeline and stage communicators."""
        if comm.Get_size() != layout.world:
            raise TopologyError(f"layout {layout} does not match the {comm.Get_size()} ranks of the communicator")
        nodes = node_ids(comm)
        roles = place(layout, nodes)
        me = roles[comm.Get_rank()]
        worker = me.kind == "worker"
        # The keys order each new communicator, so pipe rank == stage and stage_comm rank == replica.
        pipe = comm.Split(me.replica if worker else MPI.UNDEFINED, me.stage)
        stage_comm = comm.Split(me.stage if worker else MPI.UNDEFINED, me.replica)
        ps_ranks = sorted((r for r, role in enumerate(roles) if role.kind == "ps"), key=lambda r: roles[r].ps_index)
        return cls(comm, layout, roles, nodes, pipe, stage_comm, ps_ranks)

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def role(self) -> Role:
        return self.roles[self.rank]

    @property
    def stage(self) -> int:
        return self.role.stage

    @property
    def replica(self) -> int:
        return self.role.replica

    @property
    def is_ps(self) -> bool:
        return self.role.kind == "ps"

    @property
    def n_stages(self) -> int:
        return self.layout.stages

    @property
    def world(self) -> int:
        return self.layout.world

    def world_rank(self, stage: int, replica: int) -> int:
        """The rank (in comm) of the worker holding replica `replica` of stage `stage`."""
        for rank, role in enumerate(self.roles):
            if role.kind == "worker" and role.stage == stage and role.replica == replica:
                return rank
        raise TopologyError(f"no worker for stage {stage}, replica {replica} in layout {self.layout}")

    def describe(self) -> str:
        """A table: rank -> node, role, stage, replica."""
        lines = [f"{'rank':>5} {'node':>5}  {'role':<6} {'stage':>5} {'replica':>7}"]
        for rank, (node, role) in enumerate(zip(self.nodes, self.roles)):
            if role.kind == "worker":
                lines.append(f"{rank:>5} {node:>5}  {'worker':<6} {role.stage:>5} {role.replica:>7}")
            else:
                lines.append(f"{rank:>5} {node:>5}  {'ps ' + str(role.ps_index):<6} {'-':>5} {'-':>7}")
        return "\n".join(lines)

    def free(self) -> None:
        """Release the communicators this topology split off."""
        for c in (self.pipe, self.stage_comm):
            if c != MPI.COMM_NULL:
                c.Free()

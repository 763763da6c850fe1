"""The cost model: time, bubble, memory and link bytes per step of a layout (ALGORITHMS.md §7, §10)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from .comm.topology import Layout
from .pipeline.microbatch import sizes
from .pipeline.partition import balance, stage_bounds
from .pipeline.schedules import SCHEDULES, max_in_flight, stash_depth
from .ps.shards import stage_servers

INTER, INTRA = "inter-node", "intra-node"


@dataclass(frozen=True)
class Link:
    """A link's bandwidth in bytes/s and its per-message latency in seconds."""

    bandwidth: float
    latency: float

    def time(self, nbytes: float, messages: float = 1.0) -> float:
        return messages * self.latency + nbytes / self.bandwidth


@dataclass(frozen=True)
class Cluster:
    """`nodes` nodes of `ranks_per_node` ranks (one per GPU), a slow link between nodes, a fast one inside.

    `cores_per_node` < ranks_per_node means ranks time-share the cores (this 2-core machine
    running 4 ranks); `background` counts other runnable tasks on a node that share them too.
    Compute then takes (ranks_per_node + background) / cores_per_node times longer.
    `compute_scale` divides the measured compute times (e.g. 20 for a device 20x this core).
    """

    nodes: int
    ranks_per_node: int
    inter: Link
    intra: Link
    cores_per_node: int | None = None
    compute_scale: float = 1.0
    background: float = 0.0

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def slowdown(self) -> float:
        """How much longer compute takes than measured, from time-sharing and the device factor."""
        cores = self.cores_per_node or self.ranks_per_node
        return max(1.0, (self.ranks_per_node + self.background) / cores) / self.compute_scale

    def link(self, node_a: int, node_b: int) -> tuple[str, Link]:
        """The kind and the link between two nodes (the same node: the fast one)."""
        return (INTRA, self.intra) if node_a == node_b else (INTER, self.inter)


@dataclass(frozen=True)
class Profile:
    """What a model costs on one rank, as measured: everything per layer, bytes of `value_bytes` each.

    layer_seconds: micro-batch size -> seconds of forward plus backward of every layer on it.
    """

    layer_seconds: dict[int, list[float]]
    layer_params: list[int]          # trainable values
    layer_out: list[int]             # output values per sample: what a stage boundary after it moves
    layer_cache: list[float]         # bytes per sample kept from forward for backward
    update_s_per_value: float        # optimizer step, seconds per parameter value
    optimizer_vectors: float         # optimizer state, in parameter-sized vectors (momentum: 1)
    value_bytes: int = 4

    @property
    def n_layers(self) -> int:
        return len(self.layer_params)


@dataclass(frozen=True)
class AlgoCost:
    """An algorithm's communication and state: its kind, period, and measured rule costs.

    worker_vectors: state a worker keeps, in vectors the size of what it holds; a server keeps
    server_vectors + server_per_worker x (workers it serves) (its weights, per-worker backups).
    server_s_per_value: seconds a server spends applying one message, per value.
    """

    name: str
    kind: str                     # "allreduce" | "ps"
    period: int = 1               # τ: local updates between exchanges
    worker_vectors: float = 0.0
    server_vectors: float = 0.0
    server_s_per_value: float = 0.0
    schedules: tuple[str, ...] = tuple(SCHEDULES)
    server_per_worker: float = 0.0


@dataclass
class Prediction:
    """One (layout, algorithm, schedule): seconds per mini-batch step, its parts, memory and bytes."""

    layout: Layout
    algorithm: str
    schedule: str
    microbatches: int
    batch: int
    step_s: float
    compute_s: float              # the pipeline, bubbles included
    comm_s: float                 # data-parallel exchanges (allreduce or parameter server), per step
    bubble: float
    worker_memory: dict[str, float]   # bytes on the fullest worker rank, by kind
    ps_memory: float                  # bytes on the fullest server rank
    link_bytes: dict[str, float] = field(default_factory=dict)  # "kind inter-node" -> bytes per step, all ranks
    partition: list[int] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return self.batch * self.layout.replicas / self.step_s

    @property
    def memory(self) -> float:
        return max(sum(self.worker_memory.values()), self.ps_memory)


def bubble_fraction(schedule: str, stages: int, micro: int) -> float:
    """Idle share of a pipelined step: (P-1)/(M+P-1) with a flush (§7), none in the steady state without."""
    return (stages - 1) / (micro + stages - 1) if SCHEDULES[schedule].flush else 0.0


def ring_allreduce(nbytes: float, n: int, link: Link) -> tuple[float, float]:
    """(seconds, bytes each member sends) of a ring allreduce of nbytes over n members (§1)."""
    if n <= 1:
        return 0.0, 0.0
    sent = 2 * (n - 1) / n * nbytes
    return link.time(sent, 2 * (n - 1)), sent


def node_of(layout: Layout, ranks_per_node: int, stage: int, replica: int) -> int:
    """The node of a worker under topology.place: a stage's replicas consecutive, nodes filled in order."""
    return (stage * layout.replicas + replica) // ranks_per_node


def workers_on_node(layout: Layout, ranks_per_node: int, stage: int, node: int) -> int:
    """How many of `stage`'s replicas sit on `node` (positions stage*R .. stage*R+R-1, nodes of G positions)."""
    lo, hi = stage * layout.replicas, (stage + 1) * layout.replicas
    return max(0, min(hi, (node + 1) * ranks_per_node) - max(lo, node * ranks_per_node))


def ps_node(layout: Layout, ranks_per_node: int, index: int) -> int:
    return (layout.stages * layout.replicas + index) // ranks_per_node


def short(layout: Layout) -> str:
    """"PxR" or "PxR+Kps": stages x replicas + parameter servers."""
    return f"{layout.stages}x{layout.replicas}" + (f"+{layout.ps}ps" if layout.ps else "")


def micro_size(batch: int, micro: int) -> int:
    """The largest micro-batch (hpdl.pipeline.microbatch.sizes): it sets the pipeline's pace."""
    return max(sizes(batch, micro))


def pipeline_cycle(stage_s: Sequence[float], boundary_s: Sequence[float]) -> float:
    """Seconds per micro-batch of the slowest stage: its compute plus waiting for what it receives.

    Boundary b (between stages b and b+1) takes boundary_s[b] for an activation and its
    gradient; each stage waits for the half coming from either side.
    """
    return max(t + (boundary_s[s - 1] / 2 if s > 0 else 0.0) + (boundary_s[s] / 2 if s < len(boundary_s) else 0.0)
               for s, t in enumerate(stage_s))


def predict(profile: Profile, cluster: Cluster, layout: Layout, algo: AlgoCost, schedule: str,
            batch: int, micro: int, partition: Sequence[int] | None = None) -> Prediction:
    """Time, bubble, memory and link bytes of one mini-batch step per replica (B = batch samples).

    Layers per stage are `partition`, else the cut that balances the measured times.
    """
    P, R, G = layout.stages, layout.replicas, cluster.ranks_per_node
    b = micro_size(batch, micro)
    layer_s = profile.layer_seconds[b]
    counts = list(partition) if partition is not None else balance(layer_s, P)
    if len(counts) != P or sum(counts) != profile.n_layers:
        raise ValueError(f"partition {counts} does not cut {profile.n_layers} layers into {P} stages")
    bounds = stage_bounds(counts)
    vb = profile.value_bytes
    stage_params = [sum(profile.layer_params[a:z]) for a, z in bounds]
    stage_s = [math.fsum(layer_s[a:z]) * cluster.slowdown for a, z in bounds]
    update_s = [n * profile.update_s_per_value * cluster.slowdown for n in stage_params]
    flush = SCHEDULES[schedule].flush
    updates = 1 if flush else micro          # local updates per mini-batch step
    link_bytes: dict[str, float] = {}

    def add(traffic: str, where: str, nbytes: float) -> None:
        key = f"{traffic} {where}"
        link_bytes[key] = link_bytes.get(key, 0.0) + nbytes

    boundary_s = []
    for s in range(P - 1):
        a, z = bounds[s]
        nbytes = profile.layer_out[z - 1] * b * vb
        links = [cluster.link(node_of(layout, G, s, r), node_of(layout, G, s + 1, r)) for r in range(R)]
        boundary_s.append(max(2 * ln.time(nbytes) for _, ln in links))
        for where, _ in links:
            add("pipeline", where, 2 * profile.layer_out[z - 1] * batch * vb)
    cycle = pipeline_cycle(stage_s, boundary_s)
    slots = micro + P - 1 if flush else micro
    compute = slots * cycle + updates * max(update_s)
    exchanges = updates / algo.period

    comm = 0.0
    ps_load = [0.0] * layout.ps
    if algo.kind == "allreduce":
        for s, n in enumerate(stage_params):
            nodes = {node_of(layout, G, s, r) for r in range(R)}
            where, ln = (INTER, cluster.inter) if len(nodes) > 1 else (INTRA, cluster.intra)
            t, sent = ring_allreduce(n * vb, R, ln)
            comm = max(comm, exchanges * t)
            if sent:
                add("allreduce", where, exchanges * sent * R)
    elif algo.kind == "ps":
        if layout.ps < 1:
            raise ValueError(f"{algo.name} needs parameter-server ranks")
        for s, n in enumerate(stage_params):
            servers = stage_servers(s, P, layout.ps)
            shard = n * vb / len(servers)
            apply_s = algo.server_s_per_value * shard / vb * cluster.slowdown
            worst = 0.0
            for j in servers:
                # each of the stage's R workers pushes to server j and waits for its reply (and apply)
                local = workers_on_node(layout, G, s, ps_node(layout, G, j))
                for where, ln, count in ((INTRA, cluster.intra, local), (INTER, cluster.inter, R - local)):
                    if count:
                        worst = max(worst, ln.time(2 * shard, 2) + apply_s)
                        ps_load[j] += count * exchanges * (2 * shard / ln.bandwidth + apply_s)
                        add("ps", where, count * exchanges * 2 * shard)
            comm = max(comm, exchanges * worst)
    step = compute + comm
    if ps_load:
        # servers apply messages one at a time: no step is shorter than the busiest server's work
        step = max(step, max(ps_load))

    per_stage = []
    for s, n in enumerate(stage_params):
        a, z = bounds[s]
        stream = micro if flush else max(micro, P)
        in_flight = max_in_flight(schedule, s, P, stream)
        versions = stash_depth(schedule, s, P) if SCHEDULES[schedule].stash_weights else 0
        per_stage.append({"parameters": n * vb, "gradients": n * vb,
                          "optimizer": profile.optimizer_vectors * n * vb,
                          "algorithm": algo.worker_vectors * n * vb,
                          "activations": in_flight * b * math.fsum(profile.layer_cache[a:z]),
                          "weight stash": versions * n * vb})
    worker_memory = max(per_stage, key=lambda m: sum(m.values()))
    held = [0.0] * layout.ps
    for s, n in enumerate(stage_params):
        servers = stage_servers(s, P, layout.ps) if layout.ps else []
        for j in servers:
            held[j] += n * vb / len(servers)
    ps_memory = max((h * (algo.server_vectors + algo.server_per_worker * R) for h in held), default=0.0)
    return Prediction(layout, algo.name, schedule, micro, batch, step, compute, comm,
                      bubble_fraction(schedule, P, micro), worker_memory, ps_memory, link_bytes, counts)


def layouts(world: int, n_layers: int, ps_choices: Sequence[int] = (0,)) -> list[Layout]:
    """Every stages x replicas + ps that uses exactly `world` ranks, with at least a layer per stage."""
    out = []
    for k in ps_choices:
        workers = world - k
        out += [Layout(p, workers // p, k) for p in range(1, min(workers, n_layers) + 1)
                if workers > 0 and workers % p == 0]
    return out


def default_micro(stages: int) -> int:
    """hpdl.train's default: 2 x stages micro-batches, 1 for a single stage."""
    return 1 if stages == 1 else 2 * stages


def ranked(predictions: Sequence[Prediction]) -> list[Prediction]:
    """Fastest first (samples per second over all replicas), fewer bytes per rank breaking ties."""
    return sorted(predictions, key=lambda p: (-p.samples_per_s, p.memory))

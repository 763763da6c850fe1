"""Discrete-event execution of every stage's actions: the deadlock oracle and the bubble."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from .schedules import (BACKWARD, FORWARD, RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD, STEP,
                        Action, get_schedule)

WAIT = "wait"   # the event kind of time a stage spends blocked in a receive

# Sends go to stage s + offset; a receive takes the messages of a send kind from s + offset.
_SENDS = {SEND_ACT: +1, SEND_GRAD: -1}
_RECVS = {RECV_ACT: (SEND_ACT, -1), RECV_GRAD: (SEND_GRAD, +1)}


class Deadlock(RuntimeError):
    """No stage can progress: each one waits for a message that is never sent."""


class Mismatch(RuntimeError):
    """A receive would pair with a message of another micro-batch, or a message is never received."""


@dataclass(frozen=True)
class Event:
    """A span of one stage's time: compute (forward, backward, step) or a wait."""

    kind: str
    mb: int
    start: float
    end: float


@dataclass
class SimResult:
    makespan: float          # when the last stage finishes
    busy: list[float]        # compute time per stage
    events: list[list[Event]]

    @property
    def efficiency(self) -> list[float]:
        """Busy fraction per stage; 1 - efficiency is the pipeline bubble."""
        return [b / self.makespan for b in self.busy]

    def to_trace(self, unit_us: float = 1000.0) -> list[list[dict]]:
        """Chrome trace events per stage (see hpdl.trace), one time unit lasting `unit_us` microseconds."""
        return [[{"name": "process_name", "ph": "M", "pid": s, "tid": 0, "args": {"name": f"stage {s}"}}]
                + [{"name": e.kind, "cat": "sim", "ph": "X", "ts": e.start * unit_us,
                    "dur": (e.end - e.start) * unit_us, "pid": s, "tid": 0, "args": {"mb": e.mb}}
                   for e in stage_events]
                for s, stage_events in enumerate(self.events)]


def _per_stage(t: float | Sequence[float], n_stages: int, what: str) -> list[float]:
    times = [float(t)] * n_stages if isinstance(t, (int, float)) else [float(x) for x in t]
    if len(times) != n_stages or min(times) < 0:
        raise ValueError(f"{what} must be one non-negative time or {n_stages} of them, got {t!r}")
    return times


def _neighbour(stage: int, offset: int, n_stages: int, action: Action) -> int:
    other = stage + offset
    if not 0 <= other < n_stages:
        raise ValueError(f"stage {stage} of {n_stages}: {action.kind} {action.mb} has no neighbour")
    return other


def execute(actions: Sequence[Sequence[Action]], t_fwd: float | Sequence[float] = 1.0,
            t_bwd: float | Sequence[float] = 2.0, t_comm: float = 0.0,
            t_step: float | Sequence[float] = 0.0) -> SimResult:
    """Run each stage's action list against the others, as MPI would with Isend and blocking Recv.

    Sends cost the sender nothing and arrive `t_comm` later. Between two neighbours each
    message kind is a first-in first-out channel (MPI's non-overtaking rule for one tag),
    so the k-th receive pairs with the k-th send and must be for the same micro-batch.
    """
    n_stages = len(actions)
    compute = {FORWARD: _per_stage(t_fwd, n_stages, "t_fwd"),
               BACKWARD: _per_stage(t_bwd, n_stages, "t_bwd"),
               STEP: _per_stage(t_step, n_stages, "t_step")}
    pc, now, busy = [0] * n_stages, [0.0] * n_stages, [0.0] * n_stages
    events: list[list[Event]] = [[] for _ in range(n_stages)]
    sent: dict[tuple[int, str], list[tuple[int, float]]] = defaultdict(list)  # (src, kind) -> (mb, t)
    taken: dict[tuple[int, str], int] = defaultdict(int)                      # (src, kind) -> count

    # Time flows only from a send to its receive, so stages may be advanced in any order:
    # each runs until it blocks, and a sweep in which none advances is a deadlock.
    while any(pc[s] < len(actions[s]) for s in range(n_stages)):
        progressed = False
        for s in range(n_stages):
            while pc[s] < len(actions[s]):
                action = actions[s][pc[s]]
                if action.kind in _RECVS:
                    send_kind, offset = _RECVS[action.kind]
                    channel = (_neighbour(s, offset, n_stages, action), send_kind)
                    if taken[channel] == len(sent[channel]):
                        break
                    mb, t_sent = sent[channel][taken[channel]]
                    if mb != action.mb:
                        raise Mismatch(f"stage {s}: {action.kind} {action.mb} would receive "
                                       f"micro-batch {mb} from stage {channel[0]}")
                    taken[channel] += 1
                    arrival = t_sent + t_comm
                    if arrival > now[s]:
                        events[s].append(Event(WAIT, action.mb, now[s], arrival))
                        now[s] = arrival
                elif action.kind in _SENDS:
                    _neighbour(s, _SENDS[action.kind], n_stages, action)
                    sent[(s, action.kind)].append((action.mb, now[s]))
                elif action.kind in compute:
                    duration = compute[action.kind][s]
                    events[s].append(Event(action.kind, action.mb, now[s], now[s] + duration))
                    now[s] += duration
                    busy[s] += duration
                else:
                    raise ValueError(f"stage {s}: unknown action kind {action.kind!r}")
                pc[s] += 1
                progressed = True
        if not progressed:
            blocked = ", ".join(f"stage {s} at {actions[s][pc[s]].kind} {actions[s][pc[s]].mb}"
                                for s in range(n_stages) if pc[s] < len(actions[s]))
            raise Deadlock(f"no stage can progress: {blocked}")

    for (src, kind), messages in sent.items():
        if taken[(src, kind)] < len(messages):
            mb = messages[taken[(src, kind)]][0]
            raise Mismatch(f"stage {src}: {kind} {mb} is never received")
    return SimResult(max(now, default=0.0), busy, events)


def simulate(name: str, n_stages: int, n_micro: int, t_fwd: float | Sequence[float] = 1.0,
             t_bwd: float | Sequence[float] = 2.0, t_comm: float = 0.0,
             t_step: float | Sequence[float] = 0.0) -> SimResult:
    """Execute schedule `name` on `n_stages` stages: one mini-batch, or a whole asynchronous run."""
    generator = get_schedule(name).generator
    return execute([list(generator(s, n_stages, n_micro)) for s in range(n_stages)],
                   t_fwd, t_bwd, t_comm, t_step)

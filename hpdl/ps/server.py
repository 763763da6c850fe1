"""The parameter-server rank: applies each worker's message as it arrives (Testany over preposted receives)."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from mpi4py import MPI

from ..algorithms.base import ServerRule
from ..comm.wait import wait, waitall, waitany
from ..delaylog import DelayLog
from ..trace import Tracer
from .messages import CHECKPOINT, DONE, FETCH, PUSH, Message
from .pipelined import rule_worker
from .shards import Shard

# Tags on the parameter servers' own communicator (a Dup of the world), so they meet no other traffic.
MESSAGE_TAG, REPLY_TAG, FINAL_TAG = 1, 2, 3


class ExactlyOnceError(RuntimeError):
    """A worker says it sent a different number of pushes than its server applied."""


class ShardServer:
    """One shard of one stage: its ServerRule and the messages of the stage's replicas.

    Worker m is replica m of the stage (`workers[m]` its rank). Each push is applied once,
    in arrival order, and counted; `slots` > 1 gives each worker several rule ids
    (pipelined-dcasgd's backups per stashed weight version, see `pipelined.rule_worker`).
    """

    def __init__(self, comm: MPI.Comm, shard: Shard, workers: Sequence[int], rule: ServerRule, slots: int = 1,
                 log: DelayLog | None = None, poll: str = "sleep"):
        self.comm, self.shard, self.workers, self.rule = comm, shard, list(workers), rule
        self.slots, self.log, self.poll = slots, log, poll
        n = len(self.workers)
        self.inbox = [Message(shard.size, rule.dtype) for _ in range(n)]
        self.outbox = [np.empty(shard.size, rule.dtype) for _ in range(n)]
        self.sends = [MPI.REQUEST_NULL] * n
        self.applied = [0] * n           # pushes applied, per worker
        self.delay_sum = self.delay_max = 0
        self.bytes_sent = self.bytes_received = self.messages = 0

    @property
    def n_workers(self) -> int:
        return len(self.workers)

    @property
    def updates(self) -> int:
        return sum(self.applied)

    def post(self, m: int) -> MPI.Request:
        """The receive of worker m's next message, posted before it is sent."""
        return self.comm.Irecv(self.inbox[m].raw, source=self.workers[m], tag=MESSAGE_TAG)

    def handle(self, m: int, status: MPI.Status) -> bool:
        """Act on the message now in worker m's inbox; False when m is done."""
        msg = self.inbox[m]
        self.bytes_received += status.Get_count(MPI.BYTE)
        self.messages += 1
        if msg.kind == PUSH:
            self._push(m, msg)
        elif msg.kind == FETCH:
            self._reply(m, self.rule.fetch(m))
        elif msg.kind == CHECKPOINT:
            pass  # serve() parks m until every worker is there
        elif msg.kind == DONE:
            if msg.step != self.applied[m]:
                raise ExactlyOnceError(f"stage {self.shard.stage} shard {self.shard.index}: worker {m} sent "
                                       f"{msg.step} pushes, the server applied {self.applied[m]}")
            return False
        else:
            raise ValueError(f"parameter server: unknown message kind {msg.kind} from worker {m}")
        return True

    def _push(self, m: int, msg: Message) -> None:
        who = rule_worker(m, self.applied[m], self.slots)
        delay = self.rule.staleness(who)   # versions since the weights this push was computed at
        if self.log is not None:
            self.log.append(self.rule.version, m, msg.step, delay)
        taken = self.rule.sent_version[who]
        reply = self.rule.apply(who, msg.body, msg.lr)
        if msg.wants_reply:
            self._reply(m, reply)
        else:  # m keeps computing from the weights it had: the next delay counts from those
            self.rule.sent_version[who] = taken
        self.applied[m] += 1
        self.delay_sum += delay
        self.delay_max = max(self.delay_max, delay)

    def _reply(self, m: int, reply) -> None:
        # m asked again, so it has received the previous reply: this wait ends at once.
        wait(self.sends[m], self.poll, peer=f"reply to worker {m}")
        self.outbox[m][...] = reply  # the rule may reuse its reply buffer at the next apply
        self.sends[m] = self.comm.Isend(self.outbox[m], dest=self.workers[m], tag=REPLY_TAG)
        self.bytes_sent += self.outbox[m].nbytes
        self.messages += 1

    def send_final(self, dest: int) -> MPI.Request:
        """Send the shard's final parameters (the model this server trained) to rank `dest`."""
        waitall(self.sends, self.poll, peer="replies")
        self.bytes_sent += self.rule.w.nbytes
        return self.comm.Isend(self.rule.w, dest=dest, tag=FINAL_TAG)


def serve(servers: Sequence[ShardServer], poll: str = "sleep", tracer: Tracer | None = None,
          on_checkpoint: Callable[[int], None] | None = None) -> None:
    """Serve every worker of `servers` until each has sent DONE.

    One receive per (shard, worker) is always posted; Testany takes whichever message
    arrived first, so a slow worker never holds up the others. A worker's CHECKPOINT
    parks it (no receive is posted for it); once every worker still serving is parked,
    on_checkpoint(step) runs (the collective save) and serving resumes.
    """
    tracer = tracer or Tracer(0, enabled=False)
    owners = [(srv, m) for srv in servers for m in range(srv.n_workers)]
    requests = [srv.post(m) for srv, m in owners]
    active, status = len(requests), MPI.Status()
    parked: list[int] = []
    while active:
        i = waitany(requests, status, poll, peer="parameter-server workers")
        srv, m = owners[i]
        with tracer.span("apply", "ps", stage=srv.shard.stage, shard=srv.shard.index, worker=m):
            more = srv.handle(m, status)
        if srv.inbox[m].kind == CHECKPOINT:
            parked.append(i)
            requests[i] = MPI.REQUEST_NULL
            if len(parked) == active:
                on_checkpoint(srv.inbox[m].step)
                for j in parked:
                    requests[j] = owners[j][0].post(owners[j][1])
                parked = []
        elif more:
            requests[i] = srv.post(m)
        else:
            requests[i] = MPI.REQUEST_NULL
            active -= 1


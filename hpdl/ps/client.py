"""A worker's side of the parameter servers: push, fetch, the replies, and DONE."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from mpi4py import MPI

from ..backend import on_device
from ..comm.device import Stager, default_stager
from ..comm.wait import waitall
from .messages import CHECKPOINT, DONE, FETCH, PUSH, Message, nbytes
from .server import FINAL_TAG, MESSAGE_TAG, REPLY_TAG
from .shards import Shard


class PsClient:
    """One worker's link to the servers of its stage's shards.

    A push sends slice [lo, hi) of the payload to each shard's server, as one buffer
    each; the replies land in one vector, slice by slice. The worker only ever waits
    for its own replies, polling, so it never holds a server up.

    With a `stager`, payloads and replies are device arrays. They always travel through
    pinned host buffers, CUDA-aware MPI or not: a push is one buffer whose header is
    written on the host, and the servers compute on the host. A payload's slices are
    downloaded straight into the message bodies on the stager's copy stream (the push
    waits for those copies only); the replies are uploaded into one device vector, and the
    next receive into the host vector waits until that upload has read it.
    """

    def __init__(self, comm: MPI.Comm, shards: Sequence[Shard], ranks: Sequence[int], size: int, dtype,
                 poll: str = "sleep", stager: Stager | None = None):
        self.comm, self.shards, self.ranks, self.poll = comm, list(shards), list(ranks), poll
        self.stager = stager
        if stager is None:
            self.out = [Message(sh.size, dtype) for sh in self.shards]
            self.reply = np.empty(size, dtype)
        else:  # pinned buffers, kept for the client's life
            self.out = [Message(sh.size, dtype, stager.host((nbytes(sh.size, dtype),), np.uint8))
                        for sh in self.shards]
            self.reply = stager.host((size,), dtype)
            self.device_reply = stager.xp.empty(size, dtype)
        self._uploaded = None  # event: the last upload of `reply` has read it
        self.sends: list[MPI.Request] = []
        self.pushes = 0  # pushes sent to each shard's server
        self.bytes_sent = self.bytes_received = self.messages = 0

    def push(self, payload, step: int, lr: float, reply: bool) -> np.ndarray | None:
        """Send the payload of local step `step` (learning rate lr); the reply if asked for."""
        self._reuse()
        replies = self._expect(REPLY_TAG) if reply else []
        if not on_device(payload):
            for sh, msg in zip(self.shards, self.out):
                msg.body[...] = payload[sh.lo:sh.hi]
        else:
            stager = self.stager or default_stager()
            copies = [stager.download(payload[sh.lo:sh.hi], msg.body) for sh, msg in zip(self.shards, self.out)]
            for copy in copies:  # MPI must not read a body before its copy is done
                copy.synchronize()
        for msg in self.out:
            msg.set(PUSH, step, lr, reply)
        self._send(msg.raw for msg in self.out)
        self.pushes += 1
        return self._wait(replies) if reply else None

    def fetch(self) -> np.ndarray:
        """The servers' current weights (for servers whose reply is their weights)."""
        self._reuse()
        replies = self._expect(REPLY_TAG)
        for msg in self.out:
            msg.set(FETCH)
        self._send(msg.header() for msg in self.out)
        return self._wait(replies)

    def checkpoint(self, step: int) -> None:
        """Tell the servers this worker is at a checkpoint after `step`: after all its pushes, so a server that
        has this message from every worker holds exactly their first `step` steps."""
        self._reuse()
        for msg in self.out:
            msg.set(CHECKPOINT, step)
        self._send(msg.header() for msg in self.out)
        self._reuse()

    def finish(self, final: bool) -> np.ndarray | None:
        """Say DONE (with the push count the servers check); with `final`, receive the trained weights."""
        self._reuse()
        finals = self._expect(FINAL_TAG) if final else []
        for msg in self.out:
            msg.set(DONE, self.pushes)
        self._send(msg.header() for msg in self.out)
        waitall(self.sends, self.poll, peer="parameter servers")
        return self._wait(finals) if final else None

    def counters(self) -> dict[str, int]:
        """Bytes and messages both ways; pushes counted once per server, as the servers count them."""
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "messages": self.messages,
                "pushes": self.pushes * len(self.shards)}

    def _reuse(self) -> None:
        """Wait until the previous sends have left the buffers about to be refilled."""
        waitall(self.sends, self.poll, peer="parameter servers")
        self.sends = []

    def _expect(self, tag: int) -> list[MPI.Request]:
        # Posted before the push goes out, so a reply lands straight in place.
        if self._uploaded is not None:  # ...but not over a reply still being uploaded
            self._uploaded.synchronize()
            self._uploaded = None
        return [self.comm.Irecv(self.reply[sh.lo:sh.hi], source=r, tag=tag) for sh, r in zip(self.shards, self.ranks)]

    def _send(self, buffers) -> None:
        for buf, dest in zip(buffers, self.ranks):
            self.sends.append(self.comm.Isend(buf, dest=dest, tag=MESSAGE_TAG))
            self.bytes_sent += buf.nbytes
            self.messages += 1

    def _wait(self, requests: list[MPI.Request]) -> np.ndarray:
        waitall(requests + self.sends, self.poll, peer="parameter servers")
        self.sends = []
        self.bytes_received += self.reply.nbytes
        self.messages += len(requests)
        if self.stager is None:
            return self.reply
        self._uploaded = self.stager.upload(self.reply, self.device_reply)
        return self.device_reply

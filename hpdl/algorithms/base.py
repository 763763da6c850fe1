"""The two halves of an asynchronous update rule: the server's reply to a message, a worker's steps."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import array_module, on_device, to_host


class _Stateful:
    """Checkpointing of the flat buffers a rule names in `_state_names` (None while unused)."""

    _state_names: tuple[str, ...] = ()

    def _init_like(self, w) -> None:
        self.xp: Any = array_module(w)
        self.size, self.dtype = int(w.size), w.dtype

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of the buffers: later updates do not change them."""
        out = {}
        for name in self._state_names:
            buf = getattr(self, name)
            if buf is not None:
                out[name] = to_host(buf) if on_device(buf) else buf.copy()
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        unknown = set(state) - set(self._state_names) - self._counters()
        if unknown:
            raise ValueError(f"{type(self).__name__} state has unknown entries {sorted(unknown)}")
        for name in self._state_names:
            if name not in state:
                setattr(self, name, None)
                continue
            host = np.asarray(state[name])
            if host.dtype != self.dtype or host.shape[-1:] != (self.size,):
                raise ValueError(f"{type(self).__name__} state {name!r}: {host.shape} {host.dtype} does "
                                 f"not fit vectors of {self.size} {self.dtype}")
            setattr(self, name, self.xp.array(host))  # a copy: the caller's array must not become ours

    def _counters(self) -> set[str]:
        return set()


class ServerRule(_Stateful):
    """The parameter server's side of an algorithm, over one flat vector `w` (a copy of `w0`).

    `apply(worker, payload, lr)` folds one worker's message into the state in place and
    returns the reply for that worker. The reply may be a view of the rule's buffers: it
    stays valid until the rule's next `apply` or `fetch`, so send (or copy) it before then.

    `version` counts applied messages; `sent_version[m]` is the version of what worker m
    last received (the reply to its previous message, or a fetch), so `staleness(m)`, read
    just before `apply`, is the delay of m's message: what a delay log records.
    """

    #: True when the reply is the server's weights, so a worker may also `fetch` them.
    replies_weights = False
    _state_names = ("w",)

    def __init__(self, w0, n_workers: int):
        if n_workers < 1:
            raise ValueError(f"need at least one worker, got {n_workers}")
        self._init_like(w0)
        self.w = w0.copy()
        self.n_workers = n_workers
        self.version = 0
        self.sent_version = [0] * n_workers

    def staleness(self, worker: int) -> int:
        """Updates applied since `worker` last received the server's state."""
        return self.version - self.sent_version[worker]

    def apply(self, worker: int, payload, lr: float):
        """Apply one message from `worker` in place; returns the reply to send it."""
        # Python floats keep float32 arithmetic float32 (NumPy scalars would promote it).
        reply = self._apply(worker, payload, float(lr))
        self.version += 1
        self.sent_version[worker] = self.version
        return reply

    def _apply(self, worker: int, payload, lr: float):
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        return super().state_dict() | {"version": np.array(self.version, np.int64),
                                       "sent_version": np.array(self.sent_version, np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        missing = {"w", "version", "sent_version"} - set(state)
        if missing:
            raise ValueError(f"{type(self).__name__} state lacks {sorted(missing)}")
        sent = np.asarray(state["sent_version"])
        if sent.shape != (self.n_workers,):
            raise ValueError(f"{type(self).__name__} state is for {sent.size} workers, not {self.n_workers}")
        super().load_state_dict(state)
        self.version = int(state["version"])
        self.sent_version = [int(v) for v in sent]

    def _counters(self) -> set[str]:
        return {"version", "sent_version"}


class WeightServer(ServerRule):
    """A server whose reply is its weights, which a worker may also fetch without pushing."""

    replies_weights = True

    def fetch(self, worker: int):
        """The weights to send `worker` now (valid until the next `apply` or `fetch`)."""
        self.sent_version[worker] = self.version
        return self._sent(worker)

    def _apply(self, worker: int, payload, lr: float):
        self._update(worker, payload, lr)
        return self._sent(worker)

    def _update(self, worker: int, payload, lr: float) -> None:
        raise NotImplementedError

    def _sent(self, worker: int):
        """Record what goes to `worker` and return it; plain servers just send their weights."""
        return self.w


class WorkerRule(_Stateful):
    """A worker's side of an algorithm, around the local steps on its flat parameters `w`.

    Local step k (0-based) of a worker runs

        rule.lookahead(w); g = gradient of the loss at w; rule.local_step(w, g, lr)
        if rule.should_push(k): send rule.payload(w)
        if rule.should_fetch(k): rule.on_reply(w, reply)      # the server's answer

    `g` is only read, and may be kept until the push (DC-ASGD sends it as it is). The
    payload may be `w` itself or one of the rule's buffers: it stays unchanged until
    `on_reply` (or, for a push without a fetch, for good), so it can be sent as it is.
    """

    def __init__(self, w):
        self._init_like(w)

    def lookahead(self, w) -> None:
        """Prepare `w` for the gradient (EAMSGD's momentum look-ahead); nothing by default."""

    def local_step(self, w, g, lr: float) -> None:
        raise NotImplementedError

    def should_push(self, step: int) -> bool:
        """Whether the worker sends a message after its local step `step` (0-based)."""
        return True

    def should_fetch(self, step: int) -> bool:
        """Whether the worker then waits for the server's answer; with every push by default."""
        return self.should_push(step)

    def payload(self, w):
        raise NotImplementedError

    def on_reply(self, w, reply) -> None:
        """Take the server's weights."""
        w[...] = reply


def every(period: int, what: str) -> int:
    """A communication period, checked: a positive whole number of local steps."""
    if int(period) != period or period < 1:
        raise ValueError(f"{what} must be a positive whole number of steps, got {period}")
    return int(period)

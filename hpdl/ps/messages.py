"""The parameter-server wire format: an int64 header and the payload in one reusable byte buffer."""
from __future__ import annotations

import numpy as np

# Message kinds (header field `kind`).
PUSH = 1   # payload: the worker rule's message; the server applies it
FETCH = 2  # no payload: send me your weights
DONE = 3   # no payload: field `step` holds how many pushes this worker sent to this server
CHECKPOINT = 4  # no payload: the worker has finished mini-batch step `step` and waits in a checkpoint

FIELDS = ("kind", "step", "lr_bits", "reply")  # reply: 1 when the worker waits for an answer
HEADER_BYTES = 8 * len(FIELDS)  # keeps the payload 8-byte aligned


def nbytes(size: int, dtype) -> int:
    """Bytes of a message buffer with a payload of `size` items of `dtype`."""
    return HEADER_BYTES + size * np.dtype(dtype).itemsize


class Message:
    """One message buffer: `head` (int64 fields) and `body` (the payload) are views of `raw`.

    A push and its metadata travel as ONE buffer send, so the server needs one preposted
    receive per worker and never waits for a second part. Header-only messages send
    `raw[:HEADER_BYTES]`; the receiver's larger buffer takes them as they are.
    """

    def __init__(self, size: int, dtype, raw: np.ndarray | None = None):
        """`raw`: the uint8 buffer to use, of nbytes(size, dtype) (pinned memory for device payloads)."""
        dtype = np.dtype(dtype)
        self.raw = np.zeros(nbytes(size, dtype), np.uint8) if raw is None else raw
        self.head = self.raw[:HEADER_BYTES].view(np.int64)
        self.body = self.raw[HEADER_BYTES:].view(dtype)

    def set(self, kind: int, step: int = 0, lr: float = 0.0, reply: bool = False) -> None:
        self.head[:] = (kind, step, np.float64(lr).view(np.int64), int(reply))

    @property
    def kind(self) -> int:
        return int(self.head[0])

    @property
    def step(self) -> int:
        return int(self.head[1])

    @property
    def lr(self) -> float:
        return float(self.head[2:3].view(np.float64)[0])

    @property
    def wants_reply(self) -> bool:
        return bool(self.head[3])

    def header(self) -> np.ndarray:
        """The bytes of a header-only message."""
        return self.raw[:HEADER_BYTES]

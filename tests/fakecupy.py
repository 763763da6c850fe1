"""A stand-in for the parts of CuPy that hpdl.comm.device uses, recording every call, for machines without a GPU.

Work runs at once (the host is the "device"), but every stream, event and copy call is
appended to `log`, so tests can check the order of operations. Events recorded on a copy
stream stay not `done` until synchronized while `copies_finish` is False, as a slow copy would.
MPI reads a FakeArray through DLPack, as a host buffer: enough to carry CUDA-aware sends.
"""
from __future__ import annotations

import numpy as np


class FakeEvent:
    def __init__(self, xp: FakeCupy, name: str, done: bool):
        self.xp, self.name, self._done = xp, name, done

    @property
    def done(self) -> bool:
        return self._done

    def synchronize(self) -> None:
        self.xp.log.append(("event.synchronize", self.name))
        self._done = True


class FakeStream:
    def __init__(self, xp: FakeCupy, name: str, copy: bool):
        self.xp, self.name, self.copy = xp, name, copy
        self.events = 0

    def record(self, event=None) -> FakeEvent:
        self.events += 1
        event = FakeEvent(self.xp, f"{self.name}#{self.events}", not self.copy or self.xp.copies_finish)
        self.xp.log.append(("record", event.name))
        return event

    def wait_event(self, event: FakeEvent) -> None:
        self.xp.log.append(("wait_event", self.name, event.name))

    def synchronize(self) -> None:
        self.xp.log.append(("synchronize", self.name))


class FakeCuda:
    def __init__(self, xp: FakeCupy):
        self.xp = xp
        self.compute = FakeStream(xp, "compute", copy=False)
        self.copy_streams: list[FakeStream] = []

    def Stream(self, non_blocking: bool = False) -> FakeStream:
        assert non_blocking, "copy streams must not synchronize with the legacy default stream"
        stream = FakeStream(self.xp, f"copy{len(self.copy_streams)}", copy=True)
        self.copy_streams.append(stream)
        return stream

    def get_current_stream(self) -> FakeStream:
        return self.compute

    def alloc_pinned_memory(self, nbytes: int) -> bytearray:
        self.xp.log.append(("alloc_pinned", nbytes))
        return bytearray(nbytes + 7)  # rounded up, as CuPy's pool may


class FakeArray:
    """A "device" array: NumPy data behind CuPy's get/set, not a numpy.ndarray."""

    def __init__(self, xp: FakeCupy, data: np.ndarray):
        self.xp, self.data = xp, data

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)
    nbytes = property(lambda self: self.data.nbytes)

    def get(self, stream=None, out=None, blocking=True):
        assert not blocking and stream is not None and out is not None
        self.xp.log.append(("get", stream.name))
        out[...] = self.data
        return out

    def set(self, arr: np.ndarray, stream=None) -> None:
        assert isinstance(arr, np.ndarray) and stream is not None
        self.xp.log.append(("set", stream.name))
        self.data[...] = arr

    def __getitem__(self, key) -> FakeArray:
        return FakeArray(self.xp, self.data[key])

    def __setitem__(self, key, value) -> None:
        self.xp.log.append(("device_copy",))
        self.data[key] = value.data if isinstance(value, FakeArray) else value

    def __dlpack__(self, **kwargs):
        return self.data.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.data.__dlpack_device__()


class FakeCupy:
    """The module: `cuda`, `empty`, `ascontiguousarray`, `array`."""

    def __init__(self, copies_finish: bool = True):
        self.log: list[tuple] = []
        self.copies_finish = copies_finish
        self.cuda = FakeCuda(self)

    def empty(self, shape, dtype) -> FakeArray:
        return FakeArray(self, np.empty(shape, dtype))

    def asarray(self, a) -> FakeArray:
        return a if isinstance(a, FakeArray) else FakeArray(self, np.array(a))

    def ascontiguousarray(self, a: FakeArray) -> FakeArray:
        if a.data.flags.c_contiguous:
            return a
        self.log.append(("device_copy",))
        return FakeArray(self, np.ascontiguousarray(a.data))

    def calls(self, *kinds: str) -> list[tuple]:
        """The log restricted to these kinds of call."""
        return [c for c in self.log if c[0] in kinds]

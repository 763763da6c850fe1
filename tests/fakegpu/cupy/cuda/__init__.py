"""cupy.cuda for tests/fakegpu: one device, streams and events whose work is already done."""
from __future__ import annotations

from types import SimpleNamespace


class Event:
    done = True

    def synchronize(self) -> None:
        pass


class Stream:
    def __init__(self, non_blocking: bool = False):
        self.non_blocking = non_blocking

    def record(self, event: Event | None = None) -> Event:
        return event or Event()

    def wait_event(self, event: Event) -> None:
        pass

    def synchronize(self) -> None:
        pass


_current = Stream()


def get_current_stream() -> Stream:
    return _current


class Device:
    def __init__(self, device: int = 0):
        self.id = device

    def synchronize(self) -> None:
        pass

    def use(self) -> None:
        pass


def alloc_pinned_memory(nbytes: int) -> bytearray:
    return bytearray(nbytes)


runtime = SimpleNamespace(getDeviceCount=lambda: 1,
                          getDeviceProperties=lambda i: {"name": b"fakegpu (NumPy on the host)"})

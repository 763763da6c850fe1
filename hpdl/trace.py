"""Chrome/Perfetto trace events: timed spans per rank, a JSON file, and a Gantt chart."""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# Gantt colours by the start of an event's name; anything else is grey.
COLORS = {"forward": "tab:blue", "backward": "tab:green", "send": "tab:orange",
          "recv": "tab:purple", "wait": "tab:red", "step": "tab:brown"}
_OTHER = "tab:gray"
_DISABLED = nullcontext()


class _Span:
    """Times one `with` block and records it as a complete ("X") event on exit."""

    __slots__ = ("tracer", "name", "cat", "args", "start")

    def __init__(self, tracer: Tracer, name: str, cat: str, args: dict[str, Any]):
        self.tracer, self.name, self.cat, self.args = tracer, name, cat, args

    def __enter__(self) -> _Span:
        self.start = self.tracer.now_us()
        return self

    def __exit__(self, *exc) -> None:
        end = self.tracer.now_us()
        event = {"name": self.name, "cat": self.cat, "ph": "X", "ts": self.start,
                 "dur": end - self.start, "pid": self.tracer.rank, "tid": 0}
        if self.args:
            event["args"] = self.args
        self.tracer.spans.append(event)


class Tracer:
    """Records spans of one rank; when disabled, `span` costs one branch and records nothing."""

    def __init__(self, rank: int, enabled: bool = True):
        self.rank, self.enabled = rank, enabled
        self.name = f"rank {rank}"
        self.spans: list[dict] = []
        # Wall-clock origin (shared by ranks, to NTP accuracy) advanced by perf_counter
        # (fine-grained and monotonic within the rank).
        self._wall0_us = time.time() * 1e6
        self._perf0 = time.perf_counter()

    def now_us(self) -> float:
        return self._wall0_us + (time.perf_counter() - self._perf0) * 1e6

    def set_name(self, name: str) -> None:
        """The row label of this rank, e.g. "stage 1 / replica 0"."""
        self.name = name

    def span(self, name: str, cat: str = "", **args: Any):
        """Context manager timing its block; `args` (numbers, strings) are shown with the event."""
        if not self.enabled:
            return _DISABLED
        return _Span(self, name, cat, args)

    def events(self) -> list[dict]:
        """This rank's name and sort order as metadata events, then its spans; [] when disabled."""
        if not self.enabled:
            return []
        meta = [{"name": "process_name", "ph": "M", "pid": self.rank, "tid": 0,
                 "args": {"name": self.name}},
                {"name": "process_sort_index", "ph": "M", "pid": self.rank, "tid": 0,
                 "args": {"sort_index": self.rank}}]
        return meta + self.spans


def to_bytes(events: list[dict]) -> np.ndarray:
    """Events as UTF-8 JSON in a uint8 array, for MPI buffer messages (JSON, never pickle)."""
    return np.frombuffer(json.dumps(events).encode(), dtype=np.uint8)


def from_bytes(buffer: np.ndarray) -> list[dict]:
    """The events `to_bytes` encoded."""
    return json.loads(np.ascontiguousarray(buffer, dtype=np.uint8).tobytes().decode())


def write_trace(path: str | Path, events_per_rank: Sequence[list[dict]]) -> Path:
    """Write a Chrome/Perfetto trace JSON of all ranks' events, shifted to start at time 0."""
    events = [dict(e) for rank_events in events_per_rank for e in rank_events]
    spans = [e for e in events if e["ph"] == "X"]
    origin = min((e["ts"] for e in spans), default=0.0)
    for e in spans:
        e["ts"] -= origin
    path = Path(path)
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return path


def _kind(name: str) -> str:
    return next((kind for kind in COLORS if name.startswith(kind)), "other")


def gantt(trace: str | Path | Sequence[dict], png_path: str | Path, title: str = "") -> Path:
    """Draw one row per rank of a trace file or event list, coloured by event name."""
    # The Figure API, not pyplot: no global backend switch, no window, safe on a cluster node.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    events = (json.loads(Path(trace).read_text())["traceEvents"]
              if isinstance(trace, (str, Path)) else list(trace))
    names = {e["pid"]: e["args"]["name"] for e in events
             if e["ph"] == "M" and e["name"] == "process_name"}
    spans = [e for e in events if e["ph"] == "X"]
    pids = sorted({e["pid"] for e in spans} | set(names))
    origin = min((e["ts"] for e in spans), default=0.0)
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for e in spans:
        bars.setdefault((e["pid"], _kind(e["name"])), []).append(
            ((e["ts"] - origin) / 1e3, e["dur"] / 1e3))

    fig = Figure(figsize=(10, 0.5 * len(pids) + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for (pid, kind), ranges in bars.items():
        # White edges keep back-to-back events of one kind apart.
        ax.broken_barh(ranges, (pids.index(pid) - 0.4, 0.8), facecolors=COLORS.get(kind, _OTHER),
                       edgecolors="white", linewidth=0.5)
    ax.set_yticks(range(len(pids)), [names.get(pid, f"rank {pid}") for pid in pids])
    ax.invert_yaxis()   # rank 0 on top, as in Perfetto
    ax.set_xlabel("time (ms)")
    ax.set_title(title)
    kinds = [k for k in (*COLORS, "other") if any(kind == k for _, kind in bars)]
    ax.legend(handles=[Patch(color=COLORS.get(k, _OTHER), label=k) for k in kinds],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.savefig(png_path, dpi=100, bbox_inches="tight")
    return Path(png_path)

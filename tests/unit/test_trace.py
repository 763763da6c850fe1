"""Tracing: spans time and nest, a disabled tracer records nothing, traces survive JSON and draw."""
from __future__ import annotations

import json
import time

import numpy as np

from hpdl.pipeline.clock import simulate
from hpdl.trace import Tracer, from_bytes, gantt, to_bytes, write_trace


def test_span_records_a_complete_event_in_microseconds():
    """A span is one "X" event on pid = rank, tid 0, lasting at least the time its block took."""
    tracer = Tracer(rank=3, enabled=True)
    with tracer.span("forward", "compute", mb=5):
        time.sleep(0.01)
    (event,) = [e for e in tracer.events() if e["ph"] == "X"]
    assert {k: event[k] for k in ("name", "cat", "pid", "tid", "args")} == \
        {"name": "forward", "cat": "compute", "pid": 3, "tid": 0, "args": {"mb": 5}}
    assert 10_000 <= event["dur"] < 1_000_000


def test_nested_spans_lie_inside_their_parent():
    tracer = Tracer(rank=0, enabled=True)
    with tracer.span("step", "optim"):
        with tracer.span("allreduce", "comm"):
            time.sleep(0.001)
    spans = {e["name"]: e for e in tracer.events() if e["ph"] == "X"}
    outer, inner = spans["step"], spans["allreduce"]
    assert outer["ts"] <= inner["ts"]
    assert inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"]


def test_ranks_share_one_clock():
    """Two tracers (two ranks) place sequential spans in order, the gap between them preserved."""
    a, b = Tracer(rank=0, enabled=True), Tracer(rank=1, enabled=True)
    with a.span("send", "comm"):
        pass
    time.sleep(0.005)
    with b.span("recv", "comm"):
        pass
    (sent,), (received,) = ([e for e in t.events() if e["ph"] == "X"] for t in (a, b))
    assert 4_000 <= received["ts"] - (sent["ts"] + sent["dur"]) < 1_000_000


def test_disabled_tracer_runs_the_block_and_records_nothing():
    tracer = Tracer(rank=0, enabled=False)
    ran = []
    with tracer.span("forward", "compute", mb=0):
        ran.append(True)
    assert ran == [True]
    assert tracer.events() == []


def test_events_carry_the_process_name():
    tracer = Tracer(rank=2, enabled=True)
    tracer.set_name("stage 1 / replica 0")
    meta = {e["name"]: e["args"] for e in tracer.events() if e["ph"] == "M"}
    assert meta == {"process_name": {"name": "stage 1 / replica 0"},
                    "process_sort_index": {"sort_index": 2}}


def test_byte_encoding_round_trips_from_any_slice():
    """to_bytes gives a flat uint8 array; from_bytes reads it back, also out of a larger gather buffer."""
    tracer = Tracer(rank=1, enabled=True)
    with tracer.span("backward", "compute", mb=7, note="ü"):
        pass
    events = tracer.events()
    encoded = to_bytes(events)
    assert encoded.dtype == np.uint8 and encoded.ndim == 1
    gathered = np.concatenate([np.zeros(5, np.uint8), encoded, np.zeros(3, np.uint8)])
    assert from_bytes(gathered[5:5 + encoded.size]) == events
    assert from_bytes(to_bytes([])) == []


def test_write_trace_is_valid_chrome_trace_json(tmp_path):
    """The file holds traceEvents with ms display, every span with numeric ts/dur, starting at 0."""
    tracers = [Tracer(rank=r, enabled=True) for r in range(2)]
    for r, tracer in enumerate(tracers):
        tracer.set_name(f"stage {r} / replica 0")
        with tracer.span("forward", "compute", mb=0):
            time.sleep(0.001)
    path = write_trace(tmp_path / "trace.json", [from_bytes(to_bytes(t.events())) for t in tracers])
    trace = json.loads(path.read_text())
    assert trace["displayTimeUnit"] == "ms"
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == 2 and min(e["ts"] for e in spans) == 0
    assert all(isinstance(e["ts"], (int, float)) and e["dur"] >= 0 for e in spans)
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {0: "stage 0 / replica 0", 1: "stage 1 / replica 0"}


def test_gantt_draws_a_png_from_a_file_or_events(tmp_path):
    """A trace file and a simulated schedule both become non-empty PNG images."""
    tracer = Tracer(rank=0, enabled=True)
    for kind in ("forward", "send_act", "recv_grad", "backward", "wait", "step", "other"):
        with tracer.span(kind, "x"):
            pass
    from_file = gantt(write_trace(tmp_path / "t.json", [tracer.events()]), tmp_path / "a.png", "file")
    simulated = [e for stage in simulate("1f1b", 4, 8, t_comm=0.2).to_trace() for e in stage]
    from_sim = gantt(simulated, tmp_path / "b.png", "1f1b, P=4, M=8")
    for png in (from_file, from_sim):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000

"""How device buffers reach MPI (hpdl.comm.device), checked without a GPU on a recording fake of CuPy."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from mpi4py import MPI

from fakecupy import FakeArray, FakeCupy
from hpdl.backend import BackendError
from hpdl.comm import device
from hpdl.comm.collectives import BucketAllreduce
from hpdl.comm.device import CUDA_AWARE_ENV, Stager, detect, library_query, loaded_mpi_libraries
from hpdl.comm.p2p import PipeChannel, tag
from hpdl.comm.wait import allreduce
from hpdl.ps.client import PsClient
from hpdl.ps.messages import HEADER_BYTES, PUSH
from hpdl.ps.server import REPLY_TAG
from hpdl.ps.shards import stage_shards

MPI_CALLS = ("Isend", "Irecv", "Iallreduce")


class FakeComm:
    """Rank 0 of 2, recording its buffer calls in the fake's log. Sends complete at once; a receive is a
    real receive on COMM_SELF, so a test delivers a message by `deliver`ing it first."""

    def __init__(self, xp: FakeCupy):
        self.xp, self.sent, self.buffers = xp, [], []

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 2

    def Isend(self, buf, dest: int, tag: int) -> MPI.Request:
        self.xp.log.append(("Isend", dest, tag))
        self.buffers.append(buf)
        self.sent.append(np.array(buf.data if isinstance(buf, FakeArray) else buf, copy=True))
        return MPI.Request()

    def Irecv(self, buf, source: int, tag: int) -> MPI.Request:
        self.xp.log.append(("Irecv", source, tag))
        return MPI.COMM_SELF.Irecv(buf, source=0, tag=tag)

    def Iallreduce(self, sendbuf, recvbuf, op) -> MPI.Request:
        assert sendbuf is MPI.IN_PLACE
        self.xp.log.append(("Iallreduce",))
        self.buffers.append(recvbuf)
        (recvbuf.data if isinstance(recvbuf, FakeArray) else recvbuf)[...] *= 2  # the other rank holds the same
        return MPI.Request()

    @staticmethod
    def deliver(data: np.ndarray, tag: int) -> MPI.Request:
        return MPI.COMM_SELF.Isend(data, dest=0, tag=tag)


def position(log: list[tuple], call: tuple) -> int:
    return log.index(call)


# -- detection ------------------------------------------------------------------------------
def test_env_override_wins_and_the_library_is_not_asked():
    """HPDL_CUDA_AWARE_MPI=1 or 0 decides alone; the query is never called."""
    def query():
        raise AssertionError("the library was asked despite the override")
    assert detect({CUDA_AWARE_ENV: "1"}, query) is True
    assert detect({CUDA_AWARE_ENV: "0"}, query) is False


@pytest.mark.parametrize("answer, expected", [(True, True), (False, False), (None, False)])
def test_without_override_the_library_answers_and_unknown_means_staging(answer, expected):
    """Unset or empty: the library's query decides; a library with no query (None) gets staging."""
    assert detect({}, lambda: answer) is expected
    assert detect({CUDA_AWARE_ENV: ""}, lambda: answer) is expected


def test_a_bad_override_is_a_one_line_user_error():
    with pytest.raises(BackendError, match=r"HPDL_CUDA_AWARE_MPI must be 0 .* got 'yes'") as e:
        detect({CUDA_AWARE_ENV: "yes"}, lambda: True)
    assert "\n" not in str(e.value)


def test_the_loaded_mpi_library_is_queried():
    """Here (MPICH from the wheel, no GPU) the loaded libmpi is found, has the query, and says no;
    a library without the symbol, or none at all, gives None."""
    paths = loaded_mpi_libraries()
    assert any("libmpi" in p for p in paths)
    assert library_query() is False
    assert library_query(paths=[]) is None
    assert library_query(paths=["/nonexistent/libmpi.so.12"]) is None


def test_loaded_mpi_libraries_reads_the_maps_file(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /opt/mpi/lib/libmpi.so.40.30.0\n"
                    "7f01-7f02 r--p 0 08:01 1 /opt/mpi/lib/libmpi.so.40.30.0\n"
                    "7f02-7f03 r-xp 0 08:01 2 /usr/lib/libc.so.6\n"
                    "7f03-7f04 r-xp 0 08:01 3 /opt/mpi/lib/libmpi_cray.so.12\n")
    assert loaded_mpi_libraries(str(maps)) == ["/opt/mpi/lib/libmpi.so.40.30.0", "/opt/mpi/lib/libmpi_cray.so.12"]
    assert loaded_mpi_libraries(str(tmp_path / "absent")) == []


def test_cuda_aware_is_decided_once_per_process(monkeypatch):
    device.cuda_aware.cache_clear()
    monkeypatch.setenv(CUDA_AWARE_ENV, "1")
    try:
        assert device.cuda_aware() is True
        monkeypatch.setenv(CUDA_AWARE_ENV, "0")
        assert device.cuda_aware() is True
    finally:
        device.cuda_aware.cache_clear()


# -- staged sends through the pipeline channel ---------------------------------------------
def staged_channel(copies_finish: bool = True) -> tuple[FakeCupy, FakeComm, PipeChannel]:
    xp = FakeCupy(copies_finish)
    comm = FakeComm(xp)
    return xp, comm, PipeChannel(comm, 0, 2, stager=Stager(xp, aware=False))


def test_a_staged_send_copies_on_the_copy_stream_after_compute_and_waits_only_for_the_copy():
    """record on compute -> copy stream waits on it -> download on the copy stream -> its event is
    synchronized -> Isend of the pinned buffer; compute itself is never synchronized."""
    xp, comm, channel = staged_channel()
    a = FakeArray(xp, np.arange(6.0).reshape(2, 3))
    channel.send_act(0, a)
    log = xp.log
    record, wait_event = position(log, ("record", "compute#1")), position(log, ("wait_event", "copy0", "compute#1"))
    get, done = position(log, ("get", "copy0")), position(log, ("record", "copy0#1"))
    synced, isend = position(log, ("event.synchronize", "copy0#1")), position(log, ("Isend", 1, tag(0, 0)))
    assert record < wait_event < get < done < synced < isend
    assert ("synchronize", "compute") not in log
    assert isinstance(comm.buffers[0], np.ndarray)  # MPI got host memory
    np.testing.assert_array_equal(comm.sent[0], a.data)


def test_a_send_is_held_until_its_copy_is_done_and_sends_keep_their_order():
    """While copies run, sends wait in the channel (compute goes on); the next send posts those already
    copied, in order; flush synchronizes and posts the rest. No Isend precedes its copy's synchronize."""
    xp, comm, channel = staged_channel(copies_finish=False)
    arrays = [FakeArray(xp, np.full(4, float(mb))) for mb in range(3)]
    channel.send_act(0, arrays[0])
    channel.send_act(1, arrays[1])
    assert xp.calls("Isend") == []
    channel._held[0][0].copied._done = True   # the first copy finishes by itself
    channel.send_act(2, arrays[2])
    assert xp.calls("Isend") == [("Isend", 1, tag(0, 0))]
    channel.flush()
    assert xp.calls("Isend") == [("Isend", 1, tag(0, mb)) for mb in range(3)]
    for mb in (1, 2):
        assert position(xp.log, ("event.synchronize", f"copy0#{mb + 1}")) < position(xp.log, ("Isend", 1, tag(0, mb)))
    assert [float(s[0]) for s in comm.sent] == [0.0, 1.0, 2.0]


def test_pinned_buffers_are_reused_once_their_sends_complete():
    xp, comm, channel = staged_channel()
    for mb in range(5):
        channel.send_act(mb, FakeArray(xp, np.full((3, 2), float(mb), np.float32)))
        channel.flush()
    assert len(xp.calls("alloc_pinned")) == 1
    assert len({id(b) for b in comm.buffers}) == 1
    assert [float(s[0, 0]) for s in comm.sent] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_waiting_for_a_receive_first_posts_every_held_send():
    """A peer may need the held message before it sends the one this rank waits for."""
    xp, comm, channel = staged_channel(copies_finish=False)
    channel.send_act(0, FakeArray(xp, np.ones(3)))
    handle = channel.post_recv_grad(0, (3,), np.float64)
    send = comm.deliver(np.arange(3.0), tag(1, 0))
    got = channel.take(handle)
    send.Wait()
    assert position(xp.log, ("Isend", 1, tag(0, 0))) < position(xp.log, ("set", "copy1"))
    assert isinstance(got, FakeArray)
    np.testing.assert_array_equal(got.data, np.arange(3.0))


def test_a_staged_receive_is_uploaded_on_the_copy_stream_and_compute_waits_for_it():
    """Irecv into pinned memory; the upload waits on compute (its target memory), compute waits on the
    upload; the pinned buffer returns to the pool only once the upload is done."""
    xp, comm, channel = staged_channel(copies_finish=False)
    stager = channel.stager
    handle = channel.post_recv_grad(0, (2, 2), np.float32)
    assert isinstance(handle.buffer, np.ndarray)
    send = comm.deliver(np.full((2, 2), 7.0, np.float32), tag(1, 0))
    x = channel.take(handle)
    send.Wait()
    log = xp.log
    assert position(log, ("wait_event", "copy1", "compute#1")) < position(log, ("set", "copy1")) \
        < position(log, ("record", "copy1#1")) < position(log, ("wait_event", "compute", "copy1#1"))
    np.testing.assert_array_equal(x.data, 7.0)
    assert stager.host((2, 2), np.float32) is not handle.buffer   # still being uploaded: a new one
    stager._uploading[0][0].synchronize()
    assert stager.host((2, 2), np.float32) is handle.buffer


# -- CUDA-aware -----------------------------------------------------------------------------
def test_cuda_aware_sends_the_device_array_after_synchronizing_the_current_stream():
    xp = FakeCupy()
    comm = FakeComm(xp)
    channel = PipeChannel(comm, 0, 2, stager=Stager(xp, aware=True))
    a = FakeArray(xp, np.arange(4.0))
    channel.send_act(0, a)
    assert comm.buffers[0] is a
    assert position(xp.log, ("synchronize", "compute")) < position(xp.log, ("Isend", 1, tag(0, 0)))
    assert xp.calls("get", "set", "alloc_pinned") == []
    b = FakeArray(xp, np.arange(12.0).reshape(3, 4)[:, ::2])   # not contiguous: copied first, then synchronized
    channel.send_act(1, b)
    assert xp.log[-3:] == [("device_copy",), ("synchronize", "compute"), ("Isend", 1, tag(0, 1))]
    np.testing.assert_array_equal(comm.sent[1], b.data)


def test_cuda_aware_receives_into_device_memory_after_synchronizing():
    xp = FakeCupy()
    comm = FakeComm(xp)
    channel = PipeChannel(comm, 0, 2, stager=Stager(xp, aware=True))
    handle = channel.post_recv_grad(3, (4,), np.float64)
    assert isinstance(handle.buffer, FakeArray)
    assert position(xp.log, ("synchronize", "compute")) < position(xp.log, ("Irecv", 1, tag(1, 3)))
    send = comm.deliver(np.arange(4.0), tag(1, 3))
    got = channel.take(handle)
    send.Wait()
    assert got is handle.buffer
    np.testing.assert_array_equal(got.data, np.arange(4.0))


# -- allreduce ------------------------------------------------------------------------------
def test_staged_allreduce_downloads_reduces_on_the_host_and_uploads():
    xp = FakeCupy()
    comm = FakeComm(xp)
    v = FakeArray(xp, np.arange(5.0))
    assert allreduce(comm, v, stager=Stager(xp, aware=False)) is v
    np.testing.assert_array_equal(v.data, 2 * np.arange(5.0))
    order = [c[0] for c in xp.calls("get", "event.synchronize", "Iallreduce", "set")]
    assert order == ["get", "event.synchronize", "Iallreduce", "set"]
    assert isinstance(comm.buffers[0], np.ndarray)


def test_aware_allreduce_reduces_the_device_array_in_place_after_synchronizing():
    xp = FakeCupy()
    comm = FakeComm(xp)
    v = FakeArray(xp, np.arange(5.0))
    out = FakeArray(xp, np.zeros(5))
    allreduce(comm, v, out, stager=Stager(xp, aware=True))
    assert comm.buffers[0] is out
    assert position(xp.log, ("synchronize", "compute")) < position(xp.log, ("Iallreduce",))
    np.testing.assert_array_equal(out.data, 2 * np.arange(5.0))
    np.testing.assert_array_equal(v.data, np.arange(5.0))   # out of place: the input is untouched


def test_bucketed_allreduce_of_a_device_vector_starts_buckets_in_order_once_copied():
    """Each bucket's copy starts at its first layer; its Iallreduce once the copy is done; wait() uploads."""
    xp = FakeCupy(copies_finish=False)
    comm = FakeComm(xp)
    views = [{"W": np.zeros(4)}, {"W": np.zeros(4)}, {"W": np.zeros(4)}]
    flat = SimpleNamespace(views=views, stats=np.zeros(0), vector=FakeArray(xp, np.arange(12.0)))
    reducer = BucketAllreduce(comm, flat, bucket_bytes=32, stager=Stager(xp, aware=False))
    assert len(reducer) == 3
    reducer.layer_done(2)
    reducer.layer_done(1)
    assert xp.calls("Iallreduce") == []
    reducer._held[0][1].copied._done = True
    reducer.layer_done(0)
    assert len(xp.calls("Iallreduce")) == 1
    reducer.wait()
    assert len(xp.calls("Iallreduce")) == 3 and len(xp.calls("set")) == 3
    np.testing.assert_array_equal(flat.vector.data, 2 * np.arange(12.0))
    assert reducer.bytes_reduced == 96


# -- parameter-server client ----------------------------------------------------------------
def test_ps_client_downloads_into_pinned_messages_and_uploads_the_reply():
    xp = FakeCupy()
    comm = FakeComm(xp)
    shards = stage_shards(0, 1, 2, 10)
    client = PsClient(comm, shards, [3, 4], 10, np.float64, stager=Stager(xp, aware=False))
    replies = [comm.deliver(np.arange(sh.lo, sh.hi, dtype=np.float64) * 10, REPLY_TAG) for sh in shards]
    reply = client.push(FakeArray(xp, np.arange(10.0)), step=5, lr=0.1, reply=True)
    MPI.Request.Waitall(replies)
    log = xp.log
    assert [c[0] for c in xp.calls("get", "event.synchronize", "Isend")] == \
        ["get", "get", "event.synchronize", "event.synchronize", "Isend", "Isend"]
    for sh, sent in zip(shards, comm.sent):
        assert sent[:HEADER_BYTES].view(np.int64)[0] == PUSH
        np.testing.assert_array_equal(sent[HEADER_BYTES:].view(np.float64), np.arange(sh.lo, sh.hi))
    assert isinstance(reply, FakeArray)
    np.testing.assert_array_equal(reply.data, np.arange(10.0) * 10)
    assert position(log, ("set", "copy1")) < position(log, ("wait_event", "compute", "copy1#1"))


# -- NumPy arrays take the plain path -------------------------------------------------------
def test_numpy_arrays_never_touch_the_stager():
    xp = FakeCupy()
    comm = FakeComm(xp)
    stager = Stager(xp, aware=False)
    channel = PipeChannel(comm, 0, 2, stager=stager)
    a = np.arange(4.0)
    channel.send_act(0, a)
    channel.flush()
    v = np.arange(3.0)
    allreduce(comm, v, stager=stager)
    flat = SimpleNamespace(views=[{"W": np.zeros(4)}], stats=np.zeros(0), vector=np.arange(4.0))
    reducer = BucketAllreduce(comm, flat, stager=stager)
    reducer.layer_done(0)
    reducer.wait()
    assert reducer.stager is None
    assert xp.log == [("Isend", 1, tag(0, 0)), ("Iallreduce",), ("Iallreduce",)]
    assert comm.buffers[0] is a

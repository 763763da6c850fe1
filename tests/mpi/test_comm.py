"""Topology communicators, the pipeline channel and polite waiting, over real MPI ranks."""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from hpdl.comm.p2p import TAG_PERIOD, PipeChannel
from hpdl.comm.topology import RANKS_PER_NODE_ENV, Layout, Topology, node_ids
from hpdl.comm.wait import CommTimeout, allreduce, wait, waitall

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
SENTINEL = -1.0


# -- wait, waitall, allreduce ----------------------------------------------------------------
@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("poll", ["sleep", "spin"])
def test_ring_waitall(poll):
    """Each rank sends its rank to the right and receives its left neighbour's into a sentinel buffer."""
    left, right = (rank - 1) % size, (rank + 1) % size
    send = np.arange(5, dtype=np.float64) + 100 * rank
    recv = np.full(5, SENTINEL)
    requests = [comm.Irecv(recv, source=left, tag=7), comm.Isend(send, dest=right, tag=7)]
    waitall(requests, poll)
    np.testing.assert_array_equal(recv, np.arange(5) + 100 * left)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("poll", ["sleep", "spin"])
def test_allreduce_in_place_and_out_of_place(poll):
    buf = np.full(3, float(rank))
    assert allreduce(comm, buf, poll=poll) is buf
    np.testing.assert_array_equal(buf, size * (size - 1) / 2)
    out = np.full(3, SENTINEL)
    allreduce(comm, np.full(3, rank + 1, dtype=np.float64), out, op=MPI.MAX, poll=poll)
    np.testing.assert_array_equal(out, size)


@pytest.mark.mpi(min_size=1)
@pytest.mark.timeout(60)
def test_wait_deadline_raises_then_cancel():
    """A receive nobody sends: wait gives up naming peer and tag; the request can then be cancelled."""
    buf = np.full(4, SENTINEL)
    request = MPI.COMM_SELF.Irecv(buf, source=0, tag=999)
    with pytest.raises(CommTimeout, match=r"on rank 0 \(tag 999\)") as e:
        wait(request, timeout=0.05, peer="rank 0", tag=999)
    assert e.value.seconds == 0.05 and e.value.tag == 999
    request.Cancel()
    status = MPI.Status()
    request.Wait(status)
    assert status.Is_cancelled()
    np.testing.assert_array_equal(buf, SENTINEL)


def test_wait_rejects_unknown_poll():
    with pytest.raises(ValueError, match="poll must be one of sleep, spin"):
        wait(MPI.REQUEST_NULL, poll="busy")


# -- PipeChannel ----------------------------------------------------------------------------
def shape_of(mb: int) -> tuple[int, int]:
    """Two shapes alternate, as a short last micro-batch would add a second one."""
    return (3 + mb % 2, 5)


def payload(mb: int, stage: int, kind: str) -> np.ndarray:
    """What `stage` sends for mb: distinct per (mb, stage, kind), never the sentinel."""
    n = int(np.prod(shape_of(mb)))
    return (np.arange(n, dtype=np.float64) + 1000 * mb + 10 * stage + (0.5 if kind == "grad" else 0)).reshape(
        shape_of(mb))


def relay(channel: PipeChannel, kind: str, n_micro: int, window: int) -> None:
    """Pass n_micro messages of one kind along the pipeline, `window` receives posted at a time.

    Receives are waited on in reverse order of posting, so matching relies on tags alone.
    Each buffer is checked, overwritten with the sentinel and released, so a reused buffer
    that a message did not fill shows up as sentinel values.
    """
    s, last = channel.stage, channel.n_stages - 1
    source = s - 1 if kind == "act" else s + 1
    receives = (s > 0) if kind == "act" else (s < last)
    sends = (s < last) if kind == "act" else (s > 0)
    post = channel.post_recv_act if kind == "act" else channel.post_recv_grad
    send = channel.send_act if kind == "act" else channel.send_grad
    for first in range(0, n_micro, window):
        mbs = range(first, min(first + window, n_micro))
        handles = {mb: post(mb, shape_of(mb), np.float64) for mb in mbs} if receives else {}
        for mb in reversed(mbs):
            if receives:
                buf = channel.wait_recv(handles[mb])
                np.testing.assert_array_equal(buf, payload(mb, source, kind))
                buf.fill(SENTINEL)
                channel.release(buf)
            if sends:
                send(mb, payload(mb, s, kind))
    channel.flush()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("poll", ["sleep", "spin"])
def test_activations_forward_gradients_backward(poll):
    n_micro, window = 40, 6
    channel = PipeChannel(comm, rank, size, poll=poll, timeout=30)
    relay(channel, "act", n_micro, window)
    relay(channel, "grad", n_micro, window)

    per_direction = sum(payload(mb, 0, "act").nbytes for mb in range(n_micro))
    first, last = rank == 0, rank == size - 1
    expected = {"act_bytes_sent": 0 if last else per_direction, "act_bytes_received": 0 if first else per_direction,
                "grad_bytes_sent": 0 if first else per_direction, "grad_bytes_received": 0 if last else per_direction,
                "act_messages_sent": 0 if last else n_micro, "act_messages_received": 0 if first else n_micro,
                "grad_messages_sent": 0 if first else n_micro, "grad_messages_received": 0 if last else n_micro}
    stats = channel.stats()
    assert {k: stats[k] for k in expected} == expected
    assert stats["bytes_sent"] == channel.bytes_sent == expected["act_bytes_sent"] + expected["grad_bytes_sent"]
    assert channel.messages == sum(v for k, v in expected.items() if "messages" in k)
    # Receive buffers are reused: no more were ever allocated than one window's worth of receives,
    # though 40 micro-batches of each kind went through this stage.
    assert 0 < channel.pool.allocated <= window

    # Every rank has sent the same total, so the sum over ranks checks that nothing went missing.
    totals = np.array([channel.bytes_sent, channel.bytes_received], dtype=np.int64)
    allreduce(comm, totals)
    assert totals[0] == totals[1] == 2 * (size - 1) * per_direction


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_micro_batch_numbers_wrap_around_the_tag_range():
    """mb and mb + TAG_PERIOD share a tag; posted and sent in the same order they still pair correctly."""
    channel = PipeChannel(comm, rank, size)
    mbs = [3, 3 + TAG_PERIOD, 3 + 2 * TAG_PERIOD]
    if rank == 1:
        handles = [channel.post_recv_act(mb, shape_of(0), np.float64) for mb in mbs]
        for mb, handle in zip(mbs, handles):
            buf = channel.wait_recv(handle)
            np.testing.assert_array_equal(buf, payload(0, 0, "act") + mb)
            channel.release(buf)
    elif rank == 0:
        for mb in mbs:
            channel.send_act(mb, payload(0, 0, "act") + mb)
    channel.flush()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_a_message_of_the_wrong_size_is_an_error():
    channel = PipeChannel(comm, rank, size)
    if rank == 0:
        channel.send_act(0, np.zeros(10))
    elif rank == 1:
        handle = channel.post_recv_act(0, (12,), np.float64)
        with pytest.raises(ValueError, match="act of micro-batch 0 from stage 0 has 80 bytes, expected 96"):
            channel.wait_recv(handle)
    channel.flush()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_a_receive_that_never_comes_times_out():
    channel = PipeChannel(comm, rank, size, timeout=0.05)
    if rank == 1:
        handle = channel.post_recv_act(12345, (2,), np.float32)
        with pytest.raises(CommTimeout, match=r"act of micro-batch 12345 from stage 0 \(tag 24690\)"):
            channel.wait_recv(handle)
        handle.request.Cancel()
        handle.request.Wait()
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
def test_channel_checks_its_arguments():
    with pytest.raises(ValueError, match="expected stage"):
        PipeChannel(comm, rank, size + 1)
    channel = PipeChannel(comm, rank, size)
    if rank == 0:
        with pytest.raises(ValueError, match="has no stage -1 to exchange act with"):
            channel.post_recv_act(0, (1,), np.float32)
    if rank == size - 1:
        with pytest.raises(ValueError, match=f"has no stage {size} to exchange act with"):
            channel.send_act(0, np.zeros(1))
    with pytest.raises(ValueError, match="did not come from this channel's pool"):
        channel.release(np.zeros(3))


# -- Topology -------------------------------------------------------------------------------
def layouts_for(n: int) -> list[Layout]:
    return [Layout(s, n // s) for s in range(1, n + 1) if n % s == 0]


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_topology_roles_and_communicators(monkeypatch):
    monkeypatch.delenv(RANKS_PER_NODE_ENV, raising=False)
    for layout in layouts_for(size):
        topo = Topology.create(comm, layout)
        S, R = layout.stages, layout.replicas
        assert not topo.is_ps and topo.n_stages == S and topo.world == size
        assert topo.world_rank(topo.stage, topo.replica) == rank
        assert (topo.pipe.Get_size(), topo.pipe.Get_rank()) == (S, topo.stage)
        assert (topo.stage_comm.Get_size(), topo.stage_comm.Get_rank()) == (R, topo.replica)

        # Every rank computed the same roles.
        mine = np.array([topo.stage, topo.replica], dtype=np.int64)
        everyone = np.full((size, 2), -1, dtype=np.int64)
        comm.Allgather(mine, everyone)
        assert [tuple(row) for row in everyone] == [(r.stage, r.replica) for r in topo.roles]

        # stage_comm sums the replicas of this stage only; pipe the stages of this replica only.
        x = np.array([1000 * topo.stage + topo.replica], dtype=np.int64)
        over_stage = np.zeros(1, dtype=np.int64)
        topo.stage_comm.Allreduce(x, over_stage)
        assert over_stage[0] == R * 1000 * topo.stage + R * (R - 1) // 2
        over_pipe = np.zeros(1, dtype=np.int64)
        topo.pipe.Allreduce(x, over_pipe)
        assert over_pipe[0] == 1000 * S * (S - 1) // 2 + S * topo.replica

        table = topo.describe()
        assert len(table.splitlines()) == 1 + size and table.splitlines()[1 + rank].split()[0] == str(rank)
        topo.free()


@pytest.mark.mpi(min_size=2)
def test_node_ids_on_one_machine(monkeypatch):
    monkeypatch.delenv(RANKS_PER_NODE_ENV, raising=False)
    assert node_ids(comm) == [0] * size


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_ranks_per_node_override_places_replicas_together(monkeypatch):
    if size % 2:
        pytest.skip("needs an even number of ranks")
    per_node = size // 2
    monkeypatch.setenv(RANKS_PER_NODE_ENV, str(per_node))
    assert node_ids(comm) == [r - r % per_node for r in range(size)]
    topo = Topology.create(comm, Layout(2, per_node))
    # The replicas of a stage share one node; the two stages sit on different nodes.
    node = np.array([topo.nodes[rank]], dtype=np.int64)
    stage_nodes = np.full(per_node, -1, dtype=np.int64)
    topo.stage_comm.Allgather(node, stage_nodes)
    assert set(stage_nodes) == {topo.nodes[rank]}
    pipe_nodes = np.full(2, -1, dtype=np.int64)
    topo.pipe.Allgather(node, pipe_nodes)
    assert pipe_nodes[0] != pipe_nodes[1]
    topo.free()

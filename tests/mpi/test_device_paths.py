"""Device arrays between real ranks, staged and CUDA-aware, with a stand-in for CuPy (fakecupy)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from mpi4py import MPI

from fakecupy import FakeArray, FakeCupy
from hpdl.comm.collectives import BucketAllreduce
from hpdl.comm.device import Stager
from hpdl.comm.p2p import PipeChannel
from hpdl.comm.wait import allreduce

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
SENTINEL = -1.0


def payload(mb: int, stage: int) -> np.ndarray:
    return np.arange(6.0).reshape(2, 3) + 100 * mb + stage


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("aware", [False, True])
def test_device_arrays_pass_along_the_pipeline(aware):
    """Each stage receives every micro-batch from the one before into sentinel-filled buffers, as device
    arrays, and sends its own on; sends are held while copies run and all go out by flush."""
    xp = FakeCupy(copies_finish=False)
    channel = PipeChannel(comm, rank, size, timeout=30, stager=Stager(xp, aware=aware))
    handles = [channel.post_recv_act(mb, (2, 3), np.float64) for mb in range(3)] if rank > 0 else []
    for h in handles:
        (h.buffer.data if aware else h.buffer).fill(SENTINEL)
    comm.Barrier()  # nothing is sent before the buffers hold the sentinel
    if rank < size - 1:
        for mb in range(3):
            channel.send_act(mb, FakeArray(xp, payload(mb, rank)))
    for mb, h in enumerate(handles):
        got = channel.take(h)
        assert isinstance(got, FakeArray)
        np.testing.assert_array_equal(got.data, payload(mb, rank - 1))
    channel.flush()
    assert channel.bytes_sent == (3 * 48 if rank < size - 1 else 0)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("aware", [False, True])
def test_device_allreduces_sum_over_ranks(aware):
    xp = FakeCupy(copies_finish=False)
    stager = Stager(xp, aware=aware)
    v = FakeArray(xp, np.arange(5.0) * (rank + 1))
    allreduce(comm, v, stager=stager)
    np.testing.assert_array_equal(v.data, np.arange(5.0) * size * (size + 1) / 2)

    vector = FakeArray(xp, np.arange(12.0) + rank)
    flat = SimpleNamespace(views=[{"W": np.zeros(4)}] * 3, stats=np.zeros(0), vector=vector)
    reducer = BucketAllreduce(comm, flat, bucket_bytes=32, stager=stager)
    for i in reversed(range(3)):
        reducer.layer_done(i)
    reducer.wait()
    np.testing.assert_array_equal(vector.data, size * np.arange(12.0) + size * (size - 1) / 2)

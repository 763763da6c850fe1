"""Parameter servers, the Hogwild! window and the replica checksum over real MPI ranks."""
from __future__ import annotations

import time

import numpy as np
import pytest
from mpi4py import MPI

from hpdl.algorithms import AsgdServer
from hpdl.distributed import ReplicasDiverged, check_replicas
from hpdl.hogwild import SharedVector
from hpdl.ps.client import PsClient
from hpdl.ps.server import ExactlyOnceError, ShardServer, serve
from hpdl.ps.shards import Shard, stage_shards

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
SIZE = 7
PUSHES = 6


def payload(worker: int, k: int) -> np.ndarray:
    """Whole numbers, distinct per (worker, push): float64 sums of them are exact in any order."""
    return np.arange(SIZE, dtype=np.float64) + 100 * worker + 10_000 * k


def serve_and_push(ps_comm: MPI.Comm, n_servers: int, sleep_of) -> None:
    """The last `n_servers` ranks serve an ASGD vector in shards; the others push PUSHES times each,
    asking for the reply on odd pushes and fetching after even ones, sleeping `sleep_of(worker)`.
    Checks on the servers: every push applied once, w = w0 + all pushes; on the workers:
    a reply is the server's weights, which hold at least the worker's own pushes."""
    n_workers = ps_comm.Get_size() - n_servers
    workers = list(range(n_workers))
    shards = stage_shards(0, 1, n_servers, SIZE)
    w0 = -np.arange(SIZE, dtype=np.float64)
    me = ps_comm.Get_rank()
    if me >= n_workers:
        sh = shards[me - n_workers]
        server = ShardServer(ps_comm, sh, workers, AsgdServer(w0[sh.lo:sh.hi], n_workers))
        serve([server])
        assert server.applied == [PUSHES] * n_workers
        expected = w0 + sum(payload(m, k) for m in workers for k in range(PUSHES))
        np.testing.assert_array_equal(server.rule.w, expected[sh.lo:sh.hi])
        return
    client = PsClient(ps_comm, shards, [n_workers + i for i in range(n_servers)], SIZE, np.float64)
    own = w0.copy()
    for k in range(PUSHES):
        time.sleep(sleep_of(me))
        own += payload(me, k)
        reply = client.push(payload(me, k), k, 0.1, reply=k % 2 == 1)
        if reply is None:
            reply = client.fetch()
        assert np.all(reply >= own)  # payloads are positive: the server's sum includes at least ours
    client.finish(final=False)
    assert client.counters()["pushes"] == PUSHES * n_servers


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_every_push_is_applied_exactly_once_whatever_the_speeds():
    """One server, the other ranks as workers; worker 0 is slow: nobody waits for it."""
    ps_comm = comm.Dup()
    serve_and_push(ps_comm, 1, lambda m: 0.02 if m == 0 else 0.0)
    ps_comm.Free()


@pytest.mark.mpi(min_size=3)
@pytest.mark.timeout(60)
def test_sharded_servers_each_apply_their_slice():
    """Two servers hold the two halves of the vector; replies come back whole."""
    ps_comm = comm.Dup()
    serve_and_push(ps_comm, 2, lambda m: 0.005 * m)
    ps_comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_a_wrong_push_count_is_an_error():
    """A worker whose DONE claims a push the server never saw makes the server raise."""
    pair = comm.Split(0 if rank in (0, size - 1) else MPI.UNDEFINED, rank)
    if pair == MPI.COMM_NULL:
        return
    shard = Shard(0, 0, 0, SIZE, 0)
    if pair.Get_rank() == 1:
        server = ShardServer(pair, shard, [0], AsgdServer(np.zeros(SIZE), 1))
        with pytest.raises(ExactlyOnceError, match="worker 0 sent 2 pushes, the server applied 1"):
            serve([server])
    else:
        client = PsClient(pair, [shard], [1], SIZE, np.float64)
        client.push(payload(0, 0), 0, 0.1, reply=True)
        client.pushes += 1
        client.finish(final=False)
    pair.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_shared_window_is_one_vector_for_all_ranks():
    """Each rank writes its own element of the Hogwild! window; after the barrier all see every write."""
    shared = SharedVector(comm, np.zeros(size + 1))
    shared.vector[rank] += rank + 1.0
    shared.barrier()
    np.testing.assert_array_equal(shared.vector, [*range(1, size + 1), 0.0])
    shared.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_replica_checksum_catches_one_differing_element():
    arrays = [np.arange(6.0).reshape(2, 3), np.ones(4, np.float32)]
    check_replicas(comm, arrays, 1)
    if rank == 1:
        arrays[1][2] = np.nextafter(np.float32(1), np.float32(2))
    with pytest.raises(ReplicasDiverged, match=r"after step 2, replicas \[1\] of this stage differ"):
        check_replicas(comm, arrays, 2)

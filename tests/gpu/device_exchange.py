"""Two ranks exchange CuPy arrays through hpdl.comm.device's path (run under mpirun -n 2 by test_comm_device.py).

Every receive lands in a buffer filled with a sentinel first, and every array is written by
a kernel just before it is sent, so a missing stream synchronization or a copy read too
early shows up as wrong values. Prints `OK aware=<0|1>` on rank 0 when every check passed.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import cupy as cp
import numpy as np
from mpi4py import MPI

from hpdl.comm.collectives import BucketAllreduce
from hpdl.comm.device import default_stager
from hpdl.comm.p2p import PipeChannel
from hpdl.comm.wait import allreduce
from hpdl.ps.client import PsClient
from hpdl.ps.messages import HEADER_BYTES, PUSH, nbytes
from hpdl.ps.server import MESSAGE_TAG, REPLY_TAG
from hpdl.ps.shards import stage_shards

SENTINEL = -7.0
N = 1 << 22  # large enough that the kernel writing an array is still running when the send starts


def fill(buf, value: float) -> None:
    """Fill a receive buffer (pinned host or device) and make sure the fill has landed."""
    if isinstance(buf, np.ndarray):
        buf.fill(value)
    else:
        buf.fill(value)
        cp.cuda.get_current_stream().synchronize()


def expected(mb: int, n: int = N) -> cp.ndarray:
    return cp.arange(n, dtype=cp.float32) * 0.5 + mb


def pipeline(comm: MPI.Comm) -> None:
    """Activations 0 -> 1 (one of them not contiguous), gradients 1 -> 0, through PipeChannel."""
    rank = comm.Get_rank()
    channel = PipeChannel(comm, rank, 2, timeout=60, stager=default_stager())
    mbs = range(4)
    if rank == 1:
        handles = [channel.post_recv_act(mb, (N,), np.float32) for mb in mbs]
        for h in handles:
            fill(h.buffer, SENTINEL)
        comm.Barrier()  # nothing is sent before the buffers hold the sentinel
        for mb, h in zip(mbs, handles):
            x = channel.take(h, cp)
            assert isinstance(x, cp.ndarray)
            cp.testing.assert_array_equal(x, expected(mb))
            channel.send_grad(mb, x * 2 + 1)  # queued kernel, then at once the send
    else:
        grads = [channel.post_recv_grad(mb, (N,), np.float32) for mb in mbs]
        for h in grads:
            fill(h.buffer, SENTINEL)
        comm.Barrier()
        for mb in mbs:
            y = expected(mb) if mb != 2 else cp.stack([expected(mb), -expected(mb)], axis=1)[:, 0]
            channel.send_act(mb, y)
            del y  # the channel must keep the array alive until its copy is done
        for mb, h in zip(mbs, grads):
            cp.testing.assert_array_equal(channel.take(h, cp), expected(mb) * 2 + 1)
    channel.flush()


def reductions(comm: MPI.Comm) -> None:
    rank = comm.Get_rank()
    v = cp.arange(N, dtype=cp.float32) * (rank + 1)
    allreduce(comm, v)
    cp.testing.assert_array_equal(v, cp.arange(N, dtype=cp.float32) * 3)

    sizes = [N // 4, 1000, N // 2]
    vector = cp.zeros(sum(sizes), dtype=cp.float32)
    offsets = np.cumsum([0] + sizes)
    flat = SimpleNamespace(views=[{"W": vector[offsets[i]:offsets[i + 1]]} for i in range(3)],
                           stats=vector[:0], vector=vector)
    reducer = BucketAllreduce(comm, flat, bucket_bytes=4096)
    for i in reversed(range(3)):  # backward: each layer's gradient written just before it is done
        flat.views[i]["W"][...] = cp.arange(sizes[i], dtype=cp.float32) + 10 * i + rank
        reducer.layer_done(i)
    reducer.wait()
    for i in range(3):
        cp.testing.assert_array_equal(flat.views[i]["W"], 2 * (cp.arange(sizes[i], dtype=cp.float32) + 10 * i) + 1)


def parameter_server(comm: MPI.Comm) -> None:
    """Rank 1 pushes a device payload to rank 0, a bare server that answers with its own numbers."""
    n = 1 << 20
    if comm.Get_rank() == 1:
        client = PsClient(comm, stage_shards(0, 1, 1, n), [0], n, np.float32, stager=default_stager())
        reply = client.push(cp.arange(n, dtype=cp.float32) * 3, step=0, lr=0.5, reply=True)
        assert isinstance(reply, cp.ndarray)
        cp.testing.assert_array_equal(reply, cp.arange(n, dtype=cp.float32) - 1)
        client._reuse()
    else:
        raw = np.full(nbytes(n, np.float32), 255, np.uint8)
        comm.Recv(raw, source=1, tag=MESSAGE_TAG)
        assert raw[:HEADER_BYTES].view(np.int64)[0] == PUSH
        np.testing.assert_array_equal(raw[HEADER_BYTES:].view(np.float32), np.arange(n, dtype=np.float32) * 3)
        comm.Send(np.arange(n, dtype=np.float32) - 1, dest=1, tag=REPLY_TAG)


def main() -> int:
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2:
        print("run with mpirun -n 2", file=sys.stderr)
        return 2
    cp.cuda.Device(comm.Get_rank() % cp.cuda.runtime.getDeviceCount()).use()
    pipeline(comm)
    reductions(comm)
    parameter_server(comm)
    comm.Barrier()
    if comm.Get_rank() == 0:
        print(f"OK aware={int(default_stager().aware)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Collective weight transfer: learner rank 0 broadcasts the policy, bucket by bucket, to every engine worker.

The sync group is a process group of its own (not the learners' DeepSpeed group, not vLLM's): rank 0 is learner
rank 0, ranks 1.. are the engine workers (every tensor-parallel shard of every RolloutWorker). gloo on CPU, NCCL
on GPU; rendezvous through a TCPStore that rank 0 hosts, with a timeout on the rendezvous and on every transfer,
so a peer that never joins or stops answering makes every member raise instead of hang.

Both sides derive the same buckets from one layout (name, shape, dtype per parameter, in `named_parameters`
order) and a bucket size: a bucket is one flat byte buffer of consecutive parameters of one dtype, sent in the
training dtype (a bf16 policy travels as bf16). The sender packs one bucket at a time (under ZeRO-3 it gathers
just that bucket's parameters) and sends it while it gathers the next; a receiver pulls buckets in a thread, a
couple ahead, and yields (name, tensor) views of each, which vLLM's `reload_weights` consumes as its weights
iterator: the transfer overlaps the loading, and neither side ever holds a second copy of the whole model.

Ordering on GPUs (issue 26): a collective's `wait()` without a timeout only makes the *calling thread's* current
stream wait, so a consumer reading on any other stream is not ordered after the write (jobs/gpu_weight_transfer_check.py
caught it: 23 of 24 buckets read early), and a CPU that never blocks packs every bucket before the first has landed. So every wait here blocks the CPU, with the group's timeout, until the bucket is in
memory (then any stream reads it): the receiver hands a bucket to the consumer only after it arrived, and the
sender has at most two buckets alive. An NCCL group is made with TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (abort the
communicator, keep the process): a sync that times out fails the sync, not the learner or the engine.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

Layout = list[tuple[str, tuple[int, ...], str]]  # (name, shape, dtype name) per parameter


@dataclass(frozen=True)
class GroupSpec:
    """Where and how to form one sync group; `generation` names it (a new one after any member changed)."""
    generation: int
    host: str
    port: int
    world_size: int
    backend: str                # "gloo" | "nccl"
    timeout_s: float
    bucket_bytes: int
    layout: tuple               # Layout as a tuple (hashable, msgpack-friendly once listed)


def to_wire(t: torch.Tensor):
    """A CPU tensor as the numpy array the object-store path ships, in its own dtype: bf16, which numpy lacks, as its
    bits in an int16 array (no weight is int16, so `from_wire` knows to view it back). No copy where the tensor is
    contiguous."""
    return (t.contiguous().view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def from_wire(array) -> torch.Tensor:
    """The tensor `to_wire` shipped (sharing the array's memory)."""
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if t.dtype == torch.int16 else t


def layout_of(named: list[tuple[str, torch.Tensor]]) -> Layout:
    """The layout of (name, parameter) pairs; ZeRO-3 parameters report their full shape (`ds_shape`)."""
    return [(name, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype).removeprefix("torch.")) for name, p in named]


def _nbytes(shape, dtype: str) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def layout_bytes(layout) -> int:
    return sum(_nbytes(shape, dtype) for _, shape, dtype in layout)


def plan_buckets(layout: Layout, bucket_bytes: int) -> list[list[int]]:
    """Consecutive parameter indices per bucket: one dtype per bucket, at most `bucket_bytes` unless a single
    parameter is larger (it goes alone)."""
    buckets: list[list[int]] = []
    size, dtype = 0, None
    for i, (_, shape, dt) in enumerate(layout):
        n = _nbytes(shape, dt)
        if not buckets or dt != dtype or size + n > bucket_bytes:
            buckets.append([])
            size, dtype = 0, dt
        buckets[-1].append(i)
        size += n
    return buckets


def open_group(spec: GroupSpec, rank: int):
    """Join the sync group as `rank` (0 hosts the store). Raises after `spec.timeout_s` if a member is missing."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=spec.timeout_s)
    store = dist.TCPStore(spec.host, spec.port, spec.world_size, rank == 0, timeout=timeout)
    prefixed = dist.PrefixStore(f"rlaif-sync-{spec.generation}", store)
    if spec.backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        with _environ(TORCH_NCCL_ASYNC_ERROR_HANDLING="2"):  # read when the group is made: this group only
            group = dist.ProcessGroupNCCL(prefixed, rank, spec.world_size, options)
    else:
        group = dist.ProcessGroupGloo(prefixed, rank, spec.world_size, timeout)
    return SyncGroup(group, store, spec, rank)


@contextlib.contextmanager
def _environ(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_landed(work, buffer: torch.Tensor, timeout: datetime.timedelta) -> None:
    """Block this thread until `work` (a collective on `buffer`) has finished writing it, or raise after `timeout`.
    NCCL's wait(timeout) blocks the CPU until the kernel is done; gloo's leaves the copy back to a CUDA buffer on the
    current stream, which the synchronize then waits out. Afterwards any stream of any thread reads the bucket."""
    work.wait(timeout)
    if buffer.is_cuda:
        torch.cuda.current_stream(buffer.device).synchronize()


class SyncGroup:
    """One member's handle on a formed sync group (the store is kept alive with it)."""

    def __init__(self, group, store, spec: GroupSpec, rank: int):
        self.group, self.store, self.spec, self.rank = group, store, spec, rank
        self.wait_seconds = 0.0  # of the last `receive`: time spent in the broadcasts (the rest is the consumer's)

    def _broadcast(self, buffer: torch.Tensor):
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return self.group.broadcast([buffer], opts)

    def send(self, buckets: Iterator[list[torch.Tensor]], device) -> int:
        """Rank 0: broadcast every bucket (full parameters, one bucket at a time from `buckets`). Each bucket is
        packed into one byte buffer, which is sent while the next bucket is gathered and packed; the previous
        broadcast is waited out (CPU-blocking, with the timeout) before the next starts, so at most two buffers are
        alive. Returns the bytes sent."""
        timeout = datetime.timedelta(seconds=self.spec.timeout_s)
        sent, in_flight = 0, None
        for tensors in buckets:
            flat = [t.detach().reshape(-1).view(torch.uint8) for t in tensors]
            buffer = torch.cat(flat).to(device) if len(flat) > 1 else flat[0].to(device).clone()
            if in_flight is not None:
                wait_landed(*in_flight, timeout)
            in_flight = (self._broadcast(buffer), buffer)
            sent += buffer.numel()
        if in_flight is not None:
            wait_landed(*in_flight, timeout)
        return sent

    def receive(self, device, prefetch: int = 2) -> Iterator[tuple[str, torch.Tensor]]:
        """Every other rank: (name, tensor) for each parameter of the layout. A thread receives the buckets in
        order, up to `prefetch` ahead of the consumer, so the transfer overlaps the engine's loading; a bucket is
        handed over only once it has landed (`wait_landed`), so the consumer may read it on any stream. An error in
        the transfer (a timeout, a peer gone) is raised here."""
        import queue
        import threading

        layout = [(n, tuple(s), d) for n, s, d in self.spec.layout]
        plan = plan_buckets(layout, self.spec.bucket_bytes)
        ready: queue.Queue = queue.Queue(maxsize=prefetch)
        timeout = datetime.timedelta(seconds=self.spec.timeout_s)
        self.wait_seconds = 0.0

        def pull():
            try:
                for bucket in plan:
                    sizes = [_nbytes(layout[i][1], layout[i][2]) for i in bucket]
                    buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
                    wait_landed(self._broadcast(buffer), buffer, timeout)
                    ready.put((bucket, sizes, buffer))
            except BaseException as err:  # handed to the consumer
                ready.put(err)

        thread = threading.Thread(target=pull, name="rlaif-sync-receive", daemon=True)
        thread.start()
        for _ in plan:
            t0 = time.perf_counter()
            item = ready.get()
            self.wait_seconds += time.perf_counter() - t0
            if isinstance(item, BaseException):
                raise item
            bucket, sizes, buffer = item
            offset = 0
            for i, n in zip(bucket, sizes):
                name, shape, dtype = layout[i]
                yield name, buffer[offset:offset + n].view(getattr(torch, dtype)).view(shape)
                offset += n
        thread.join()

    def close(self) -> None:
        """Release the group; a broken NCCL group (a member gone, a timeout) is aborted, not shut down (a shutdown
        would wait for the collective that never finishes)."""
        try:
            if self.spec.backend == "nccl":
                self.group.abort()
            else:
                self.group.shutdown()
        except Exception:  # a broken group (a member gone) may not shut down cleanly; dropping it is enough
            pass

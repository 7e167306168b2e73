"""Collective weight transfer: learner rank 0 broadcasts the policy, bucket by bucket, to every engine worker.

The sync group is a process group of its own (not the learners' DeepSpeed group, not vLLM's): rank 0 is learner
rank 0, ranks 1.. are the engine workers (every tensor-parallel shard of every RolloutWorker). gloo on CPU, NCCL
on GPU; rendezvous through a TCPStore that rank 0 hosts, with a timeout on the rendezvous and on every transfer,
so a peer that never joins or stops answering makes every member raise instead of hang.

Both sides derive the same buckets from one layout (name, shape, dtype per parameter, in `named_parameters`
order) and a bucket size: a bucket is one flat byte buffer of consecutive parameters of one dtype, sent in the
training dtype (a bf16 policy travels as bf16). The sender packs one bucket at a time (under ZeRO-3 it gathers
just that bucket's parameters); a receiver yields (name, tensor) views of each bucket as it arrives, which vLLM's
`reload_weights` consumes as its weights iterator, so neither side ever holds a second copy of the whole model.
"""
from __future__ import annotations

import datetime
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
        group = dist.ProcessGroupNCCL(prefixed, rank, spec.world_size, options)
    else:
        group = dist.ProcessGroupGloo(prefixed, rank, spec.world_size, timeout)
    return SyncGroup(group, store, spec, rank)


class SyncGroup:
    """One member's handle on a formed sync group (the store is kept alive with it)."""

    def __init__(self, group, store, spec: GroupSpec, rank: int):
        self.group, self.store, self.spec, self.rank = group, store, spec, rank

    def _broadcast(self, buffer: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([buffer], opts).wait()

    def send_bucket(self, tensors: list[torch.Tensor], device) -> int:
        """Rank 0: pack `tensors` (one bucket, full parameters) into one byte buffer and broadcast it."""
        flat = [t.detach().reshape(-1).view(torch.uint8) for t in tensors]
        buffer = torch.cat(flat).to(device) if len(flat) > 1 else flat[0].to(device)
        self._broadcast(buffer)
        return buffer.numel()

    def receive(self, device) -> Iterator[tuple[str, torch.Tensor]]:
        """Every other rank: (name, tensor) for each parameter of the layout, one bucket received at a time."""
        layout = [(n, tuple(s), d) for n, s, d in self.spec.layout]
        for bucket in plan_buckets(layout, self.spec.bucket_bytes):
            sizes = [_nbytes(layout[i][1], layout[i][2]) for i in bucket]
            buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
            self._broadcast(buffer)
            offset = 0
            for i, n in zip(bucket, sizes):
                name, shape, dtype = layout[i]
                yield name, buffer[offset:offset + n].view(getattr(torch, dtype)).view(shape)
                offset += n

    def close(self) -> None:
        try:
            self.group.shutdown()
        except Exception:  # a broken group (a member gone) may not shut down cleanly; dropping it is enough
            pass

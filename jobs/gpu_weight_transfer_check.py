"""The collective weight path (rlaif_ray.weight_transfer) between two processes on one GPU, read the way vLLM reads
it: no Ray, no vLLM, no network (a GPU host with torch is enough).

Rank 0 sends `--buckets` buckets of `--bucket-mb` MB each (CUDA tensors whose every byte is known from its bucket and
position); rank 1 receives them with `SyncGroup.receive` and, as vLLM's worker does, reads every tensor at once on a
CUDA stream of its own, comparing it with what was sent. A receive that hands a buffer over before the bytes have
landed shows as mismatched tensors. gloo carries the CUDA tensors (NCCL refuses two ranks on one GPU: "Duplicate GPU
detected"); its broadcast copies the bytes back to the GPU on a stream of its own, as NCCL writes on its own stream.

    python jobs/gpu_weight_transfer_check.py                           # this tree's weight_transfer.py
    python jobs/gpu_weight_transfer_check.py --module old_wt.py        # another version of the module (e.g. git show)

On a machine without a GPU it runs the same exchange on CPU tensors (the script's own test). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_module(path: str | None):
    if path is None:
        from rlaif_ray import weight_transfer
        return weight_transfer
    spec = importlib.util.spec_from_file_location("weight_transfer_under_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def layout_for(args) -> list:
    """`buckets` parameters of bucket size each (fp32), so every bucket holds exactly one parameter."""
    n = int(args.bucket_mb * 2 ** 20) // 4
    return [(f"w{i}", (n,), "float32") for i in range(args.buckets)]


def content(i: int, n: int, device, round_: int) -> torch.Tensor:
    """What bucket i holds in round `round_`: distinct per bucket, per position and per round."""
    return torch.arange(n, device=device, dtype=torch.float32).mul_(1e-3).add_(i * 1000.0 + round_ * 1e6)


def member(rank: int, args, port: int, out_path: str) -> None:
    wt = load_module(args.module)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    layout = layout_for(args)
    spec = wt.GroupSpec(generation=1, host="127.0.0.1", port=port, world_size=2, backend="gloo", timeout_s=120.0,
                        bucket_bytes=int(args.bucket_mb * 2 ** 20), layout=tuple(layout))
    group = wt.open_group(spec, rank)
    result = {"rank": rank, "mismatched": 0, "tensors": 0, "seconds": 0.0, "bytes": 0}
    consumer = torch.cuda.Stream(device) if device.type == "cuda" else None
    for round_ in range(args.rounds):
        t0 = time.perf_counter()
        if rank == 0:
            buckets = ([content(i, shape[0], device, round_)] for i, (_, shape, _) in enumerate(layout))
            result["bytes"] += group.send(buckets, device)
        else:
            for i, (name, tensor) in enumerate(group.receive(device)):
                # read at once on the consumer's own stream, as vLLM's worker copies weights on its own stream
                if consumer is not None:
                    with torch.cuda.stream(consumer):
                        same = torch.equal(tensor, content(i, tensor.numel(), device, round_))
                else:
                    same = torch.equal(tensor, content(i, tensor.numel(), device, round_))
                result["mismatched"] += int(not same)
                result["tensors"] += 1
                result["bytes"] += tensor.numel() * 4
        if device.type == "cuda":
            torch.cuda.synchronize()
        result["seconds"] += time.perf_counter() - t0
    if device.type == "cuda":
        result["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    group.close()
    Path(out_path).write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", help="a weight_transfer.py to check instead of this tree's")
    ap.add_argument("--bucket-mb", type=float, default=256.0)
    ap.add_argument("--buckets", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    import tempfile
    folder = tempfile.mkdtemp(prefix="wt-check-")
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=member, args=(rank, args, port, os.path.join(folder, f"{rank}.json")))
             for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    results = [json.loads(Path(folder, f"{r}.json").read_text()) if Path(folder, f"{r}.json").exists() else None
               for r in (0, 1)]
    receiver = results[1] or {}
    summary = {
        "module": args.module or "rlaif_ray/weight_transfer.py",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "bucket_mb": args.bucket_mb, "buckets": args.buckets, "rounds": args.rounds,
        "exit_codes": [p.exitcode for p in procs],
        "tensors_read": receiver.get("tensors"), "mismatched": receiver.get("mismatched"),
        "receive_gb_per_s": (receiver.get("bytes", 0) / 1e9 / receiver["seconds"]) if receiver.get("seconds") else None,
        "peak_gb": {"sender": (results[0] or {}).get("peak_gb"), "receiver": receiver.get("peak_gb")},
    }
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()

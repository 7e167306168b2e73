"""Weight-sync benchmark: a ~100M-parameter policy (Llama architecture, random weights, built from a config
here) synced from real DeepSpeed learner ranks to a real vLLM RolloutWorker by both paths, side by side in one
run: `object_store` (rank 0 puts one array per parameter in Ray's object store, the engine maps them and loads)
and `collective` (rank 0 broadcasts buckets over a gloo sync group, the engine loads each bucket as it arrives).
Per sync: seconds end to end (the sync sent -> the engine holds the version), GB/s, the share spent in vLLM's own
weight loading, and the peak host memory the learner ranks add during the sync (RSS sampled every 5 ms).
Writes OUT/weight_sync.json.

    python jobs/weight_sync_bench.py --out runs/bench [--hidden 1024 --layers 8 --repeats 6 --learners 2
                                                       --zero 3] [overrides...]
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def build_model(folder: Path, tokenizer_from: str, hidden: int, layers: int, dtype: str) -> int:
    """A Llama model of about 12.8 * hidden^2 * layers parameters, random weights, saved as HF."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False, torch_dtype=dtype)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


class PeakRss:
    """Peak resident memory above the starting level of some processes (this machine's /proc), sampled in a thread."""

    def __init__(self, pids: list[int]):
        import threading
        self.pids, self.base = pids, [self._rss(p) for p in pids]
        self.peak = list(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def _rss(pid: int) -> int:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = [max(p, self._rss(pid)) for p, pid in zip(self.peak, self.pids)]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def added(self) -> list[int]:
        return [p - b for p, b in zip(self.peak, self.base)]


def main(argv=None) -> int:
    import ray

    from rlaif_ray.config import ConfigError, load_config
    from rlaif_ray.engine import engine_env
    from rlaif_ray.runtime.driver import start_ray
    from rlaif_ray.runtime.inputs import resolve_inputs
    from rlaif_ray.runtime.learner_group import LearnerGroup
    from rlaif_ray.runtime.pool import ActorPool
    from rlaif_ray.runtime.weight_sync import WeightSync
    from rlaif_ray.stages.rollout import RolloutWorker

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", default="jobs/configs/toy_cpu.yaml")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--learners", type=int, default=2)
    parser.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3])
    parser.add_argument("--bucket-mb", type=float, default=64)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between syncs (a training step)")
    parser.add_argument("--warmup", type=int, default=2, help="syncs left out (they touch fresh store pages)")
    args, overrides = parser.parse_known_args(argv)  # overrides anywhere on the line
    try:
        base = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"weight_sync_bench: error: {err}", file=sys.stderr)
        return 2
    toy = resolve_inputs(base)  # the toy tokenizer (built if needed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="rlaif-sync-") as tmp:
        folder = Path(tmp) / "policy"
        params = build_model(folder, toy.policy, args.hidden, args.layers, base.model.dtype)
        print(f"[sync] model: {params / 1e6:.1f}M parameters, {params * 4 / 1e9:.2f} GB in fp32; "
              f"{args.learners} learner rank(s), ZeRO-{args.zero}", flush=True)
        cfg = load_config(args.config, [*overrides, f"model.policy={folder}", f"learner.num_learners={args.learners}",
                                        f"learner.zero_stage={args.zero}", f"sync.bucket_mb={args.bucket_mb}"])
        start_ray(cfg)
        from ray.util.placement_group import placement_group, remove_placement_group
        pg = placement_group([{"CPU": cfg.learner.cpus_per_learner}] * args.learners, strategy="PACK")
        ray.get(pg.ready())
        worker = RolloutWorker.options(num_cpus=cfg.rollout.cpus_per_worker,
                                       runtime_env={"env_vars": engine_env(cfg.engine_for("rollout"))}).remote(str(folder), cfg.model_dump())
        learners = LearnerGroup(str(folder), cfg, pg)
        ray.get(worker.ready.remote())
        pids = ray.get([r.__ray_call__.remote(lambda self: __import__("os").getpid()) for r in learners.ranks])
        version = 0
        try:
            for method in ("object_store", "collective"):
                sync = WeightSync(cfg.model_copy(update={"sync": cfg.sync.model_copy(update={"method": method})}),
                                  learners, ActorPool([worker], "rollout"), {"events": []})
                rows = []
                for _ in range(args.repeats):
                    version += 1
                    with PeakRss(pids) as rss:
                        t0 = time.perf_counter()
                        (receipt,), _ = sync.finish(sync.send(version), version)
                        total = time.perf_counter() - t0
                    load = receipt["load_seconds"] if method == "collective" else receipt["sync_seconds"]
                    rows.append({"total_seconds": total, "engine_seconds": receipt["sync_seconds"],
                                 "load_seconds": load, "bytes": receipt["sync_bytes"],
                                 "learner_rss_added": rss.added()})
                    print(f"[sync] {method} v{version}: {total:.3f} s = {receipt['sync_bytes'] / total / 1e9:.2f} GB/s "
                          f"end to end; engine {receipt['sync_seconds']:.3f} s, of which vLLM loading {load:.3f} s; "
                          f"learner RSS +{', +'.join(f'{b / 1e6:.0f}' for b in rss.added())} MB", flush=True)
                    time.sleep(args.interval)  # a training step between syncs (store pages released and reused)
                measured = rows[args.warmup:] if len(rows) > args.warmup else rows
                mean = {k: sum(r[k] for r in measured) / len(measured) for k in
                        ("total_seconds", "engine_seconds", "load_seconds", "bytes")}
                results[method] = {"repeats": rows, "mean_seconds": mean["total_seconds"],
                                   "gb_per_s_end_to_end": mean["bytes"] / mean["total_seconds"] / 1e9,
                                   "vllm_load_share": mean["load_seconds"] / mean["total_seconds"],
                                   "learner_rss_added_mb_max": [max(r["learner_rss_added"][k] for r in measured) / 1e6
                                                                for k in range(args.learners)]}
        finally:
            for actor in [worker, *learners.ranks]:
                ray.kill(actor)
            remove_placement_group(pg)
    nbytes = results["collective"]["repeats"][0]["bytes"]
    print(f"\nweight sync of {params / 1e6:.0f}M fp32 parameters ({nbytes / 1e9:.2f} GB), {args.learners} rank(s) "
          f"ZeRO-{args.zero}, mean of {max(1, args.repeats - args.warmup)} syncs after {args.warmup} warm-up:")
    print(f"{'path':<14}{'s/sync':>8}{'GB/s':>7}{'vLLM load':>11}  learner RSS added (MB, per rank)")
    for method, r in results.items():
        print(f"{method:<14}{r['mean_seconds']:>8.3f}{r['gb_per_s_end_to_end']:>7.2f}{r['vllm_load_share']:>10.0%}  "
              + ", ".join(f"{m:.0f}" for m in r["learner_rss_added_mb_max"]))
    speedup = results["object_store"]["mean_seconds"] / results["collective"]["mean_seconds"]
    print(f"collective / object store: {speedup:.2f}x faster")
    (out / "weight_sync.json").write_text(json.dumps({"parameters": params, "bytes": nbytes, "learners": args.learners,
                                                     "zero_stage": args.zero, "bucket_mb": args.bucket_mb,
                                                     "methods": results, "speedup": speedup}, indent=1))
    print(f"written: {out / 'weight_sync.json'}")
    return 0


if __name__ == "__main__":  # vLLM on CPU spawns processes: keep the guard
    sys.exit(main())

"""Weight-sync benchmark: a ~100M-parameter policy (Llama architecture, random weights, built from a config
here) synced from a real DeepSpeed learner rank to a real vLLM RolloutWorker through the object store, the
path every training step takes. Prints seconds and GB/s per sync, split into export (rank 0 returns its
parameters, one array each, which Ray copies into the object store) and transfer + load (the worker maps
them zero-copy and vLLM loads them into the engine), and writes OUT/weight_sync.json.

    python jobs/weight_sync_bench.py --out runs/bench [--hidden 1024 --layers 8 --repeats 5] [overrides...]
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


def main(argv=None) -> int:
    import ray

    from rlaif_ray.config import ConfigError, load_config
    from rlaif_ray.engine import engine_env
    from rlaif_ray.runtime.driver import start_ray
    from rlaif_ray.runtime.inputs import resolve_inputs
    from rlaif_ray.runtime.learner_group import LearnerGroup
    from rlaif_ray.stages.rollout import RolloutWorker

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", default="jobs/configs/toy_cpu.yaml")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between syncs (a training step)")
    parser.add_argument("--warmup", type=int, default=2, help="syncs left out (they touch fresh store pages)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        base = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"weight_sync_bench: error: {err}", file=sys.stderr)
        return 2
    toy = resolve_inputs(base)  # the toy tokenizer (built if needed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rlaif-sync-") as tmp:
        folder = Path(tmp) / "policy"
        params = build_model(folder, toy.policy, args.hidden, args.layers, base.model.dtype)
        print(f"[sync] model: {params / 1e6:.1f}M parameters, {params * 4 / 1e9:.2f} GB in fp32", flush=True)
        cfg = load_config(args.config, [*args.overrides, f"model.policy={folder}", "learner.num_learners=1",
                                        "learner.zero_stage=0"])
        start_ray(cfg)
        from ray.util.placement_group import placement_group, remove_placement_group
        pg = placement_group([{"CPU": cfg.learner.cpus_per_learner}], strategy="PACK")
        ray.get(pg.ready())
        worker = RolloutWorker.options(num_cpus=cfg.rollout.cpus_per_worker,
                                       runtime_env={"env_vars": engine_env(cfg.vllm)}).remote(str(folder), cfg.model_dump())
        learners = LearnerGroup(str(folder), cfg, pg)
        ray.get(worker.ready.remote())
        rows = []
        try:
            for version in range(1, args.repeats + 1):
                t0 = time.perf_counter()
                ref = learners.export_weights()       # rank 0's arrays are in the object store when this returns
                t1 = time.perf_counter()
                stats = ray.get(worker.update_weights.remote(ref, version))
                t2 = time.perf_counter()
                del ref  # as in the loop: the previous version's object is released before the next export,
                time.sleep(args.interval)  # which comes a training step later and reuses its warm store pages
                rows.append({"export_seconds": t1 - t0, "transfer_load_seconds": t2 - t1,
                             "engine_load_seconds": stats["sync_seconds"], "total_seconds": t2 - t0,
                             "bytes": stats["sync_bytes"]})
                print(f"[sync] {version}: export {t1 - t0:.3f} s, transfer+load {t2 - t1:.3f} s "
                      f"({stats['sync_bytes'] / (t2 - t0) / 1e9:.2f} GB/s end to end)", flush=True)
        finally:
            for actor in [worker, *learners.ranks]:
                ray.kill(actor)
            remove_placement_group(pg)
    measured = rows[args.warmup:] if len(rows) > args.warmup else rows
    mean = {k: sum(r[k] for r in measured) / len(measured) for k in rows[0]}
    result = {"parameters": params, "dtype": "float32", "bytes": mean["bytes"], "repeats": rows,
              "mean_seconds": {k: v for k, v in mean.items() if k != "bytes"},
              "gb_per_s_end_to_end": mean["bytes"] / mean["total_seconds"] / 1e9,
              "gb_per_s_export": mean["bytes"] / mean["export_seconds"] / 1e9,
              "gb_per_s_transfer_load": mean["bytes"] / mean["transfer_load_seconds"] / 1e9}
    print(f"weight sync of {params / 1e6:.0f}M fp32 parameters ({mean['bytes'] / 1e9:.2f} GB), mean of "
          f"{len(measured)} syncs after {args.warmup} warm-up syncs: {mean['total_seconds']:.3f} s = "
          f"{result['gb_per_s_end_to_end']:.2f} GB/s end to end (export {result['gb_per_s_export']:.2f} GB/s, "
          f"transfer + engine load {result['gb_per_s_transfer_load']:.2f} GB/s)")
    (out / "weight_sync.json").write_text(json.dumps(result, indent=1))
    print(f"written: {out / 'weight_sync.json'}")
    return 0


if __name__ == "__main__":  # vLLM on CPU spawns processes: keep the guard
    sys.exit(main())

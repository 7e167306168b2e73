"""Throughput benchmark: the same config and seed run in sync and then async mode on one Ray cluster,
figures printed side by side and written as JSON (compare across commits).

    python jobs/benchmark.py -c jobs/configs/toy_cpu.yaml loop.num_steps=60 --out runs/bench

Also a Ray job: `ray job submit --working-dir . -- python jobs/benchmark.py -c ... ray.address=auto`.
"""
import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    from rlaif_ray.benchmark import compare, format_table, run_figures
    from rlaif_ray.config import ConfigError, load_config
    from rlaif_ray.loop import train
    from rlaif_ray.metrics import read_jsonl

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", default="jobs/configs/toy_cpu.yaml")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the figures")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        base = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"benchmark: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    figures = {}
    for mode in ("sync", "async"):
        cfg = base.model_copy(deep=True)
        cfg.loop.mode = mode
        cfg.loop.max_inflight = 0 if mode == "sync" else max(1, base.loop.max_inflight)
        cfg.output.run_dir = str(out / mode)
        cfg.output.progress = False
        cfg.output.save_checkpoint = False
        summary = train(cfg)
        figures[mode] = {**run_figures(read_jsonl(out / mode / "metrics.jsonl"), args.warmup),
                         "startup_seconds": summary["startup_seconds"]}
        print(f"[benchmark] {mode}: {figures[mode]['samples_per_s']:.1f} samples/s", flush=True)
    cmp = compare(figures["sync"], figures["async"])
    print(format_table(figures["sync"], figures["async"], cmp))
    result = {"config": args.config, "overrides": args.overrides, **figures, "comparison": cmp}
    (out / "benchmark.json").write_text(json.dumps(result, indent=1))
    print(f"written: {out / 'benchmark.json'}")
    return 0


if __name__ == "__main__":  # vLLM on CPU spawns processes: keep the guard
    sys.exit(main())

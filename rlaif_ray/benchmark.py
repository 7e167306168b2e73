"""Side-by-side throughput figures for async vs sync runs of one config (used by jobs/benchmark.py).

From each run's metrics.jsonl (first `warmup` steps left out):
- samples/s and tokens/s over the measured steps, and the async/sync ratio;
- the ideal overlap ratio from the sync run's stage times, (gen + label + reward + train + sync) / max(stage),
  and the fraction of it the async run achieved;
- weight sync seconds and GB/s; the staleness of the trained samples.
"""
from __future__ import annotations

from collections import Counter

STAGES = ("gen_seconds", "label_seconds", "reward_seconds", "train_seconds", "sync_seconds")


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else 0.0


def run_figures(rows: list[dict], warmup: int = 2) -> dict:
    measured = rows[warmup:] if len(rows) > warmup else rows
    wall = sum(r["step_seconds"] for r in measured)
    samples = sum(r["samples_in"] for r in measured)
    tokens = sum(r["gen_tokens"] for r in measured)
    sync_bytes = _mean(measured, "sync_bytes")
    sync_s = _mean(measured, "sync_seconds")
    return {
        "steps_measured": len(measured), "wall_seconds": wall,
        "samples_per_s": samples / wall if wall else 0.0, "tokens_per_s": tokens / wall if wall else 0.0,
        "stage_seconds": {k.removesuffix("_seconds"): _mean(measured, k) for k in STAGES},
        "step_seconds": wall / len(measured) if measured else 0.0,
        "sync_seconds": sync_s, "sync_bytes": sync_bytes,
        "sync_gb_per_s": sync_bytes / sync_s / 1e9 if sync_s else 0.0,
        "staleness_max_hist": dict(sorted(Counter(r["staleness_max"] for r in measured).items())),
    }


def compare(sync: dict, async_: dict) -> dict:
    stages = sync["stage_seconds"]
    total, slowest = sum(stages.values()), max(stages.values())
    ideal = total / slowest if slowest else 0.0
    speedup = async_["samples_per_s"] / sync["samples_per_s"] if sync["samples_per_s"] else 0.0
    return {"async_over_sync": speedup, "ideal_overlap_ratio": ideal,
            "achieved_fraction_of_ideal": speedup / ideal if ideal else 0.0,
            "bottleneck_stage": max(stages, key=stages.get)}


def format_table(sync: dict, async_: dict, cmp: dict) -> str:
    lines = [f"{'':32s}{'sync':>12s}{'async':>12s}"]
    for key, label in [("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s"), ("step_seconds", "seconds/step"),
                       ("sync_seconds", "weight sync s"), ("sync_gb_per_s", "weight sync GB/s")]:
        lines.append(f"{label:32s}{sync[key]:12.3f}{async_[key]:12.3f}")
    for stage in sync["stage_seconds"]:
        lines.append(f"{'stage ' + stage + ' s/step':32s}{sync['stage_seconds'][stage]:12.3f}{async_['stage_seconds'][stage]:12.3f}")
    lines.append(f"{'staleness (max per step) hist':32s}{str(sync['staleness_max_hist']):>12s}{str(async_['staleness_max_hist']):>12s}")
    lines += ["",
              f"async / sync samples/s:        {cmp['async_over_sync']:.2f}x",
              f"ideal overlap ratio (sync stage times): {cmp['ideal_overlap_ratio']:.2f}x  "
              f"(bottleneck: {cmp['bottleneck_stage']})",
              f"achieved fraction of ideal:    {cmp['achieved_fraction_of_ideal']:.0%}"]
    return "\n".join(lines)

"""Side-by-side throughput figures for async vs sync runs of one config (used by jobs/benchmark.py).

From each run's metrics.jsonl (first `warmup` steps left out):
- samples/s and tokens/s over the measured steps, and the async/sync ratio;
- the ideal overlap ratio from the sync run's stage times, (gen + label + reward + train + sync) / max(stage),
  and the fraction of it the async run achieved;
- weight sync seconds and GB/s; the staleness of the trained samples;
- queue depths (calls submitted to a stage and not finished, sampled when the learner takes a batch);
- Arrow transport: from Ray's task timeline, the time each stage call spent deserialising its input table
  (`task:deserialize_arguments`, which includes fetching it from the object store) and storing its output
  (`task:store_outputs`), per step, as a share of the step time;
- rollout efficiency: the engine's generation tokens/s inside the loop over the same engine config driven
  alone (measured separately by jobs/benchmark.py).
"""
from __future__ import annotations

import threading
from collections import Counter, defaultdict
from pathlib import Path

# the stage calls a batch goes through; a learner step is one call per rank
PIPELINE_TASKS = {"RolloutWorker.generate": "gen", "CriticLabeler.label": "label", "CriticLabeler.demonstrate": "gen",
                  "RewardScorer.score": "reward", "LearnerRank.train_step": "train"}
QUEUES = ("queue_gen", "queue_label", "queue_reward", "queue_ready")

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
        "queue_mean": {q: _mean(measured, q) for q in QUEUES if any(q in r for r in measured)},
        "queue_max": {q: max(r.get(q, 0) for r in measured) for q in QUEUES if any(q in r for r in measured)},
        "engine_tokens_per_s": (tokens / sum(r["engine_seconds"] for r in measured)
                                if all(r.get("engine_seconds") for r in measured) else None),
    }


def transport_from_timeline(events: list[dict], start_s: float, end_s: float) -> dict:
    """Per pipeline stage, from Ray's task timeline (`ray.timeline()`), between two wall-clock times: calls seen
    and the mean seconds per call spent deserialising arguments, executing, and storing outputs. A phase event
    belongs to the task event on the same worker that contains it."""
    lo, hi = start_s * 1e6, end_s * 1e6
    tasks: dict[str, list[tuple[float, float, str]]] = defaultdict(list)  # worker -> (start, end, stage)
    phases = []
    for e in events:
        if e.get("ph") != "X" or not lo <= e.get("ts", 0) <= hi:
            continue
        cat = e.get("cat", "")
        if cat.startswith("task::") and cat[6:] in PIPELINE_TASKS:
            tasks[e["tid"]].append((e["ts"], e["ts"] + e["dur"], PIPELINE_TASKS[cat[6:]]))
        elif cat in ("task:deserialize_arguments", "task:execute", "task:store_outputs"):
            phases.append(e)
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for stage_tasks in tasks.values():
        for _, _, stage in stage_tasks:
            sums[stage]["calls"] += 1
    for e in phases:
        for t0, t1, stage in tasks.get(e["tid"], ()):
            if t0 - 1 <= e["ts"] and e["ts"] + e["dur"] <= t1 + 1:
                sums[stage][e["cat"].split(":")[1]] += e["dur"] / 1e6
                break
    return {stage: {"calls": int(v["calls"]), **{f"{k}_s_per_call": v[k] / v["calls"]
                                                  for k in ("deserialize_arguments", "execute", "store_outputs")}}
            for stage, v in sums.items() if v["calls"]}


def transport_share(transport: dict, step_seconds: float, calls_per_step: dict[str, float]) -> float:
    """Seconds per step spent moving tables in and out of the stage calls, over the step time (an upper bound
    of the critical-path share: the stages run concurrently)."""
    per_step = sum((t["deserialize_arguments_s_per_call"] + t["store_outputs_s_per_call"]) * calls_per_step.get(stage, 1)
                   for stage, t in transport.items())
    return per_step / step_seconds if step_seconds else 0.0


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
    for stage in async_.get("busy_fraction", {}):
        lines.append(f"{'busy fraction ' + stage:32s}{sync.get('busy_fraction', {}).get(stage, 0):12.2f}"
                     f"{async_['busy_fraction'][stage]:12.2f}")
    for q in async_.get("queue_mean", {}):
        lines.append(f"{q + ' mean (max)':32s}{sync['queue_mean'].get(q, 0):7.2f} ({sync['queue_max'].get(q, 0)})"
                     f"{async_['queue_mean'][q]:7.2f} ({async_['queue_max'][q]})")
    for key, label in [("transport_share", "Arrow transport share of step"), ("engine_tokens_per_s", "engine tokens/s in loop")]:
        if async_.get(key) is not None:
            lines.append(f"{label:32s}{sync.get(key) or 0:12.3f}{async_[key]:12.3f}")
    lines += ["",
              f"async / sync samples/s:        {cmp['async_over_sync']:.2f}x",
              f"ideal overlap ratio (sync stage times): {cmp['ideal_overlap_ratio']:.2f}x  "
              f"(bottleneck: {cmp['bottleneck_stage']})",
              f"achieved fraction of ideal:    {cmp['achieved_fraction_of_ideal']:.0%}"]
    if cmp.get("rollout_efficiency") is not None:
        lines.append(f"rollout efficiency (engine tokens/s in the async loop / alone, {cmp['engine_alone_tokens_per_s']:.0f}"
                     f" tokens/s): {cmp['rollout_efficiency']:.2f}")
    return "\n".join(lines)


def format_flows(batch: dict, groups: dict) -> str:
    """Batch flow and group flow side by side (both async)."""
    lines = [f"{'':32s}{'batch flow':>12s}{'group flow':>12s}"]
    for key, label in [("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s"), ("step_seconds", "seconds/step")]:
        lines.append(f"{label:32s}{batch[key]:12.3f}{groups[key]:12.3f}")
    for stage in batch["stage_seconds"]:
        lines.append(f"{'stage ' + stage + ' s/step':32s}{batch['stage_seconds'][stage]:12.3f}"
                     f"{groups['stage_seconds'][stage]:12.3f}")
    lines.append(f"{'staleness (max per step) hist':32s}{str(batch['staleness_max_hist']):>12s}"
                 f"{str(groups['staleness_max_hist']):>12s}")
    for stage in groups.get("busy_fraction", {}):
        lines.append(f"{'busy fraction ' + stage:32s}{batch['busy_fraction'].get(stage, 0):12.2f}"
                     f"{groups['busy_fraction'][stage]:12.2f}")
    for q in groups.get("queue_mean", {}):
        lines.append(f"{q + ' mean':32s}{batch['queue_mean'].get(q, 0):12.2f}{groups['queue_mean'][q]:12.2f}")
    lines += ["", f"group flow / batch flow samples/s: {groups['samples_per_s'] / batch['samples_per_s']:.2f}x"]
    return "\n".join(lines)


class HostLoad:
    """How busy this machine's CPUs were while a run wrote its measured steps: a thread samples the CPU times
    (psutil) and the lines of the run's metrics.jsonl every `every` s. A simulation whose machine is near 100% busy
    measures the machine, not the loop (its stand-ins, Ray and the driver share the cores)."""

    def __init__(self, metrics: Path, every: float = 0.5):
        self.metrics, self.every, self.samples = metrics, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _lines(self) -> int:
        try:
            with open(self.metrics, "rb") as f:
                return sum(1 for _ in f)
        except OSError:
            return 0

    def _take_sample(self) -> None:
        import psutil

        times = psutil.cpu_times()
        self.samples.append((self._lines(), times.idle + getattr(times, "iowait", 0.0), sum(times)))

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._take_sample()
            self._stop.wait(self.every)

    def __enter__(self) -> "HostLoad":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._take_sample()  # the run's end, whatever the sampling's phase

    def busy_share(self, first: int, last: int) -> float | None:
        """The CPUs' busy share from the last sample taken before the run had written more than `first` step lines to
        the first one taken once it had written `last` (the measured steps, widened to whole sampling intervals: at a
        small time scale they may all fall inside one)."""
        start = next((s for s in reversed(self.samples) if s[0] <= first), None)
        end = next((s for s in self.samples if s[0] >= last), None)
        if start is None or end is None or end[2] <= start[2]:
            return None
        return 1.0 - (end[1] - start[1]) / (end[2] - start[2])

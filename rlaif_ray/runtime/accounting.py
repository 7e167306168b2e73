"""What the loop counts: one step's metrics line, assembled from the stage stats and the learner's result, and the
run's running tally (sample totals, judge counts, stage busy seconds; kept in checkpoints), from which the run
summary's figures come. The Orchestrator calls these; it holds no metric arithmetic of its own.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from rlaif_ray.judge.quality import judge_report

BATCH_JUDGE_RATES = ("first_slot_rate", "unparsable_share", "failed_share")  # logged per step when defined


def busy_fractions(busy: dict[str, float], wall: float, pool_sizes: dict[str, int]) -> dict[str, float]:
    """Share of the run's wall time each stage's actors spent working (1.0 = every actor always busy)."""
    return {stage: seconds / (wall * pool_sizes.get(stage, 1)) if wall > 0 else 0.0 for stage, seconds in busy.items()}


STAGE_LATENCY = {"gen": "gen_seconds", "label": "label_seconds", "reward": "reward_seconds"}
LOWEST = ("policy_version", "rm_version")  # a batch is as old as its oldest shard


def summed(key: str, value) -> bool:
    """Whether a stage stat adds up over shards (counts, seconds), unlike versions, the worker and flags."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and key not in LOWEST + ("worker",)


def merge_shard_stats(per_stage: dict[str, list[dict]], actors: dict[str, int]) -> dict:
    """One stats dict per stage from its shards' calls: counts summed, `busy_seconds` = the calls' seconds summed (actor
    time worked), the stage's seconds = what the step took of the stage: its slowest call, or its busy seconds spread
    over its `actors` where shards queue behind each other (more shards than actors); versions the oldest, `worker`
    the first shard's, `shards` how many. One shard: its stats as they are (+ busy_seconds, shards)."""
    merged = {}
    for stage, parts in per_stage.items():
        latency = STAGE_LATENCY[stage]
        out: dict = {}
        for part in parts:
            for key, value in part.items():
                if summed(key, value):
                    out[key] = out.get(key, 0) + value
        out["busy_seconds"] = sum(p[latency] for p in parts)
        out[latency] = max(max(p[latency] for p in parts), out["busy_seconds"] / max(actors.get(stage, 1), 1))
        out["shards"] = len(parts)
        for key in LOWEST:
            if key in parts[0]:
                out[key] = min(p[key] for p in parts)
        if "worker" in parts[0]:
            out["worker"] = parts[0]["worker"]
        if "judge_calls_per_sample" in out:
            out["judge_calls_per_sample"] = out.get("judge_calls", 0) / max(out.get("labeled_samples", 0), 1)
        merged[stage] = out
    return merged


@dataclass
class Tally:
    """Running counts of a run; `state()` goes into checkpoints and `Tally.resumed(state)` takes it back."""
    totals: dict = field(default_factory=lambda: {"generated": 0, "trained": 0, "dropped_stale": 0, "skipped": 0})
    judge_counts: defaultdict = field(default_factory=lambda: defaultdict(float))  # summed labeler stats
    busy: defaultdict = field(default_factory=lambda: defaultdict(float))          # stage -> seconds its actors worked
    wall_before: float = 0.0                                                        # wall seconds before a resume

    @classmethod
    def resumed(cls, state: dict) -> "Tally":
        tally = cls(wall_before=state.get("wall_seconds", 0.0))
        if "totals" in state:
            tally.totals = state["totals"]
        tally.judge_counts.update(state.get("judge_counts", {}))
        tally.busy.update(state.get("busy", {}))
        return tally

    def add(self, stats: dict, metrics: dict) -> None:
        """Count one trained batch: its stage stats (`gen`, and `label`/`reward` unless sft) and learner metrics."""
        for key in ("trained", "dropped_stale", "skipped"):
            self.totals[key] += metrics[key]
        self.totals["generated"] += stats["gen"]["gen_samples"]
        if not metrics.get("optimizer_step", 1):  # ppo: no prompt group's rewards differed, no update was made
            self.totals["no_signal_steps"] = self.totals.get("no_signal_steps", 0) + 1
        self.busy["gen"] += stats["gen"].get("busy_seconds", stats["gen"]["gen_seconds"])
        self.busy["train"] += metrics["train_seconds"]
        if stats.get("label"):
            self.add_labels(stats["label"])
        if "reward" in stats:
            self.busy["reward"] += stats["reward"].get("busy_seconds", stats["reward"]["reward_seconds"])

    def add_labels(self, label: dict) -> None:
        """Count one labelling call's stats (a trained batch's, or one made beside the loop)."""
        for key, value in label.items():
            if isinstance(value, (int, float)):
                self.judge_counts[key] += value
        self.busy["label"] += label.get("busy_seconds", label["label_seconds"])

    def state(self, wall_seconds: float) -> dict:
        return {"totals": self.totals, "judge_counts": dict(self.judge_counts), "busy": dict(self.busy),
                "wall_seconds": wall_seconds}


def step_metrics(metrics: dict, stats: dict, *, train_wall: float, step_seconds: float, version: int,
                 inflight: int, queues: dict, reissued: int, rm_fit: dict | None, sync_stats: list[dict]) -> dict:
    """The step's metrics line: the learner's `metrics` plus generation, labelling, reward, reward-model refit
    (`rm_fit`: the stats of a refit that finished since the last step) and weight-sync figures."""
    gen, label = stats["gen"], stats.get("label", {})
    metrics.update(gen_seconds=gen["gen_seconds"], train_wall_seconds=train_wall, step_seconds=step_seconds,
                   policy_version=version, gen_tokens=gen["gen_tokens"], gen_policy_version=gen["policy_version"],
                   samples_per_s=gen["gen_samples"] / max(step_seconds, 1e-9),
                   tokens_per_s=gen["gen_tokens"] / max(step_seconds, 1e-9), inflight=inflight, **queues,
                   gen_worker=gen.get("worker", 0), shards=gen.get("shards", 1), reissued_batches=reissued)
    if "engine_seconds" in gen:
        metrics["engine_seconds"] = gen["engine_seconds"]
    if "reward" in stats:
        metrics.update(reward_seconds=stats["reward"]["reward_seconds"], rm_version=stats["reward"]["rm_version"],
                       **{k: v for k, v in stats["reward"].items()  # reward.functions: each part's batch mean
                          if k.startswith("reward_") and k != "reward_seconds"})
    if label:
        batch_report = judge_report(label)
        metrics.update(label_seconds=label["label_seconds"], judge_calls=label["judge_calls"],
                       judge_calls_per_sample=label["judge_calls_per_sample"], judge_cache_hits=label["judge_cache_hits"],
                       **{k: batch_report[k] for k in BATCH_JUDGE_RATES if batch_report[k] is not None})
    if rm_fit:
        metrics.update(rm_fit)
    if sync_stats:
        metrics.update(sync_seconds=max(s["sync_seconds"] for s in sync_stats), sync_bytes=sync_stats[0]["sync_bytes"])
    return metrics

"""Each stage of the loop driven alone, with nothing else running, on the batches a run saw: what the stage does
at full speed on that batch shape, to set beside what it did inside the loop (jobs/peer_trl.py, jobs/benchmark.py).

A run started with `output.save_labels=true` leaves every step's `rewards` table in run_dir/labels/step-N.parquet
(rollouts, judge labels and rewards). From those, in step order, with the first `warmup` steps run but not measured:
- generation: one RolloutWorker (same engine settings) generates the same prompts with the same step seeds;
  generated tokens per engine second (the loop's own `engine_seconds`), initial weights;
- judge: one CriticLabeler labels the saved rollouts (a fresh judge cache, filled in the same order as the run's);
  judge prompts the labelling needed per labelling second (the loop's `judge_calls` / `label_seconds`);
- learner: the learner group (same ranks, from the initial weights) trains on the saved rewards tables (the same
  staleness, the loop's versions being the step numbers too); trained tokens (prompt + response of every rewarded
  sample) per `train_seconds`. Steps without an optimizer update (no group's rewards differed) are left out.
`in_loop_rates` gives the same three figures from the run's metrics.jsonl and its saved tables.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import ray

from rlaif_ray.data import schemas


def saved_tables(run_dir) -> list[pa.Table]:
    """The run's saved `rewards` tables in step order (`output.save_labels=true`)."""
    import pyarrow.parquet as pq
    return [pq.read_table(f) for f in sorted((Path(run_dir) / "labels").glob("step-*.parquet"))]


def batch_indices(prompts: pa.Table, table: pa.Table) -> list[int]:
    """Rows of the prompt table that a saved batch holds, in the batch's order."""
    position = {pid: i for i, pid in enumerate(prompts.column("prompt_id").to_pylist())}
    return [position[pid] for pid in dict.fromkeys(table.column("prompt_id").to_pylist())]


def rollouts_of(table: pa.Table) -> pa.Table:
    return schemas.validate(table.select([n for n in schemas.ROLLOUT_SCHEMA.names if n in table.column_names]),
                            "rollouts")


def train_tokens(table: pa.Table) -> int:
    """Prompt + response tokens of every rewarded sample (what the learner's passes run over)."""
    rows = table.select(["prompt_token_ids", "response_token_ids", "reward"]).to_pylist()
    return sum(len(r["prompt_token_ids"]) + len(r["response_token_ids"]) for r in rows if r["reward"] is not None)


def _rate(numerator: float, seconds: float) -> float | None:
    return numerator / seconds if seconds else None


def generation_alone(cfg, resolved, batches: list[tuple[int, list[int]]], warmup: int) -> dict:
    """One RolloutWorker generating `batches` ((step, prompt-table indices) each) one after the other."""
    from rlaif_ray.engine import engine_env
    from rlaif_ray.stages.rollout import RolloutWorker

    worker = RolloutWorker.options(num_cpus=cfg.rollout.cpus_per_worker,
                                   runtime_env={"env_vars": engine_env(cfg.engine_for("rollout"))}).remote(
        resolved.policy, cfg.model_dump())
    try:
        prompts = ray.put(resolved.prompts)
        stats = []
        for step, indices in batches:
            _, s = worker.generate.options(num_returns=2).remote(prompts, indices, step)
            stats.append(ray.get(s))
    finally:
        ray.kill(worker)
    measured = stats[warmup:]
    tokens, seconds = sum(s["gen_tokens"] for s in measured), sum(s["engine_seconds"] for s in measured)
    return {"batches_measured": len(measured), "gen_tokens": tokens, "engine_seconds": seconds,
            "tokens_per_s": _rate(tokens, seconds)}


def engine_alone(cfg, batches: int) -> float:
    """Generation tokens/s of one RolloutWorker on `batches` batches of `data.prompts_per_step` prompts from the
    run's prompt order, after two warm-up batches (jobs/benchmark.py)."""
    from rlaif_ray.data.prompts import PromptSampler
    from rlaif_ray.runtime.inputs import resolve_inputs

    resolved = resolve_inputs(cfg)
    sampler = PromptSampler(resolved.prompts.num_rows, cfg.loop.seed, cfg.data.shuffle)
    plan = [(step, sampler.next_indices(cfg.data.prompts_per_step)) for step in range(batches + 2)]
    return generation_alone(cfg, resolved, plan, warmup=2)["tokens_per_s"]


def judge_alone(cfg, resolved, tables: list[pa.Table], warmup: int) -> dict:
    """One CriticLabeler (fresh cache) labelling the saved rollouts of `tables` in order."""
    from rlaif_ray.stages.critic import new_labeler

    labeler = new_labeler(resolved.critic, cfg, 0, **cfg.critic.actor_options())
    try:
        ray.get(labeler.ready.remote())
        stats = []
        for table in tables:
            _, s = labeler.label.options(num_returns=2).remote(rollouts_of(table))
            stats.append(ray.get(s))
    finally:
        ray.kill(labeler)
    measured = stats[warmup:]
    calls, seconds = sum(s["judge_calls"] for s in measured), sum(s["label_seconds"] for s in measured)
    return {"batches_measured": len(measured), "judge_calls": calls,
            "judge_cache_hits": sum(s["judge_cache_hits"] for s in measured), "label_seconds": seconds,
            "prompts_per_s": _rate(calls, seconds)}


def learner_alone(cfg, resolved, tables: list[pa.Table], warmup: int) -> dict:
    """The learner group (its own placement group, as the loop places it) training on `tables` in order."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from rlaif_ray.runtime.learner_group import LearnerGroup
    from rlaif_ray.runtime.placement import stage_shape

    shape = stage_shape(cfg, "learner")
    pg = placement_group([shape.bundle() for _ in range(shape.count)], strategy=shape.strategy)
    group = None
    try:
        if not pg.wait(timeout_seconds=300):
            raise RuntimeError(f"learner alone: {shape.count} bundle(s) of {shape.bundle()} could not be placed")
        group = LearnerGroup(resolved.policy, cfg, pg)
        metrics = [group.train(ray.put(table))["metrics"] for table in tables]
    finally:
        for rank in group.ranks if group else []:
            ray.kill(rank)
        remove_placement_group(pg)
    steps = [(m, t) for m, t in zip(metrics[warmup:], tables[warmup:]) if m.get("optimizer_step", 1)]
    tokens, seconds = sum(train_tokens(t) for _, t in steps), sum(m["train_seconds"] for m, _ in steps)
    return {"batches_measured": len(steps), "train_tokens": tokens, "train_seconds": seconds,
            "tokens_per_s": _rate(tokens, seconds)}


def in_loop_rates(rows: list[dict], tables: list[pa.Table], warmup: int, count: int | None = None) -> dict:
    """The three stage rates inside the loop, from metrics.jsonl `rows` and the saved `tables`, over steps
    warmup .. warmup+count-1 (all after the warm-up when `count` is None)."""
    end = min(len(rows), len(tables)) if count is None else min(len(rows), len(tables), warmup + count)
    steps = list(range(warmup, end))
    gen_tokens = sum(rows[k]["gen_tokens"] for k in steps)
    engine_s = sum(rows[k].get("engine_seconds") or 0.0 for k in steps)
    calls = sum(rows[k].get("judge_calls", 0) for k in steps)
    label_s = sum(rows[k].get("label_seconds", 0.0) for k in steps)
    learned = [k for k in steps if rows[k].get("optimizer_step", 1)]
    tokens, train_s = sum(train_tokens(tables[k]) for k in learned), sum(rows[k]["train_seconds"] for k in learned)
    return {"steps": steps, "gen_tokens_per_s": _rate(gen_tokens, engine_s),
            "judge_prompts_per_s": _rate(calls, label_s), "learner_tokens_per_s": _rate(tokens, train_s)}


def measure_alone(cfg, resolved, run_dir, warmup: int, count: int) -> dict:
    """All three stages alone on the first warmup+count saved batches of `run_dir`, and the efficiencies against
    the same steps inside that run: {stage: {unit, in_loop, alone, efficiency}}, plus the raw figures."""
    from rlaif_ray.runtime.metrics import read_jsonl

    tables = saved_tables(run_dir)[:warmup + count]
    rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
    loop = in_loop_rates(rows, tables, warmup, count)
    batches = [(k, batch_indices(resolved.prompts, t)) for k, t in enumerate(tables)]
    alone = {"generation": generation_alone(cfg, resolved, batches, warmup),
             "judge": judge_alone(cfg, resolved, tables, warmup),
             "learner": learner_alone(cfg, resolved, tables, warmup)}
    pairs = {"generation": ("gen_tokens_per_s", "tokens_per_s", "gen tokens/s"),
             "judge": ("judge_prompts_per_s", "prompts_per_s", "judge prompts/s"),
             "learner": ("learner_tokens_per_s", "tokens_per_s", "trained tokens/s")}
    out = {}
    for stage, (loop_key, alone_key, unit) in pairs.items():
        a, b = loop[loop_key], alone[stage][alone_key]
        out[stage] = {"unit": unit, "in_loop": a, "alone": b, "efficiency": a / b if a and b else None}
    return {"efficiency": out, "alone": alone, "in_loop": loop}

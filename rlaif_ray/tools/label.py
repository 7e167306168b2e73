"""Label a prompts file without training: the policy samples `rollout.samples_per_prompt` responses per prompt,
the configured judge labels them (any method, local or remote), rewards are added, and everything goes to one
Parquet file in the `rewards` schema (the same columns as a training run's `labels/step-N.parquet`).

    rlaif-ray label -c CONFIG --out labels.parquet [data.prompts=FILE critic.method=cot ...]

Batches of `data.prompts_per_step` prompts flow RolloutWorker -> CriticLabeler -> RewardScorer as refs, up to
`loop.max_inflight + 1` batches in flight; each finished batch is appended to the file in prompt order.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict, deque
from pathlib import Path

import ray

from rlaif_ray.config import RunConfig


def label_prompts(cfg: RunConfig, out: str) -> dict:
    import pyarrow.parquet as pq

    from rlaif_ray.data.checkers import make_checker
    from rlaif_ray.data.schemas import REWARD_SCHEMA
    from rlaif_ray.engine import engine_env
    from rlaif_ray.judge.quality import judge_report, label_quality
    from rlaif_ray.runtime.driver import start_ray
    from rlaif_ray.runtime.inputs import resolve_inputs
    from rlaif_ray.runtime.placement import check_resources
    from rlaif_ray.stages.critic import new_labeler
    from rlaif_ray.stages.reward import RewardScorer
    from rlaif_ray.stages.rollout import RolloutWorker

    resolved = resolve_inputs(cfg)  # bad input stops here, before Ray
    start_ray(cfg)
    check_resources(cfg)
    env = {"env_vars": engine_env(cfg.engine_for("rollout"))}
    raw = cfg.model_dump()
    worker = RolloutWorker.options(**cfg.rollout.actor_options(), runtime_env=env).remote(resolved.policy, raw)
    critic = new_labeler(resolved.critic, cfg, **cfg.critic.actor_options())
    kind = cfg.reward.kind if cfg.reward.kind != "reward_model" else ("direct_score" if cfg.critic.method == "direct"
                                                                      else "win_rate")
    scorer = RewardScorer.options(num_cpus=cfg.reward.cpus).remote(kind, None, cfg.critic.score_points())
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    n = resolved.prompts.num_rows
    step = cfg.data.prompts_per_step
    counts: dict[str, float] = defaultdict(float)
    rows = valid = 0
    quality: list[dict] = []
    t0 = time.perf_counter()
    try:
        prompts = ray.put(resolved.prompts)
        pending: deque = deque()
        batches = [list(range(k, min(k + step, n))) for k in range(0, n, step)]
        with pq.ParquetWriter(tmp, REWARD_SCHEMA) as writer:
            for b, indices in enumerate(batches):
                rollouts, _ = worker.generate.options(num_returns=2).remote(prompts, indices, b)
                labels, stats = critic.label.options(num_returns=2).remote(rollouts)
                pending.append((scorer.score.options(num_returns=2).remote(labels)[0], stats))
                while pending and (len(pending) > cfg.loop.max_inflight or b == len(batches) - 1):
                    table_ref, stats_ref = pending.popleft()
                    table, st = ray.get([table_ref, stats_ref])
                    writer.write_table(table)
                    rows += table.num_rows
                    valid += int(sum(table.column("label_valid").to_pylist()))
                    quality.append(label_quality(table, make_checker(cfg.data.checker), cfg.critic.score_points()))
                    for key, value in st.items():
                        if isinstance(value, (int, float)):
                            counts[key] += value
                    print(f"[label] {min((b + 1) * step, n)}/{n} prompts, {rows} samples labelled", flush=True)
        os.replace(tmp, out_path)  # a reader never sees half a file
        for key, value in ray.get(critic.usage.remote()).items():
            counts[key] += value
        offset = ray.get(critic.slot1_offset.remote())  # the position calibration the labels were read with
    finally:
        for actor in (worker, critic, scorer):
            ray.kill(actor)
        if tmp.exists():
            tmp.unlink()
    agree = [q["judge_truth_agreement"] for q in quality if q.get("judge_truth_agreement") is not None]
    return {"out": str(out_path), "prompts": n, "samples": rows, "valid_labels": valid, "method": cfg.critic.method,
            "seconds": time.perf_counter() - t0, "judge_report": {**judge_report(counts), "position_offset": offset},
            "judge_truth_agreement": sum(agree) / len(agree) if agree else None}

"""The chaos drill (jobs/chaos_run.py): a seeded plan of actor kills across a long run, the kills made as the driver
reaches each planned step, and the run's own account (faults summary, sample ledger) checked against them.

Kinds: `rollout` (an engine, `ray.kill`), `critic` (a judge's process, SIGKILL), `reward` (the scorer's process),
`reward_trainer` (the reward-model trainer's process) and `learner` (a DeepSpeed rank's process). The first three are
stage actors: each kill is one replacement, and its calls in flight are re-issued. The last two end the step: each
kill is one resume from the last checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import signal
from collections import Counter
from pathlib import Path

import ray

STAGE_KINDS = ("rollout", "critic", "reward")
RESUME_KINDS = ("reward_trainer", "learner")
KINDS = STAGE_KINDS + RESUME_KINDS


GAP = 3  # steps between two kills: each is seen (and counted) before the next


def plan_kills(seed: int, steps: int, kills: int) -> list[tuple[int, str]]:
    """(step, kind) for `kills` kills (at least one of every kind) at steps drawn from 2 .. steps-2, at least GAP
    apart, in step order; the same seed gives the same plan."""
    slots = range(2, steps - 1, GAP)
    if not len(KINDS) <= kills <= len(slots):
        raise ValueError(f"kills={kills}: needs at least {len(KINDS)} (one per kind) and, {GAP} steps apart, at most "
                         f"{len(slots)} in {steps} steps")
    rng = random.Random(seed)
    kinds = list(KINDS) + [rng.choice(KINDS) for _ in range(kills - len(KINDS))]
    rng.shuffle(kinds)
    return list(zip(sorted(rng.sample(slots, kills)), kinds))


def pid_of(actor) -> int:
    return ray._private.state.actors(actor._actor_id.hex())["Pid"]


def kill(orch, kind: str, rng: random.Random) -> str:
    """Kill one actor of `kind` in the running Orchestrator `orch`; returns what was killed."""
    if kind == "rollout":
        i = rng.choice(orch.pools["rollout"].present())
        ray.kill(orch.pools["rollout"].actors[i], no_restart=True)
        return f"rollout {i} (ray.kill)"
    if kind in ("critic", "reward"):
        i = rng.choice(orch.pools[kind].present())
        os.kill(pid_of(orch.pools[kind].actors[i]), signal.SIGKILL)
        return f"{kind} {i} (SIGKILL)"
    if kind == "reward_trainer":
        os.kill(pid_of(orch.rm_trainer), signal.SIGKILL)
        return "reward-model trainer (SIGKILL)"
    rank = rng.randrange(len(orch.learners.ranks))
    os.kill(pid_of(orch.learners.ranks[rank]), signal.SIGKILL)
    return f"learner rank {rank} (SIGKILL)"


def check(summary: dict, kills: list[tuple[int, str, str]], run_dir: Path, steps: int, per_step: int) -> list[str]:
    """What the run's account says against the kills made; each line ends in OK or MISMATCH."""
    faults, made = summary["faults"], Counter(kind for _, kind, _ in kills)
    ledger = [json.loads(line) for line in open(run_dir / "samples.jsonl")]
    ids = [row["sample_id"] for row in ledger]
    stage_kills, resume_kills = sum(made[k] for k in STAGE_KINDS), sum(made[k] for k in RESUME_KINDS)
    rows = [("stage actors killed = actors replaced", stage_kills, faults["replaced_actors"]),
             ("learner ranks and trainer killed = resumes", resume_kills, len(faults.get("resumes", []))),
             ("sample ids in the ledger = steps x samples per step", steps * per_step, len(ids)),
             ("sample ids seen twice", 0, len(ids) - len(set(ids))),
             ("policy version at the end = steps", steps, summary["final_version"])]
    lines = [f"{what}: {want} vs {got}: {'OK' if want == got else 'MISMATCH'}" for what, want, got in rows]
    lines.append(f"stage faults counted (batches re-issued): {faults['reissued_batches']} for {stage_kills} stage "
                 f"kills: {'OK' if faults['reissued_batches'] >= stage_kills else 'MISMATCH'}")
    return lines

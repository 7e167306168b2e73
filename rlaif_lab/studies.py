"""What the study jobs (`jobs/feedback_study.py`, `jobs/claims_study.py`) share: the initial policy's batch."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def initial_batch(cfg, heldout: bool = False):
    """One RolloutWorker and one CriticLabeler (killed on exit), and every prompt sampled by the initial policy
    (`rollout.samples_per_prompt` answers each, batch step 0). Yields (rollouts, critic, resolved, heldout): with
    `heldout`, a second batch of the same prompts sampled with other seeds (batch step 1), else None."""
    import ray

    from rlaif_ray.engine import engine_env
    from rlaif_ray.runtime.driver import start_ray
    from rlaif_ray.runtime.inputs import resolve_inputs
    from rlaif_ray.stages.critic import new_labeler
    from rlaif_ray.stages.rollout import RolloutWorker

    resolved = resolve_inputs(cfg)
    start_ray(cfg)
    raw = cfg.model_dump()
    env = {"env_vars": engine_env(cfg.engine_for("rollout"))}
    worker = RolloutWorker.options(num_cpus=1, runtime_env=env).remote(resolved.policy, raw)
    critic = new_labeler(resolved.critic, cfg, num_cpus=1)
    try:
        prompts, every = ray.put(resolved.prompts), list(range(resolved.prompts.num_rows))
        rollouts, _ = worker.generate.options(num_returns=2).remote(prompts, every, 0)
        second = worker.generate.options(num_returns=2).remote(prompts, every, 1)[0] if heldout else None
        yield ray.get(rollouts), critic, resolved, ray.get(second) if heldout else None
    finally:
        ray.kill(worker)
        ray.kill(critic)

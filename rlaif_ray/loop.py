"""The orchestrator: checks the inputs, places the actors, and drives the asynchronous RLAIF loop.

The driver only moves object refs: prompts are put in the object store once; each batch flows
RolloutWorker -> CriticLabeler -> RewardScorer -> learner ranks as refs to Arrow tables, and new weights
flow from learner rank 0 to every RolloutWorker as one ref. What the driver reads back is small: stage
timings, metrics, and the sample-id ledger.

async: up to `loop.max_inflight` batches are generated (and labelled) ahead of the learner, so generation
for version v+1 overlaps training on version v; a weight update is queued on each RolloutWorker behind the
batches already submitted to it, so it lands between two `generate` calls. Samples older than
`loop.max_staleness` versions are dropped by the learner and counted. sync: max_inflight = 0, no overlap.
"""
from __future__ import annotations

import os
import shutil
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import ray

from rlaif_ray.config import ConfigError, RunConfig, dump_config
from rlaif_ray.feedback_metrics import judge_report
from rlaif_ray.prompts import PromptSampler, load_prompts


@dataclass
class Resolved:
    """Inputs checked before any actor starts."""
    policy: str
    critic: str
    prompts_path: str
    prompts: object  # pa.Table
    reward_model: str | None = None  # backbone of reward.kind=reward_model


@dataclass
class InFlight:
    step: int
    rewards: object                                # ObjectRef[pa.Table]: rewards (or demonstrations for sft)
    stat_refs: dict = field(default_factory=dict)  # stage -> ObjectRef of its small stats dict


def _check_model_path(path: str, key: str) -> None:
    """A local folder must exist and hold a config.json; `org/name` is taken as a hub id."""
    local = Path(path).expanduser()
    is_hub_id = not local.exists() and not path.startswith((".", "~", "/")) and path.count("/") <= 1
    if is_hub_id:
        return
    if not local.is_dir():
        raise ConfigError(f"{key}: model path does not exist: {path}")
    if not (local / "config.json").is_file():
        raise ConfigError(f"{key}: {path} holds no config.json (not a Hugging Face model folder)")


def _check_judge(cfg: RunConfig, critic: str) -> None:
    """The judge can give the labels the config asks for: one token per label (local), a reachable endpoint
    that answers a log-prob request (remote). Checked on the driver, before any actor starts."""
    from rlaif_ray.judge_backends import JudgeLabelError, label_token_ids

    if cfg.critic.remote.base_url:
        from rlaif_ray.remote_judge import OpenAIJudge, RemoteJudgeError
        try:
            with OpenAIJudge(cfg.critic.remote) as judge:
                judge.check()
        except RemoteJudgeError as err:
            raise ConfigError(f"critic.remote: {err}") from None
        return
    if cfg.learner.algorithm == "sft":
        return
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(critic)
    labels = cfg.critic.direct_labels if cfg.critic.method == "direct" else cfg.critic.pairwise_labels
    try:
        label_token_ids(tok, labels, critic)
    except JudgeLabelError as err:
        raise ConfigError(str(err)) from None


def resolve_inputs(cfg: RunConfig) -> Resolved:
    """Build/reuse the toy world if asked, then check model paths and the prompt file."""
    policy, critic, prompts_path = cfg.model.policy, cfg.model.critic, cfg.data.prompts
    if "toy" in (policy, critic, prompts_path):
        from rlaif_ray.toyworld import build_toy_world
        world = build_toy_world(cfg.toy, cfg.critic)
        policy = world.policy if policy == "toy" else policy
        critic = world.critic if critic == "toy" else critic
        prompts_path = world.prompts if prompts_path == "toy" else prompts_path
    _check_model_path(policy, "model.policy")
    if not cfg.critic.remote.base_url:  # a remote judge needs no local critic model
        _check_model_path(critic, "model.critic")
    _check_judge(cfg, critic)
    prompts = load_prompts(prompts_path)
    if cfg.data.prompts_per_step > prompts.num_rows:
        raise ConfigError(f"data.prompts_per_step={cfg.data.prompts_per_step} is more than the "
                          f"{prompts.num_rows} prompts in {prompts_path}")
    local = lambda p: str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p  # noqa: E731
    reward_model = None
    if cfg.reward.kind == "reward_model":
        reward_model = {"policy": policy, "critic": critic}.get(cfg.reward.model, cfg.reward.model)
        _check_model_path(reward_model, "reward.model")
        reward_model = local(reward_model)
    return Resolved(local(policy), local(critic), prompts_path, prompts, reward_model)


def busy_fractions(busy: dict[str, float], wall: float, pool_sizes: dict[str, int]) -> dict[str, float]:
    """Share of the run's wall time each stage's actors spent working (1.0 = every actor always busy)."""
    return {stage: seconds / (wall * pool_sizes.get(stage, 1)) if wall > 0 else 0.0 for stage, seconds in busy.items()}


def start_ray(cfg: RunConfig) -> None:
    from rlaif_ray.transport import use_arrow_ipc
    use_arrow_ipc()  # the driver puts the prompt table
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs = {"namespace": cfg.ray.namespace, "log_to_driver": True}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, **kwargs)


class Orchestrator:
    def __init__(self, cfg: RunConfig, resolved: Resolved):
        from rlaif_ray.critic import CriticLabeler
        from rlaif_ray.engine import engine_env, judge_env
        from rlaif_ray.learner import LearnerGroup
        from rlaif_ray.placement import in_bundle, stage_groups
        from rlaif_ray.reward import RewardScorer
        from rlaif_ray.rollout import RolloutWorker

        self.cfg = cfg
        raw = cfg.model_dump()
        env = {"env_vars": engine_env(cfg.vllm)}
        critic_env = {"env_vars": judge_env(cfg)}
        self.groups = stage_groups(cfg)  # one placement group per stage (rlaif_ray.placement)
        self.rollouts, self.critics, self.rm_trainer, self.scorer, self.learners = [], [], None, None, None
        try:
            r, c, w = cfg.rollout, cfg.critic, cfg.reward
            self.rollouts = [RolloutWorker.options(runtime_env=env, **in_bundle(
                self.groups["rollout"], i, r.cpus_per_worker, r.gpus_per_worker, r.resources)).remote(resolved.policy, raw, i)
                for i in range(r.num_workers)]
            self.critics = [CriticLabeler.options(runtime_env=critic_env, **in_bundle(
                self.groups["critic"], i, c.cpus_per_worker, c.gpus_per_worker, c.resources)).remote(resolved.critic, raw, i)
                for i in range(c.num_workers)]
            if cfg.reward.kind == "reward_model":
                from rlaif_ray.reward_model import RewardModelTrainer
                self.rm_trainer = RewardModelTrainer.options(**in_bundle(
                    self.groups["reward_trainer"], 0, w.trainer_cpus, 0, w.resources)).remote(resolved.reward_model, raw)
            self.scorer = RewardScorer.options(**in_bundle(self.groups["reward"], 0, w.cpus, 0, w.resources)).remote(
                cfg.reward.kind, resolved.reward_model)
            ready = [x.ready.remote() for x in self.rollouts + self.critics]
            self.learners = LearnerGroup(resolved.policy, cfg, self.groups["learner"])
            ray.get(ready)
        except BaseException:
            self.shutdown()  # nothing left running when start-up fails
            raise
        from rlaif_ray.placement import where
        self.placement = where(self.groups)
        from rlaif_ray.pool import ActorPool
        self.rollout_pool = ActorPool(self.rollouts, "rollout")
        self.critic_pool = ActorPool(self.critics, "critic")
        self.scorer_pool = ActorPool([self.scorer], "reward")
        self.version = 0
        self.run_dir = Path(cfg.output.run_dir).resolve()
        self.prompts_ref = ray.put(resolved.prompts)
        self.sampler = PromptSampler(resolved.prompts.num_rows, cfg.loop.seed, cfg.data.shuffle)

    def launch(self, step: int) -> InFlight:
        """Submit generation -> labelling -> reward for one batch (sft: teacher demonstrations); refs only."""
        indices = self.sampler.next_indices(self.cfg.data.prompts_per_step)
        c = self.critic_pool.pick()
        critic = self.critics[c]
        if self.cfg.learner.algorithm == "sft":
            demos, demo_stats = critic.demonstrate.options(num_returns=2).remote(self.prompts_ref, indices, step,
                                                                                self.version)
            self.critic_pool.track(c, demo_stats)
            return InFlight(step, demos, {"gen": demo_stats})
        w = self.rollout_pool.pick()
        rollouts, gen_stats = self.rollouts[w].generate.options(num_returns=2).remote(self.prompts_ref, indices, step)
        self.rollout_pool.track(w, gen_stats)
        labels, label_stats = critic.label.options(num_returns=2).remote(rollouts)
        self.critic_pool.track(c, label_stats)
        save = str(self.run_dir / "labels" / f"step-{step:06d}.parquet") if self.cfg.output.save_labels else None
        rewards, reward_stats = self.scorer.score.options(num_returns=2).remote(labels, save)
        self.scorer_pool.track(0, reward_stats)
        if self.rm_trainer is not None:  # fresh on-policy labels for the next reward-model refit
            self.rm_trainer.add.remote(labels)
        return InFlight(step, rewards, {"gen": gen_stats, "label": label_stats, "reward": reward_stats})

    def warm_up_reward_model(self) -> dict:
        """Canonical RLAIF: fit the reward model on labels of the initial policy's samples before RL starts.
        Warm-up batches (negative batch numbers: sample ids `s-00001/...`) train only the reward model; they
        are not in the policy's ledger."""
        rcfg = self.cfg.reward
        for k in range(rcfg.warmup_batches):
            indices = self.sampler.next_indices(self.cfg.data.prompts_per_step)
            worker, critic = self.rollouts[k % len(self.rollouts)], self.critics[k % len(self.critics)]
            rollouts, _ = worker.generate.options(num_returns=2).remote(self.prompts_ref, indices, -(k + 1))
            labels, _ = critic.label.options(num_returns=2).remote(rollouts)
            self.rm_trainer.add.remote(labels)
        stats = ray.get(self.rm_trainer.fit.remote(rcfg.warmup_steps)) if rcfg.warmup_batches else {}
        ray.get(self.scorer.load_state.remote(self.rm_trainer.state_dict.remote()))
        return stats

    def evaluate(self) -> dict:
        """Ground-truth accuracy of the current policy on the whole prompt set (sampled and greedy)."""
        return ray.get(self.rollouts[0].evaluate.remote(self.prompts_ref, self.cfg.loop.eval_samples))

    def sync_weights(self, version: int) -> list:
        weights = self.learners.export_weights()
        return [w.update_weights.remote(weights, version) for w in self.rollouts]

    def run(self, writer) -> dict:
        cfg = self.cfg
        inflight_max = cfg.loop.max_inflight if cfg.loop.mode == "async" else 0
        pending: deque[InFlight] = deque()
        launched, totals = 0, {"generated": 0, "trained": 0, "dropped_stale": 0, "skipped": 0}
        judge_counts: dict[str, float] = defaultdict(float)
        busy: dict[str, float] = defaultdict(float)  # stage -> seconds its actors spent working
        sync_refs: list = []
        rm_fit = None
        t_start = last = time.perf_counter()
        for step in range(cfg.loop.num_steps):
            while launched < cfg.loop.num_steps and len(pending) <= inflight_max:
                pending.append(self.launch(launched))
                launched += 1
            batch = pending.popleft()
            queues = {"queue_gen": self.rollout_pool.depth(), "queue_label": self.critic_pool.depth(),
                      "queue_reward": self.scorer_pool.depth(),
                      "queue_ready": sum(bool(ray.wait([b.rewards], timeout=0, fetch_local=False)[0]) for b in pending)}
            rcfg = cfg.reward
            if self.rm_trainer is not None and rcfg.refresh_every and step and step % rcfg.refresh_every == 0:
                rm_fit = self.rm_trainer.fit.remote()  # runs beside the learner; the scorer takes the new
                self.scorer.load_state.remote(self.rm_trainer.state_dict.remote())  # weights for later batches
            t_train = time.perf_counter()
            result = self.learners.train(batch.rewards)
            train_wall = time.perf_counter() - t_train
            self.version += 1
            sync_stats = ray.get(sync_refs) if sync_refs else []  # previous sync, long done by now
            sync_refs = self.sync_weights(self.version)
            if cfg.loop.mode == "sync":
                sync_stats = ray.get(sync_refs)
                sync_refs = []
            stats = dict(zip(batch.stat_refs, ray.get(list(batch.stat_refs.values()))))
            gen, lab = stats["gen"], stats.get("label", {})
            now = time.perf_counter()
            m = result["metrics"]
            for key in ("trained", "dropped_stale", "skipped"):
                totals[key] += m[key]
            totals["generated"] += gen["gen_samples"]
            m.update(gen_seconds=gen["gen_seconds"], train_wall_seconds=train_wall, step_seconds=now - last,
                     policy_version=self.version, gen_tokens=gen["gen_tokens"], gen_policy_version=gen["policy_version"],
                     samples_per_s=gen["gen_samples"] / max(now - last, 1e-9),
                     tokens_per_s=gen["gen_tokens"] / max(now - last, 1e-9), inflight=len(pending), **queues,
                     gen_worker=gen.get("worker", 0))
            if "engine_seconds" in gen:
                m["engine_seconds"] = gen["engine_seconds"]
            busy["gen"] += gen["gen_seconds"]
            busy["train"] += result["metrics"]["train_seconds"]
            if lab:
                for key, value in lab.items():
                    if isinstance(value, (int, float)):
                        judge_counts[key] += value
                batch_report = judge_report(lab)
                busy["label"] += lab["label_seconds"]
                busy["reward"] += stats["reward"]["reward_seconds"]
                m.update(label_seconds=lab["label_seconds"], judge_calls=lab["judge_calls"],
                         reward_seconds=stats["reward"]["reward_seconds"], rm_version=stats["reward"]["rm_version"],
                         **{k: batch_report[k] for k in ("first_slot_rate", "unparsable_share", "failed_share")
                            if batch_report[k] is not None})
            if rm_fit is not None and ray.wait([rm_fit], timeout=0)[0]:
                m.update(ray.get(rm_fit))
                rm_fit = None
            if sync_stats:
                m.update(sync_seconds=max(s["sync_seconds"] for s in sync_stats), sync_bytes=sync_stats[0]["sync_bytes"])
            last = now
            writer.log_step(step, m)
            writer.log_outcomes(step, result["outcome"])
        if sync_refs:
            ray.get(sync_refs)
        wall = time.perf_counter() - t_start
        summary = {**totals, "final_version": self.version, "wall_seconds": wall,
                   "samples_per_s": totals["generated"] / wall, "mode": cfg.loop.mode,
                   "algorithm": cfg.learner.algorithm,
                   "busy_fraction": busy_fractions(busy, wall, {"gen": len(self.critics) if cfg.learner.algorithm == "sft"
                                                                else len(self.rollouts), "label": len(self.critics),
                                                                "reward": 1, "train": 1}),
                   "dispatched": {"rollout": self.rollout_pool.dispatched, "critic": self.critic_pool.dispatched},
                   "placement": self.placement}
        if judge_counts:
            for usage in ray.get([c.usage.remote() for c in self.critics]):
                for key, value in usage.items():
                    judge_counts[key] += value
            summary["judge_report"] = judge_report(judge_counts)
        return summary

    def save_checkpoint(self, path: Path) -> str:
        return self.learners.save_checkpoint(str(path))

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group
        for actor in [*self.rollouts, *self.critics, *([self.scorer] if self.scorer else []),
                      *([self.rm_trainer] if self.rm_trainer else []), *(self.learners.ranks if self.learners else [])]:
            ray.kill(actor)
        for pg in self.groups.values():
            remove_placement_group(pg)


def train(cfg: RunConfig) -> dict:
    """Run one RLAIF job end to end; returns the summary (also written to run_dir/summary.json)."""
    import json

    from rlaif_ray.metrics import MetricsWriter
    from rlaif_ray.report import write_report

    resolved = resolve_inputs(cfg)          # bad input stops here, before Ray or any actor
    run_dir = Path(cfg.output.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "samples.jsonl"):
        (run_dir / stale).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "labels", ignore_errors=True)
    dump_config(cfg, run_dir / "config.yaml")
    start_ray(cfg)
    from rlaif_ray.placement import check_resources
    check_resources(cfg)
    t0 = time.perf_counter()
    orch = Orchestrator(cfg, resolved)
    startup = time.perf_counter() - t0
    writer = MetricsWriter(run_dir, cfg.output.tensorboard, cfg.loop.num_steps if cfg.output.progress else None)
    try:
        before = orch.evaluate() if cfg.loop.eval_samples else None
        warmup = orch.warm_up_reward_model() if orch.rm_trainer is not None else None
        summary = orch.run(writer)
        if warmup is not None:
            summary["reward_model_warmup"] = warmup
            summary["reward_model"] = ray.get(orch.rm_trainer.save.remote(str(run_dir.resolve() / "reward_model")))
        summary["startup_seconds"] = startup
        if before is not None:
            summary["eval_before"], summary["eval_after"] = before, orch.evaluate()
        if cfg.output.save_checkpoint:
            summary["checkpoint"] = orch.save_checkpoint((run_dir / "checkpoint").resolve())
    finally:
        writer.close()
        orch.shutdown()
    summary.update(policy=resolved.policy, critic=resolved.critic, prompts=resolved.prompts_path)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    write_report(run_dir)
    return summary

"""The Orchestrator: places the actors and drives the asynchronous RLAIF loop, surviving stage faults.

The driver only moves object refs: prompts are put in the object store once; each batch flows
RolloutWorker -> CriticLabeler -> RewardScorer -> learner ranks as refs to Arrow tables, and new weights
flow from learner rank 0 to every RolloutWorker over a sync group of their own, or as one object-store ref
(rlaif_ray.runtime.weight_sync). What the driver reads back is small: stage
timings, metrics, and the sample-id ledger.

async: up to `loop.max_inflight` batches are generated (and labelled) ahead of the learner, so generation
for version v+1 overlaps training on version v; a weight update is queued on each RolloutWorker behind the
batches already submitted to it, so it lands between two `generate` calls. Samples older than
`loop.max_staleness` versions are dropped by the learner and counted. sync: max_inflight = 0, no overlap.

Faults (rlaif_ray.runtime.faults): a batch whose stage actor died (or whose engine restarted and lost its weights) is
re-issued with the same step and prompts, so its sample ids stay the same and reach the learner once; the
dead actor is restarted by Ray or replaced, and engines behind the current policy version get its weights
again; the stages go on with the actors left while replacements come up (rlaif_ray.runtime.recovery), and a stage
with none left checkpoints and stops. Checkpoints (rlaif_ray.runtime.checkpoint) hold what a resumed run needs to continue exactly.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.placement_group import remove_placement_group

from rlaif_ray.config import JUDGELESS_REWARDS, RunConfig
from rlaif_ray.data.prompts import PromptSampler
from rlaif_ray.engine import engine_env
from rlaif_ray.judge.quality import judge_report
from rlaif_ray.runtime import checkpoint
from rlaif_ray.runtime.accounting import Tally, busy_fractions, merge_shard_stats, step_metrics
from rlaif_ray.runtime.faults import (NoActorLeft, RunStopped, StageTimeout, StaleEngine, check_judge_failures,
                                     is_actor_fault, trainer_result)
from rlaif_ray.runtime.inputs import Resolved
from rlaif_ray.runtime.learner_group import LearnerGroup
from rlaif_ray.runtime.placement import in_bundle, stage_groups, stage_shape, where
from rlaif_ray.runtime.recovery import StageRecovery
from rlaif_ray.runtime.pool import ActorPool
from rlaif_ray.runtime.weight_sync import WeightSync
from rlaif_ray.stages.critic import new_labeler
from rlaif_ray.stages.reward import RewardScorer
from rlaif_ray.stages.reward_functions import RewardFunctionError
from rlaif_ray.stages.reward_model import RewardModelTrainer
from rlaif_ray.stages.rollout import RolloutWorker

log = logging.getLogger(__name__)


@dataclass
class StageCall:
    stage: str                                     # gen | label | reward
    stats: object                                  # ObjectRef of the call's small stats dict
    pool: str                                      # the pool and actor index that runs it
    index: int
    life: int = 0                                  # the actor's life when the call was made (ActorPool.lives)


@dataclass
class InFlight:
    """One step's batch on its way through the stages: its prompts are split into shards (one per engine, at most),
    each generated and labelled on the least-loaded actors, then one reward call takes the labelled shards; the
    learner trains on what `rewards` holds as one batch."""
    step: int
    indices: list[int]                             # the batch's prompts: a re-issued batch takes the same ones
    rewards: list = field(default_factory=list)    # ObjectRef[pa.Table]s: the batch's rewards (sft: one per shard)
    calls: list[StageCall] = field(default_factory=list)
    expected_version: int = 0                      # the engine must hold at least this version of the weights
    expected_rm: int = 0                           # ... and the scorer this reward-model state

    def track(self, pool: ActorPool, index: int, stage: str, stats) -> None:
        pool.track(index, stats)
        self.calls.append(StageCall(stage, stats, pool.name, index, pool.lives[index]))


def shard_indices(indices: list[int], shards: int) -> list[list[int]]:
    """`indices` in `shards` contiguous parts as equal as they can be (the first ones one longer), none empty."""
    shards = max(1, min(shards, len(indices)))
    size, extra = divmod(len(indices), shards)
    parts, start = [], 0
    for k in range(shards):
        end = start + size + (k < extra)
        parts.append(indices[start:end])
        start = end
    return parts


@dataclass
class LoopState:
    """The loop's own state within one `Orchestrator.run` (what of it a checkpoint keeps: `loop_state`)."""
    start: int                                     # first step of this run (a resumed run: the checkpoint's step)
    launched: int                                  # batches launched so far (steps 0 .. launched-1)
    tally: Tally                                   # totals, judge counts, busy seconds (rlaif_ray.runtime.accounting)
    inflight_max: int                              # batches generated ahead of the learner (0 in sync mode)
    pending: deque = field(default_factory=deque)  # InFlight batches, oldest first
    sync: object = None                            # the weight sync sent to the engines, not yet collected
    rm_fit: object = None                          # ObjectRef of a running reward-model refit
    t_start: float = 0.0
    last: float = 0.0                              # when the previous step was logged
    last_cpu: float = 0.0                          # the driver's CPU seconds (all its threads) by then

    def wall(self) -> float:
        return self.tally.wall_before + time.perf_counter() - self.t_start


class Orchestrator(StageRecovery):
    # the driver's work while it waits for the learner or a weight sync: `keep_flowing(refs, every, timeout)` returns
    # once any of `refs` (`every`: all of them) is done; batch flow has none (rlaif_ray.runtime.streaming has)
    keep_flowing = None

    def __init__(self, cfg: RunConfig, resolved: Resolved, stand_ins: dict | None = None):
        """`stand_ins`: stage ("rollout", "critic", "reward", "learner") -> an actor class with the real one's
        constructor and methods, used in its place (the controller at cluster scale on one machine:
        `jobs/scale_sim.py`); None: the real stages."""
        self.cfg = cfg
        self.stand_ins = stand_ins or {}
        self.groups = stage_groups(cfg)  # one placement group per stage (rlaif_ray.runtime.placement)
        self.factories = self._actor_factories(resolved)
        self.pools: dict[str, ActorPool] = {}
        self.rm_trainer, self.learners = None, None
        try:
            self._start_actors(resolved)
        except BaseException:
            self.shutdown()  # nothing left running when start-up fails
            raise
        self.placement = where(self.groups)
        self.version = 0              # policy version of the learner
        self.synced_version = 0       # the version every engine was last sent
        self.rm_loads = 0             # reward-model states pushed to the scorer
        self.eval_before = None       # ground-truth accuracy before the run (kept in checkpoints)
        self.background_labels = []   # (step, ObjectRef of label stats): reward.label_share < 1, beside the loop
        self.last_checkpoint = time.monotonic()  # checkpoint.every_minutes counts from here, then from each save
        self.faults = {"reissued_batches": 0, "replaced_actors": 0, "resynced_engines": 0, "failed_syncs": 0,
                       "events": []}
        self.weights = WeightSync(cfg, self.learners, self.pools["rollout"], self.faults)
        self.run_dir = Path(cfg.output.run_dir).resolve()
        self.prompts_digest = checkpoint.prompts_digest(resolved.prompts)  # written into every checkpoint
        self.prompts_ref = ray.put(resolved.prompts)
        # data.eval_prompts: the before/after reads prompts the policy never trains on
        self.eval_prompts_ref = self.prompts_ref if resolved.eval_prompts is None else ray.put(resolved.eval_prompts)
        self.sampler = PromptSampler(resolved.prompts.num_rows, cfg.loop.seed, cfg.data.shuffle)

    def _placed(self, stage: str, i: int) -> dict:
        """`.options` for bundle i of the stage's placement group, with exactly the bundle's resources."""
        return in_bundle(self.groups[stage], i, stage_shape(self.cfg, stage))

    def _actor_factories(self, resolved: Resolved) -> dict:
        """Stage -> index -> a new actor in that bundle (at start-up, and to replace a dead one)."""
        cfg, raw = self.cfg, self.cfg.model_dump()
        env = {"env_vars": engine_env(cfg.engine_for("rollout"))}
        restarts = dict(max_restarts=cfg.fault.max_actor_restarts, max_task_retries=0)  # the driver re-issues
        rollout = self.stand_ins.get("rollout", RolloutWorker)
        critic = self.stand_ins.get("critic")
        scorer = self.stand_ins.get("reward", RewardScorer)
        return {
            "rollout": lambda i: rollout.options(runtime_env=env, **restarts,
                                                 **self._placed("rollout", i)).remote(resolved.policy, raw, i),
            "critic": lambda i: (critic.options(**restarts, **self._placed("critic", i)).remote(resolved.critic, raw, i)
                                 if critic else new_labeler(resolved.critic, cfg, i, **restarts, **self._placed("critic", i))),
            "reward": lambda i: scorer.options(**restarts, **self._placed("reward", 0)).remote(
                cfg.reward.kind, resolved.reward_model, cfg.critic.score_points(), cfg.data.checker,
                [f.model_dump() for f in cfg.reward.functions]),
        }

    def _start_actors(self, resolved: Resolved) -> None:
        """Every stage's actors and the learner ranks, up and ready (engines loaded, process group formed)."""
        cfg = self.cfg
        sizes = {"rollout": cfg.rollout.num_workers, "critic": cfg.critic.num_workers if cfg.judge_in_loop() else 0,
                 "reward": 1}  # reward.label_share=0: no judge (the reward model learns from a preference file)
        for stage, n in sizes.items():
            if n:
                self.pools[stage] = ActorPool([self.factories[stage](i) for i in range(n)], stage)
        if cfg.reward.kind == "reward_model":
            self.rm_trainer = RewardModelTrainer.options(**self._placed("reward_trainer", 0)).remote(
                resolved.reward_model, cfg.model_dump(), resolved.preferences, resolved.preference_stats)
        ready = [x.ready.remote() for x in self.rollouts + self.critics]
        if cfg.learner.colocate:  # engines first: vLLM sizes its KV cache from the GPU memory it finds free
            ray.get(ready)
        self.learners = LearnerGroup(resolved.policy, cfg, self.groups["learner"], self.stand_ins.get("learner"))
        ray.get(ready)

    @property
    def rollouts(self) -> list:
        """The rollout engines present (not those whose replacement waits for a node)."""
        return self.present("rollout")

    @property
    def critics(self) -> list:
        return self.present("critic")

    def present(self, stage: str) -> list:
        pool = self.pools.get(stage)
        return [pool.actors[i] for i in pool.present()] if pool else []

    @property
    def scorer(self):
        scorers = self.present("reward")
        return scorers[0] if scorers else None

    # ------------------------------------------------------------------ batches
    def shard_count(self) -> int:
        """Shards per batch: `rollout.shards_per_batch`, or (0) one per actor of the generating pool (rollout engines;
        judges for sft), never more than the batch's prompts."""
        pool = self.pools["critic" if self.cfg.learner.algorithm == "sft" else "rollout"]
        return min(self.cfg.rollout.shards_per_batch or len(pool.present()), self.cfg.data.prompts_per_step)

    def launch(self, step: int, indices: list[int] | None = None) -> InFlight:
        """Submit one batch (refs only): its prompts split into shards, each generated and labelled on the least-loaded
        actors (sft: teacher demonstrations), then one reward call for the whole batch. `indices` given: re-issue that
        batch (same prompts, same step, so the same sample ids)."""
        self.take_back(wait=True)  # a stage with no actor left waits here, between steps (NoActorLeft)
        if indices is None:
            indices = self.sampler.next_indices(self.cfg.data.prompts_per_step)
        batch = InFlight(step, indices, expected_version=self.synced_version, expected_rm=self.rm_loads)
        for pool in ("rollout", "critic"):
            if pool in self.pools:
                self.pools[pool].prune()  # once per batch; the shards pick from the counts (rlaif_ray.runtime.pool)
        first, shards = 0, []
        for part in shard_indices(indices, self.shard_count()):
            shards.append(self._launch_shard(batch, part, first))
            first += len(part)
        if self.cfg.learner.algorithm == "sft":
            batch.rewards = shards  # the demonstrations, trained as they are
            return batch
        save = str(self.run_dir / "labels" / f"step-{step:06d}.parquet") if self.cfg.output.save_labels else None
        labelled = self.cfg.reward.label_share >= 1  # else: the reward model scores rollouts no judge saw
        rewards, reward_stats = self.scorer.score.options(num_returns=2).remote(
            *shards, save_path=save if labelled else None)
        batch.rewards = [rewards]
        batch.track(self.pools["reward"], 0, "reward", reward_stats)
        if not labelled and int((step + 1) * self.cfg.reward.label_share) > int(step * self.cfg.reward.label_share):
            self._label_beside_the_loop(step, shards, save)
        return batch

    def _launch_shard(self, batch: InFlight, indices: list[int], first: int):
        """One shard's generation and labelling (sft: demonstrations); returns the ref the reward call takes (labels;
        rollouts where the judge labels beside the loop; demonstrations). `first`: the shard's first prompt's position
        in the batch (sampling seeds follow the position, so a batch samples the same whatever its split)."""
        critic_pool = self.pools.get("critic")
        if self.cfg.learner.algorithm == "sft":
            c = critic_pool.pick(prune=False)
            demos, demo_stats = critic_pool.actors[c].demonstrate.options(num_returns=2).remote(
                self.prompts_ref, indices, batch.step, self.version)
            batch.track(critic_pool, c, "gen", demo_stats)
            return demos
        rollout_pool = self.pools["rollout"]
        w = rollout_pool.pick(prune=False)
        rollouts, gen_stats = rollout_pool.actors[w].generate.options(num_returns=2).remote(
            self.prompts_ref, indices, batch.step, first)
        batch.track(rollout_pool, w, "gen", gen_stats)
        if self.cfg.reward.label_share < 1 or self.cfg.reward.kind in JUDGELESS_REWARDS:
            return rollouts  # the reward needs no judge (or the judge labels beside the loop)
        c = critic_pool.pick(prune=False)
        labels, label_stats = critic_pool.actors[c].label.options(num_returns=2).remote(rollouts)
        batch.track(critic_pool, c, "label", label_stats)
        if self.rm_trainer is not None:  # fresh on-policy labels for the next reward-model refit
            self.rm_trainer.add.remote(labels)
        return labels

    def _label_beside_the_loop(self, step: int, rollouts: list, save: str | None) -> None:
        """reward.label_share < 1: the judge labels this batch's shards for the reward model's refit buffer (and the
        label files), off the critical path; the loop collects their stats when they finish."""
        critic_pool = self.pools["critic"]
        for k, shard in enumerate(rollouts):
            c = critic_pool.pick()
            labels, label_stats = critic_pool.actors[c].label.options(num_returns=2).remote(shard)
            critic_pool.track(c, label_stats)
            path = save.replace(".parquet", f"-{k:03d}.parquet") if save and len(rollouts) > 1 else save
            self.rm_trainer.add.remote(labels, path)
            self.background_labels.append((step, label_stats))

    def finished_background_labels(self, wait: bool = False) -> dict | None:
        """The summed stats of the labellings made beside the loop that finished (all of them with `wait`); one lost
        to a fault is an event in the run's faults (its batch was trained anyway; the refit sees fewer labels)."""
        refs = [ref for _, ref in self.background_labels]
        if not refs:
            return None
        done = set(ray.wait(refs, num_returns=len(refs), timeout=None if wait else 0, fetch_local=False)[0])
        merged: dict = {}
        for step, ref in [b for b in self.background_labels if b[1] in done]:
            try:
                for key, value in ray.get(ref).items():
                    if isinstance(value, (int, float)):
                        merged[key] = merged.get(key, 0) + value
            except Exception as err:
                if not is_actor_fault(err):
                    raise
                self.faults["events"].append(f"labels of step {step} (beside the loop) lost: {type(err).__name__}")
                self.recover()
        self.background_labels = [b for b in self.background_labels if b[1] not in done]
        if merged:
            merged["judge_calls_per_sample"] = merged.get("judge_calls", 0) / max(merged.get("labeled_samples", 0), 1)
        return merged or None

    def collect(self, batch: InFlight) -> tuple[InFlight, dict]:
        """The batch's stage stats once it is ready; a batch lost to a stage fault is re-issued (after the
        stage is repaired) until it comes through, at most `fault.max_reissues` times in a run."""
        while True:
            try:
                stats = self._stage_stats(batch)
                gen_version = stats["gen"]["policy_version"]
                if self.cfg.learner.algorithm != "sft" and gen_version < batch.expected_version:
                    raise StaleEngine(f"engine {stats['gen'].get('worker')} generated step {batch.step} with "
                                      f"version {gen_version}, expected >= {batch.expected_version} (it restarted)")
                if "reward" in stats and stats["reward"]["rm_version"] < batch.expected_rm:
                    raise StaleEngine(f"the scorer scored step {batch.step} with reward model {stats['reward']['rm_version']}"
                                      f", expected >= {batch.expected_rm} (it restarted)")
                return batch, stats
            except Exception as err:
                self.screen_fault(err, f"step {batch.step}: ")
                self.count_fault(f"step {batch.step}: {type(err).__name__}: {str(err).splitlines()[0][:200]}", err,
                                 "batches")
                self.recover()
                batch = self.launch(batch.step, batch.indices)

    def screen_fault(self, err: BaseException, where: str = "") -> None:
        """Raise `err` again unless it is a stage actor's fault (which the loop survives); the user's reward function
        failing stops the run with its own message."""
        if isinstance(getattr(err, "cause", None), RewardFunctionError):
            raise RunStopped(f"{where}{err.cause}") from None
        if not is_actor_fault(err):
            raise err

    def count_fault(self, reason: str, err: BaseException | None, lost: str) -> None:
        """One stage fault in the run's faults (an event), stopping the run past `fault.max_reissues`; `lost`: what
        the caller re-issues (batches, groups)."""
        self.faults["reissued_batches"] += 1
        self.faults["events"].append(reason)
        if self.faults["reissued_batches"] > self.cfg.fault.max_reissues:
            raise RunStopped(f"{self.faults['reissued_batches']} stage faults (their {lost} re-issued), over "
                             f"fault.max_reissues={self.cfg.fault.max_reissues}; last: {reason}") from err
        log.warning("%s lost to a stage fault (%s): repairing the stages and re-issuing them", lost, reason)

    def _stage_stats(self, batch: InFlight) -> dict:
        """The batch's stage stats, its shards' merged (`merge_shard_stats`), waiting at most `fault.stage_timeout_s`
        for all of them in one `ray.wait`. A call that has not answered by then is alive but stuck (an engine hung
        inside `generate`): the first such call's actor is killed and the batch counts as lost to a fault
        (StageTimeout), so the actor is replaced and the batch re-issued."""
        timeout = self.cfg.fault.stage_timeout_s
        refs = [call.stats for call in batch.calls]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout, fetch_local=False)
        if len(done) < len(refs):
            finished = set(done)
            call = next(call for call in batch.calls if call.stats not in finished)
            ray.kill(self.pools[call.pool].actors[call.index], no_restart=True)
            raise StageTimeout(f"{call.pool} actor {call.index} did not finish the {call.stage} call of step "
                               f"{batch.step} within {timeout:.0f} s (fault.stage_timeout_s): killed")
        per_stage: dict[str, list[dict]] = {}
        for call, stats in zip(batch.calls, ray.get(refs)):
            per_stage.setdefault(call.stage, []).append(stats)
        gen_pool = "critic" if self.cfg.learner.algorithm == "sft" else "rollout"
        return merge_shard_stats(per_stage, {"gen": len(self.pools[gen_pool]), "label": len(self.critics), "reward": 1})

    def sync_weights(self, version: int):
        self.synced_version = version
        return self.weights.send(version)

    def finish_syncs(self, pending) -> list[dict]:
        """Results of a weight sync; an engine that died (or hung) meanwhile is repaired (and resynced) instead."""
        receipts, gone = self.weights.finish(pending, self.version, meanwhile=self.keep_flowing)
        if gone:
            self.recover()
        return receipts

    def warm_up_reward_model(self) -> dict:
        """Canonical RLAIF: fit the reward model on labels of the initial policy's samples (and on `preferences.path`,
        RLHF's offline step) before RL starts.
        Warm-up batches (negative batch numbers: sample ids `s-00001/...`) train only the reward model; they
        are not in the policy's ledger."""
        rcfg = self.cfg.reward
        judged = rcfg.warmup_batches if self.critics else 0  # no judge (label_share 0): the preference file alone
        for k in range(judged):
            indices = self.sampler.next_indices(self.cfg.data.prompts_per_step)
            worker, critic = self.rollouts[k % len(self.rollouts)], self.critics[k % len(self.critics)]
            rollouts, _ = worker.generate.options(num_returns=2).remote(self.prompts_ref, indices, -(k + 1))
            labels, _ = critic.label.options(num_returns=2).remote(rollouts)
            self.rm_trainer.add.remote(labels)
        fit = judged or self.cfg.preferences.path
        stats = trainer_result(self.rm_trainer.fit.remote(rcfg.warmup_steps), "warm-up fit") if fit else {}
        self.load_reward_model()
        return stats

    def load_reward_model(self) -> None:
        self.rm_loads += 1
        trainer_result(self.scorer.load_state.remote(self.rm_trainer.state_dict.remote(), self.rm_loads), "state")

    def evaluate(self) -> dict:
        """Ground-truth accuracy of the current policy on the whole evaluation prompt set (sampled and greedy)."""
        self.weights.bring_up_to_date([0])  # sync.delivery=pull: engine 0 may hold an older version
        return ray.get(self.rollouts[0].evaluate.remote(self.eval_prompts_ref, self.cfg.loop.eval_samples))

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_due(self, step: int, now: float | None = None) -> bool:
        """After step `step` (counted from 0): every `checkpoint.every` steps, and once `checkpoint.every_minutes`
        passed since the last checkpoint (or since this driver started its loop) by `now` (time.monotonic())."""
        c = self.cfg.checkpoint
        now = time.monotonic() if now is None else now
        by_steps = c.every > 0 and (step + 1) % c.every == 0
        by_time = c.every_minutes > 0 and now - self.last_checkpoint >= 60.0 * c.every_minutes
        return by_steps or by_time

    def save(self, step: int, loop_state: dict) -> Path:
        """Checkpoint after `step` steps: learner ranks, reward model, then the loop state; atomic."""
        tmp = checkpoint.begin(self.run_dir, step)
        self.learners.save_state(str(tmp))
        if self.rm_trainer is not None:
            trainer_result(self.rm_trainer.save_state.remote(str(tmp / "reward_model.pt")), "checkpoint")
        state = {"step": step, "version": self.version, "sampler": self.sampler.state(),
                 "config_digest": checkpoint.config_digest(self.cfg),
                 "prompts_digest": self.prompts_digest, "rm_loads": self.rm_loads, **loop_state}
        folder = checkpoint.commit(tmp, state, self.cfg.checkpoint.keep)
        self.last_checkpoint = time.monotonic()
        return folder

    def restore(self, folder: Path, state: dict) -> None:
        """Learners, reward model, prompt cursor and engines as they were when `folder` was written."""
        self.version = self.learners.load_state(str(folder))
        if self.rm_trainer is not None:
            trainer_result(self.rm_trainer.load_state.remote(str(folder / "reward_model.pt")), "restore")
            self.rm_loads = state.get("rm_loads", 1) - 1  # the scorer takes the state under its old number
            self.load_reward_model()
        self.sampler.restore(state["sampler"])
        self.faults.update(state.get("faults", {}))  # the run's faults so far (in place: WeightSync holds the dict)
        self.finish_syncs(self.sync_weights(self.version))

    # ------------------------------------------------------------------ the loop
    def run(self, writer, resume: dict | None = None) -> dict:
        """Steps `start .. loop.num_steps-1` (from a checkpoint's state when resuming): keep the pipeline full,
        take the oldest batch, train on it and sync the weights, log the step, checkpoint when due."""
        loop = self.start_loop(resume or {})
        for step in range(loop.start, self.cfg.loop.num_steps):
            try:
                self.fill_pipeline(loop)
                batch, stats = self.collect(loop.pending[0])  # stays in the loop's state until it is trained
            except NoActorLeft as err:
                self.stop_with_checkpoint(step, writer, loop, err)
            loop.pending.popleft()
            queues = self.queue_depths(loop.pending)
            self.refit_reward_model_if_due(loop, step)
            result, train_wall, sync_stats = self.train_and_sync(loop, batch)
            self.log_step(writer, loop, step, stats, result, train_wall, sync_stats, queues)
            if self.checkpoint_due(step):
                self.save(step + 1, self.loop_state(writer, loop))
        self.finish_syncs(loop.sync)
        background = self.finished_background_labels(wait=True)
        if background:
            loop.tally.add_labels(background)
        return self.summary(loop)

    def stop_with_checkpoint(self, step: int, writer, loop: LoopState, err: NoActorLeft):
        """A stage has no actor left (between steps): checkpoint the `step` steps done, then stop the run."""
        folder = self.save(step, self.loop_state(writer, loop))
        raise NoActorLeft(f"{err}. A checkpoint of the {step} steps done is in {folder}: continue the run with "
                          f"`rlaif-ray train -c CONFIG --resume auto` once the cluster has room") from err

    def start_loop(self, resume: dict) -> LoopState:
        """A fresh loop, or the one a checkpoint held: its counters, and its batches in flight re-launched (same
        steps, same prompts, so the same sample ids)."""
        loop = LoopState(start=resume.get("step", 0), launched=resume.get("launched", 0), tally=Tally.resumed(resume),
                         inflight_max=self.cfg.loop.max_inflight if self.cfg.loop.mode == "async" else 0)
        for b in resume.get("pending", []):
            loop.pending.append(self.launch(b["step"], b["indices"]))
        loop.t_start = loop.last = time.perf_counter()
        loop.last_cpu = time.process_time()
        return loop

    def fill_pipeline(self, loop: LoopState) -> None:
        """Launch batches until `inflight_max` are in flight beyond the one the learner takes next."""
        while loop.launched < self.cfg.loop.num_steps and len(loop.pending) <= loop.inflight_max:
            loop.pending.append(self.launch(loop.launched))
            loop.launched += 1

    def queue_depths(self, pending: deque) -> dict:
        """Unfinished calls per stage, and the batches in flight whose rewards are ready for the learner."""
        return {"queue_gen": self.pools["rollout"].depth(),
                "queue_label": self.pools["critic"].depth() if "critic" in self.pools else 0,
                "queue_reward": self.pools["reward"].depth(),
                "queue_ready": sum(len(ray.wait(b.rewards, num_returns=len(b.rewards), timeout=0, fetch_local=False)[0])
                                   == len(b.rewards) for b in pending)}

    def refit_reward_model_if_due(self, loop: LoopState, step: int) -> None:
        """Every `reward.refresh_every` steps: a refit that runs beside the learner; the scorer takes the new
        weights for later batches."""
        every = self.cfg.reward.refresh_every
        if self.rm_trainer is not None and every and step and step % every == 0:
            loop.rm_fit = self.rm_trainer.fit.remote()
            self.rm_loads += 1
            self.scorer.load_state.remote(self.rm_trainer.state_dict.remote(), self.rm_loads)

    def train_and_sync(self, loop: LoopState, batch: InFlight) -> tuple[dict, float, list[dict]]:
        """One learner step on `batch`, then the new weights sent to every engine. async: the sync is collected a
        step later (it is long done by then); sync: at once."""
        t_train = time.perf_counter()
        # colocated (sync mode: no engine is generating now): engines sleep while the learners step, and the
        # learners empty their cached memory; the engines take their weights' memory back, the new weights, and
        # only then their KV cache
        colocated = self.cfg.learner.colocate
        if colocated:
            ray.get([w.sleep.remote() for w in self.rollouts])
        result = self.learners.train(batch.rewards, meanwhile=self.keep_flowing)
        if colocated:
            ray.get([w.wake_up.remote(["weights"]) for w in self.rollouts])
        train_wall = time.perf_counter() - t_train
        self.version += 1
        sync_stats = self.finish_syncs(loop.sync)
        loop.sync = self.sync_weights(self.version)
        if self.cfg.loop.mode == "sync":
            sync_stats, loop.sync = self.finish_syncs(loop.sync), None
        if colocated:
            ray.get([w.wake_up.remote(["kv_cache"]) for w in self.rollouts])
        return result, train_wall, sync_stats

    def log_step(self, writer, loop: LoopState, step: int, stats: dict, result: dict, train_wall: float,
                 sync_stats: list[dict], queues: dict) -> None:
        """Count the step, write its metrics line and sample outcomes, and stop a run whose judge fails too often."""
        now = time.perf_counter()
        background = self.finished_background_labels()
        if background:  # reward.label_share < 1: the judge's figures of the labellings that finished meanwhile
            stats = {**stats, "label": background}
        loop.tally.add(stats, result["metrics"])
        rm_fit = None
        if loop.rm_fit is not None and ray.wait([loop.rm_fit], timeout=0)[0]:
            rm_fit, loop.rm_fit = trainer_result(loop.rm_fit, f"the refit, step {step}"), None
        metrics = step_metrics(result["metrics"], stats, train_wall=train_wall, step_seconds=now - loop.last,
                               version=self.version, inflight=len(loop.pending), queues=queues,
                               reissued=self.faults["reissued_batches"], rm_fit=rm_fit, sync_stats=sync_stats)
        writer.log_outcomes(step, result["outcome"])
        writer.log_examples(step, result.get("examples", []))
        cpu = time.process_time()  # the driver's own work for this step (its Ray threads included): the controller's cost
        metrics["driver_cpu_seconds"], loop.last, loop.last_cpu = cpu - loop.last_cpu, now, cpu
        writer.log_step(step, metrics)
        check_judge_failures(loop.tally.judge_counts, self.cfg.fault.judge_failure_limit,
                             self.cfg.fault.judge_failure_min_calls)

    def loop_state(self, writer, loop: LoopState) -> dict:
        """What a checkpoint needs of the loop to continue it exactly (see `start_loop`)."""
        return {"launched": loop.launched, "pending": [{"step": b.step, "indices": b.indices} for b in loop.pending],
                **loop.tally.state(loop.wall()), "faults": self.faults, "metrics_lines": writer.metrics_lines,
                "ledger_lines": writer.ledger_lines, "eval_before": self.eval_before}

    def summary(self, loop: LoopState) -> dict:
        cfg, tally, wall = self.cfg, loop.tally, loop.wall()
        gen_actors = len(self.critics) if cfg.learner.algorithm == "sft" else len(self.rollouts)
        summary = {**tally.totals, "final_version": self.version, "wall_seconds": wall,
                   "samples_per_s": tally.totals["generated"] / wall, "mode": cfg.loop.mode, "flow": cfg.loop.flow,
                   "algorithm": cfg.learner.algorithm,
                   "busy_fraction": busy_fractions(tally.busy, wall, {"gen": gen_actors, "label": len(self.critics),
                                                                      "reward": 1, "train": 1}),
                   "dispatched": {name: self.pools[name].dispatched for name in ("rollout", "critic")
                                  if name in self.pools},
                   "placement": self.placement, "faults": self.faults,
                   "weight_sync": {"configured": cfg.sync.method, "method": self.weights.method,
                                   "groups_formed": self.weights.generation}}
        if tally.judge_counts:
            for usage in ray.get([c.usage.remote() for c in self.critics]):
                for key, value in usage.items():
                    tally.judge_counts[key] += value
            summary["judge_report"] = judge_report(tally.judge_counts)
            # the slot-1 log-odds every verdict had taken off (rlaif_ray.judge.calibration): the figures above are after it
            summary["judge_report"]["position_offset"] = ray.get(self.critics[0].slot1_offset.remote())
        return summary

    def save_checkpoint(self, path: Path) -> str:
        return self.learners.save_checkpoint(str(path))

    def shutdown(self) -> None:
        actors = [a for pool in self.pools.values() for a in pool.actors]
        actors += [self.rm_trainer] if self.rm_trainer else []
        actors += self.learners.ranks if self.learners else []
        for actor in actors:
            ray.kill(actor)
        for pg in {pg.id: pg for pg in self.groups.values()}.values():  # colocated stages share one
            remove_placement_group(pg)

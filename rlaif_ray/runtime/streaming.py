"""Group-level streaming (`loop.flow: groups`): prompt groups flow through the stages as their engine finishes them.

Batch mode (rlaif_ray.runtime.orchestrator) sends a step's batch through every stage as one call per shard: the
slowest answer of a shard holds the shard, the judge starts when the shard is complete, the learner waits for the
whole batch. Here an engine's shard call is a Ray generator (`RolloutWorker.generate_groups`) that hands back each
prompt group the moment vLLM finishes its last sample; the driver sends it at once to a judge with no call waiting
behind the one it runs, or, with none, holds it until one is and sends that judge every group that waited meanwhile
(one `label_groups` call: a judge batches many groups in one engine call, as it does a batch's shard), then the groups
to the scorer (one `score_groups` call for the groups of a label call), and the learner takes
`data.prompts_per_step` finished groups per step, oldest first (by step, then batch position), from a bounded
buffer: new prompts are launched a whole step at a time only while at most `loop.max_inflight` steps' worth of
groups are in flight beyond the step the learner takes next (backpressure, as batch mode bounds its batches).
With `rollout.engine_streams` > 1 several shard calls run at once on one engine, their requests batched together
(rlaif_ray.stages.shared_engine); a call waits for the weight version the driver had sent when it made it. While the
driver waits for the learner's step or a weight sync, groups keep moving (`keep_flowing`).

A group's sample ids stay (step, prompt, k) and its sampling seed follows its position in its step's batch, so the
groups, the ledger and (in sync mode, where only one step's groups are in flight) the learning are those of batch
mode. Staleness is per sample as before: a group that waited in the buffer past `loop.max_staleness` versions is
dropped by the learner and counted.

Faults work per group: a shard call whose engine died (or restarted and lost its weights, or hung past
`fault.stage_timeout_s`) loses only the groups it had not handed back, which are re-issued under the same ids; a
group whose judge or scorer died is labelled and scored again from its rollouts. One dead actor is one fault against
`fault.max_reissues`, however many calls it held (`ActorPool.lives`). A checkpoint keeps the groups not trained yet,
which a resumed run launches again.
A stage with no actor present (every one lost, replacements waiting for a node) parks the groups it cannot take:
they go on once an actor is back, and the step waits for that at most `fault.recovery_timeout_s` (then the run
checkpoints and stops, as batch mode does).
"""
from __future__ import annotations

import logging
import math
import queue
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, ObjectRefStreamEndOfStreamError

from rlaif_ray.config import JUDGELESS_REWARDS
from rlaif_ray.runtime.accounting import merge_shard_stats, summed
from rlaif_ray.runtime.faults import NoActorLeft, StaleEngine, StageTimeout
from rlaif_ray.runtime.orchestrator import InFlight, LoopState, Orchestrator, StageCall, shard_indices

log = logging.getLogger(__name__)

# label calls a judge may have waiting behind the one it runs: a group handed back goes at once to a judge that has
# none waiting (so a judge never idles between calls), else it waits on the driver, and the next call takes the
# groups that waited (one judge call for many groups, batched in its engine as a batch's shard is), at most as many
# as batch flow's shard would give a judge (`call_cap`): the judge that frees first does not take a burst whole while
# the others free a moment later with nothing to do
JUDGE_QUEUE = 1


def judge_calls(groups: list[Group], judges: int) -> list[list[Group]]:
    """The label calls for `groups`: per step, its groups spread over at most `judges` calls; a prompt twice in a step
    (a prompt set smaller than a step) goes in two calls, since a judge forms its pairs inside each prompt's group."""
    calls = []
    for step in sorted({g.step for g in groups}):
        left = [g for g in groups if g.step == step]
        while left:
            seen, first, later = set(), [], []
            for g in left:
                (later if g.index in seen else first).append(g)
                seen.add(g.index)
            calls += shard_indices(first, judges)  # (never an empty part)
            left = later
    return calls


def counted_once(stats: dict) -> dict:
    """A label call's stats as its groups after the first carry them: no counts and no seconds (the first group
    carries the call's own, so a step's or a run's sums count the call once); versions, the worker and flags kept."""
    return {k: 0 if summed(k, v) else v for k, v in stats.items()}


@dataclass(eq=False)  # (a group is itself, not its fields: `in` and `remove` compare identities)
class Group:
    """One prompt's samples on their way to the learner."""
    step: int
    index: int                   # the prompt's row in the prompt set
    position: int                # its position in its step's batch: its sampling seed
    expected_version: int        # the engine must hold at least this policy version
    expected_rm: int             # ... and the scorer this reward-model state
    rollouts: object = None      # ObjectRef of its `rollouts` table, once its engine handed it back
    meta: dict | None = None     # what the engine said of it (version, samples, tokens, seconds, worker)
    rewards: object = None       # ObjectRef of its `rewards` table
    carries: bool = True         # it carries the stats of the label call it went in (the call's first group)
    calls: list[StageCall] = field(default_factory=list)  # its label and reward calls

    @property
    def key(self) -> tuple[int, int]:
        return self.step, self.position


@dataclass(eq=False)
class Stream:
    """One `generate_groups` call: a shard of groups on one engine."""
    worker: int
    step: int
    groups: dict[int, Group]     # position -> the shard's groups not handed back yet
    generator: object
    life: int                    # the engine's life when the call was made (ActorPool.lives)
    next_group: list | None = None  # the refs of the next group's table and naming dict, looked up once (`waitable`)

    def actor(self) -> tuple[str, int, int]:
        return "rollout", self.worker, self.life

    def waitable(self):
        """The ref of the dict naming the call's next group, which the driver watches (`_watch`) in place of the
        generator: a wait on a generator looks its next item up again at every wait (at 64 engines, ~200 calls open
        at each of a step's hundreds of waits: a fifth of the driver's Python time); this looks it up once per group,
        through the generator's private `_get_next_ref_n` / `_consume_next_ref_n` (Ray 2.60, pinned by the lock; Ray
        Serve uses them). An error of the call (an actor fault, an exception in the engine) comes in both refs, so
        the dict's raises it."""
        if self.next_group is None:
            self.next_group = self.generator._get_next_ref_n(2)
        return self.next_group[1]


class StreamingOrchestrator(Orchestrator):
    """The Orchestrator with groups, not batches, as the unit that moves through the stages (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.streams: list[Stream] = []
        self.handed: list[Group] = []      # handed back since the driver last sent groups to the judges
        self.labelling: list[Group] = []   # handed back, label and reward calls under way
        self.ready: list[Group] = []       # rewards done: the learner's buffer
        self.gen_calls: list[dict] = []    # stats of shard calls that finished since the last step
        self.pulled: list[dict] = []       # sync.delivery=pull: receipts of the versions engines loaded themselves
        self.parked: list[Group] = []      # groups no engine (parked_labels: no judge or scorer) is present to take
        self.parked_labels: list[Group] = []
        self.faults["reissued_groups"] = 0
        # what finished, as Ray tells it (`_watch`): (what, object, ref) of a group's next dict, a group's reward call,
        # a judge's call, or a ref `keep_flowing` waits for (`awaited`: the ids of those not finished yet)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.awaited: set[int] = set()
        # rollout.engine_streams > 1: group calls run beside each other on an engine (RolloutWorker's "streams" group)
        self.stream_group = {"concurrency_group": "streams"} if self.cfg.rollout.engine_streams > 1 else {}

    # ------------------------------------------------------------------ launching
    def launch(self, step: int, indices: list[int] | None = None, positions: list[int] | None = None) -> None:
        """Submit one step's prompt groups (refs only); `indices` and `positions` given: launch those groups again
        (a resumed run's groups not trained yet), under the same sample ids and seeds."""
        self.take_back()  # replacements that came up since join their pools
        if indices is None:
            indices = self.sampler.next_indices(self.cfg.data.prompts_per_step)
        positions = list(range(len(indices))) if positions is None else positions
        self._launch_groups([Group(step, i, p, self.synced_version, self.rm_loads) for i, p in zip(indices, positions)])

    def _launch_groups(self, groups: list[Group]) -> None:
        """Groups (of one step or several) as shard calls on the least-loaded engines, one step per call."""
        pool = self.pools["rollout"]
        if not pool.present():
            self.parked += groups
            return
        published = self.weights.published()  # sync.delivery=pull: the calls name the weights their engine loads
        extra = {"published": published} if published else {}
        loads = [0] * len(pool)  # open group calls per engine (counted once, not per shard: O(engines) each time)
        for s in self.streams:
            loads[s.worker] += 1
        for step in sorted({g.step for g in groups}):
            mine = [g for g in groups if g.step == step]
            shards = min(self.cfg.rollout.shards_per_batch or len(pool.present()), len(mine))
            for part in shard_indices(mine, shards):
                w = pool.pick(loads=loads)
                loads[w] += 1
                gen = pool.actors[w].generate_groups.options(num_returns="streaming", **self.stream_group).remote(
                    self.prompts_ref, [g.index for g in part], step, [g.position for g in part],
                    min_version=min(g.expected_version for g in part), **extra)
                stream = Stream(w, step, {g.position: g for g in part}, gen, pool.lives[w])
                self.streams.append(stream)
                self._watch("stream", stream, stream.waitable())

    def untrained(self) -> list[Group]:
        """Groups launched and not trained yet, wherever they are (generating, judged, ready, parked)."""
        return ([g for s in self.streams for g in s.groups.values()] + self.handed + self.labelling + self.ready
                + self.parked + self.parked_labels)

    def outstanding(self) -> int:
        return len(self.untrained())

    def fill_pipeline(self, loop: LoopState) -> None:
        """Launch whole steps while at most `max_inflight` steps' worth of groups are in flight beyond the step the
        learner takes next."""
        per_step = self.cfg.data.prompts_per_step
        while loop.launched < self.cfg.loop.num_steps and self.outstanding() <= loop.inflight_max * per_step:
            self.launch(loop.launched)
            loop.launched += 1

    # ------------------------------------------------------------------ moving groups along
    def _label_and_score(self, groups: list[Group]) -> None:
        """Handed-back groups to the judges free (at most `JUDGE_QUEUE` calls waiting behind the one they run), one
        `label_groups` call per judge with a step's groups spread over them, at most `call_cap` groups each, oldest
        first, then one score call for each label call's groups; the groups not sent wait in `handed` for the next
        judge free (pools pruned by the caller)."""
        judged = self.cfg.reward.kind not in JUDGELESS_REWARDS
        if self.scorer is None or (judged and not self.pools["critic"].present()):
            self.parked_labels += groups
            return
        if not judged:
            self._score(groups, [g.rollouts for g in groups], [[] for _ in groups])
            return
        critic_pool = self.pools["critic"]
        loads = critic_pool.loads(prune=False)
        present = critic_pool.present()
        free = [i for i in present if loads[i] <= JUDGE_QUEUE]
        if not free and self.labelling:  # (a judge's call always has its groups in `labelling`)
            self.handed += groups
            return
        if free:  # oldest first, at most `call_cap` to each free judge; the rest wait for the next judge that frees
            groups = sorted(groups, key=lambda g: g.key)
            most = self.call_cap(len(present)) * len(free)
            groups, self.handed = groups[:most], groups[most:] + self.handed
        for call in judge_calls(groups, len(free) or len(present)):
            c = critic_pool.pick(prune=False)
            *labels, label_stats = critic_pool.actors[c].label_groups.options(num_returns=len(call) + 1).remote(
                *[g.rollouts for g in call])
            critic_pool.track(c, label_stats)
            self._watch("judge", c, label_stats)  # a judge that frees takes the groups waiting (`_label_handed`)
            for k, group in enumerate(call):
                group.carries = k == 0
                if self.rm_trainer is not None:
                    self.rm_trainer.add.remote(labels[k])
            label_call = StageCall("label", label_stats, "critic", c, critic_pool.lives[c])
            self._score(call, labels, [[label_call] for _ in call])

    def call_cap(self, judges: int) -> int:
        """The most groups one label call takes: a judge's share of a step's groups, as batch flow's shard call."""
        return math.ceil(self.cfg.data.prompts_per_step / judges)

    def _score(self, groups: list[Group], labels: list, calls: list[list[StageCall]]) -> None:
        """The groups' score call, one for all (after their label calls, `calls`): each then waits in `labelling`
        for its rewards."""
        n = len(groups)
        saves = [str(self.run_dir / "labels" / f"step-{g.step:06d}-g{g.position:04d}.parquet")
                 if self.cfg.output.save_labels else None for g in groups]
        rewards = self.scorer.score_groups.options(num_returns=2 * n).remote(*labels, save_paths=saves)
        self.pools["reward"].track(0, rewards[-1])
        for k, (group, before) in enumerate(zip(groups, calls)):
            group.rewards = rewards[k]
            group.calls = before + [StageCall("reward", rewards[n + k], "reward", 0, self.pools["reward"].lives[0])]
            self.labelling.append(group)
            self._watch("group", group, rewards[n + k])

    def _label_handed(self) -> None:
        """The groups handed back and not sent yet, to the judges free now (one call per judge, not per group; the
        judges' counts kept by their calls' events, not by a wait over every call)."""
        if self.handed:
            groups, self.handed = self.handed, []
            self._label_and_score(groups)

    def _advance(self, stream: Stream) -> None:
        """The call's next group is handed back (its naming dict is there, and so its table, yielded before it): the
        group moves on to its judge; the call's last group's dict carries the call's stats, and ends it. Raises the
        call's error (an actor fault, a stale engine). Called for the event of the dict `waitable` looked up."""
        table, name = stream.next_group
        try:
            value = ray.get(name)
        except ObjectRefStreamEndOfStreamError:
            raise RuntimeError(f"rollout worker {stream.worker} ended step {stream.step}'s shard without "
                               f"{len(stream.groups)} of its groups") from None
        stream.generator._consume_next_ref_n(2)
        stream.next_group = None
        closing = value.pop("closing", None)
        group = stream.groups.pop(value["position"])
        group.rollouts, group.meta = table, value
        if value["version"] < group.expected_version:
            stream.groups[group.position] = group  # lost with the rest of the call
            raise StaleEngine(f"engine {value['worker']} generated step {group.step} with version {value['version']}"
                              f", expected >= {group.expected_version} (it restarted)")
        self.handed.append(group)  # to a judge once every call that finished was read (`_label_handed`)
        if closing is not None:  # the call's last group: its end is not waited for (no wake-up of its own)
            self.streams.remove(stream)
            self._closed(closing)
        elif stream.groups:
            self._watch("stream", stream, stream.waitable())

    def _finish(self, group: Group) -> None:
        """A group whose reward call finished: into the learner's buffer, once its stats say it is sound."""
        self.labelling.remove(group)
        stats = ray.get([call.stats for call in group.calls])
        reward = stats[-1]
        if reward["rm_version"] < group.expected_rm:
            raise StaleEngine(f"the scorer scored a group of step {group.step} with reward model "
                              f"{reward['rm_version']}, expected >= {group.expected_rm} (it restarted)")
        stats = [s if call.stage != "label" or group.carries else counted_once(s) for call, s in zip(group.calls, stats)]
        group.meta = {**group.meta, "stage_stats": {call.stage: s for call, s in zip(group.calls, stats)}}
        self.ready.append(group)

    def _watch(self, what: str, obj, ref) -> None:
        """Ray puts `(what, obj, ref)` in `events` once `ref` is there (or failed): each ref is handed to Ray once, and
        the driver waits on a queue, not with a `ray.wait` over every call in flight (which costs the driver, at each
        event, as much as the calls it looks at: ~250 at 64 engines; two thirds of the driver's Python time went to
        those waits). `ObjectRef._on_ready` is Ray's private hook for this (Ray 2.60, pinned by the lock; Ray Serve
        waits on its replicas' streams with it); it neither fetches nor reads the object."""
        ref._on_ready(lambda _error: self.events.put((what, obj, ref)))

    def _pump(self, timeout: float) -> bool:
        """Move along the next group or call that finished, waiting at most `timeout` for one; whether one moved
        (False: none did, or one of the refs `keep_flowing` waits for finished). Events of what was dropped meanwhile
        (a call lost to a fault, a group labelled again) are passed over."""
        end = time.monotonic() + timeout
        while True:
            try:
                what, obj, ref = self.events.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                return False
            if what == "stream":
                if obj not in self.streams or obj.next_group is None or obj.next_group[1] is not ref:
                    continue
                self._guard(lambda: self._advance(obj), lost=lambda: self._lose_stream(obj), actor=obj.actor)
            elif what == "group":
                if obj not in self.labelling or obj.calls[-1].stats is not ref:
                    continue
                self._guard(lambda: self._finish(obj), lost=lambda: self._relabel(obj),
                            actor=lambda: self._failed_call(obj))
            elif what == "judge":
                self.pools["critic"].forget(obj, ref)
                if not self.handed:
                    continue
            elif id(ref) in self.awaited:  # "awaited"
                self.awaited.discard(id(ref))
                return False
            else:
                continue
            self._label_handed()
            return True

    def _closed(self, stats: dict) -> None:
        """A group call's stats (its last group's dict carries them: the call's end is not worth a wake-up of its own,
        a third of the driver's wake-ups at 64 engines): the engine's busy seconds for the step's stats, and the
        receipt of the version it loaded (pull)."""
        if "sync" in stats:
            self.pulled.append(stats.pop("sync"))
        self.gen_calls.append(stats)

    def train_and_sync(self, loop: LoopState, batch: InFlight) -> tuple[dict, float, list[dict]]:
        """As batch mode's; the step's sync stats with the receipts of the versions engines loaded themselves
        (sync.delivery=pull) in the calls that closed since the last step."""
        result, train_wall, sync_stats = super().train_and_sync(loop, batch)
        pulled, self.pulled = self.pulled, []
        return result, train_wall, sync_stats + pulled

    def keep_flowing(self, refs: list, every: bool, timeout: float) -> None:
        """Groups keep moving (handed back, labelled, scored) while the driver waits for the learner's step or a
        weight sync: returns once one of `refs` is done (`every`: all), or after `timeout` s."""
        end = time.monotonic() + timeout
        self.awaited = {id(ref) for ref in refs}
        for ref in refs:
            self._watch("awaited", None, ref)
        try:
            while self.awaited if every else len(self.awaited) == len(refs):
                if (left := end - time.monotonic()) <= 0:
                    return
                self._pump(left)
        finally:
            self.awaited = set()

    # ------------------------------------------------------------------ faults
    def _guard(self, work, lost, actor) -> None:
        """Run `work`; an actor fault in it costs what `lost` re-issues (after the stages are repaired). `actor()`: the
        (pool, index, life) of the call that failed."""
        try:
            work()
        except Exception as err:
            self.screen_fault(err)
            self._fault(f"{type(err).__name__}: {str(err).splitlines()[0][:200]}", err, lost, actor())

    def _fault(self, reason: str, err: BaseException | None, lost, actor: tuple[str, int, int]) -> None:
        """A call lost to a fault of `actor` (pool, index, life): counted once per life of the actor (its other calls
        of that life die with it: the same fault), then the stages repaired and `lost` re-issued."""
        pool, index, life = actor
        if self.pools[pool].lives[index] == life:
            self.pools[pool].lives[index] += 1
            self.count_fault(reason, err, "groups")
        self.recover()
        lost()

    @staticmethod
    def _failed_call(group: Group) -> tuple[str, int, int]:
        """The label or reward call of `group` that raised (a scorer that answered on a stale reward model: its own)."""
        for call in group.calls:
            try:
                ray.get(call.stats, timeout=0)
            except GetTimeoutError:
                continue
            except Exception:
                return call.pool, call.index, call.life
        return group.calls[-1].pool, group.calls[-1].index, group.calls[-1].life

    def _lose_stream(self, stream: Stream) -> None:
        """A shard call that failed: the groups it had not handed back go out again, same ids and seeds."""
        if stream in self.streams:
            self.streams.remove(stream)
        groups = list(stream.groups.values())
        for g in groups:
            g.expected_version, g.expected_rm = self.synced_version, self.rm_loads
        self.faults["reissued_groups"] += len(groups)
        self._launch_groups(groups)

    def _relabel(self, group: Group) -> None:
        """A group whose judge or scorer failed: labelled and scored again from its rollouts."""
        if group in self.labelling:
            self.labelling.remove(group)
        group.expected_rm = self.rm_loads
        self.faults["reissued_groups"] += 1
        self._prune_judging()
        self._label_and_score([group])

    def _kill_the_stuck(self, timeout: float) -> None:
        """Nothing moved for `fault.stage_timeout_s`: the oldest call still open is alive but stuck (an engine hung in
        `generate_groups`): its actor is killed, and its groups go the way of a dead actor's."""
        if self.streams:
            stream = self.streams[0]
            reason = (f"rollout actor {stream.worker} did not finish the gen call of step {stream.step} within "
                      f"{timeout:.0f} s (fault.stage_timeout_s): killed")
            ray.kill(self.pools["rollout"].actors[stream.worker], no_restart=True)
            self.streams.remove(stream)
            self._fault(reason, StageTimeout(reason), lambda: self._lose_stream(stream), stream.actor())
            return
        group = self.labelling[0]
        finished = set(ray.wait([c.stats for c in group.calls], num_returns=len(group.calls), timeout=0)[0])
        call = next(c for c in group.calls if c.stats not in finished)
        reason = (f"{call.pool} actor {call.index} did not finish the {call.stage} call of a group of step "
                  f"{group.step} within {timeout:.0f} s (fault.stage_timeout_s): killed")
        ray.kill(self.pools[call.pool].actors[call.index], no_restart=True)
        self._fault(reason, StageTimeout(reason), lambda: self._relabel(group), (call.pool, call.index, call.life))

    def _prune_judging(self) -> None:
        """The judge and scorer pools' finished calls forgotten, before label and score calls pick from their counts."""
        for pool in ("critic", "reward"):
            if pool in self.pools:
                self.pools[pool].prune()

    def _unpark(self) -> None:
        """Groups parked for want of an actor go on with the ones back; with nothing else under way, the stage waits
        for one (NoActorLeft after `fault.recovery_timeout_s`)."""
        self.take_back(wait=not self.streams and not self.labelling)
        groups, labels, self.parked, self.parked_labels = self.parked, self.parked_labels, [], []
        if groups:
            self._launch_groups(groups)
        self._prune_judging()
        if labels:
            self._label_and_score(labels)

    # ------------------------------------------------------------------ the learner's side
    def take(self, count: int) -> list[Group]:
        """`count` finished groups, oldest first, waiting for them (and moving everything else along meanwhile)."""
        timeout = self.cfg.fault.stage_timeout_s
        quiet_since = time.monotonic()
        while len(self.ready) < count:
            if self.parked or self.parked_labels:
                self._unpark()
            if not self.streams and not self.labelling and not self.handed:
                raise RuntimeError(f"the learner needs {count} groups, {len(self.ready)} are finished and none is "
                                   "under way")
            if self._pump(timeout=max(0.0, quiet_since + timeout - time.monotonic())):
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= timeout:
                self._kill_the_stuck(timeout)
                quiet_since = time.monotonic()
        while self._pump(timeout=0):  # whatever else finished: counted in this step's queues
            pass
        self.ready.sort(key=lambda g: g.key)
        taken, self.ready = self.ready[:count], self.ready[count:]
        return taken

    def step_stats(self, groups: list[Group]) -> dict:
        """The stage stats of a step made of `groups`, in the shape batch mode's merged shard stats have: generation
        from the groups (samples, tokens, the oldest version, the slowest group's seconds since its call started)
        and the engines' busy seconds from the shard calls that finished since the last step."""
        metas = [g.meta for g in groups]
        calls, self.gen_calls = self.gen_calls, []
        gen = {"gen_samples": sum(m["samples"] for m in metas), "gen_tokens": sum(m["tokens"] for m in metas),
               "policy_version": min(m["version"] for m in metas), "gen_seconds": max(m["seconds"] for m in metas),
               "worker": metas[0]["worker"], "shards": len(calls),
               # an engine's busy time once however many of its calls overlapped (rollout.engine_streams)
               "busy_seconds": sum(c.get("busy_seconds", c["gen_seconds"]) for c in calls),
               "engine_seconds": sum(c["engine_seconds"] for c in calls)}
        per_stage: dict[str, list[dict]] = {}
        for m in metas:
            for stage, stats in m["stage_stats"].items():
                per_stage.setdefault(stage, []).append(stats)
        merged = merge_shard_stats(per_stage, {"label": len(self.critics), "reward": 1})
        reward = merged.get("reward", {})
        for key in [k for k in reward if k.startswith("reward_") and k != "reward_seconds"]:
            reward[key] /= len(per_stage["reward"])  # reward.functions: each part's mean over the groups
        return {"gen": gen, **merged}

    def queue_depths(self, pending) -> dict:
        return {"queue_gen": sum(len(s.groups) for s in self.streams),
                "queue_label": self.pools["critic"].depth() if "critic" in self.pools else 0,
                "queue_reward": self.pools["reward"].depth(), "queue_ready": len(self.ready)}

    # ------------------------------------------------------------------ the loop
    def run(self, writer, resume: dict | None = None) -> dict:
        """Steps `start .. loop.num_steps-1`: keep groups flowing, take `prompts_per_step` finished ones, train on
        them and sync the weights, log the step, checkpoint when due."""
        loop = self.start_loop(resume or {})
        per_step = self.cfg.data.prompts_per_step
        for step in range(loop.start, self.cfg.loop.num_steps):
            try:
                self.fill_pipeline(loop)
                groups = self.take(per_step)
            except NoActorLeft as err:
                self.stop_with_checkpoint(step, writer, loop, err)
            stats = self.step_stats(groups)
            queues = self.queue_depths(None)
            loop.pending = [None] * self.outstanding()  # the metrics' `inflight`: groups in flight
            self.refit_reward_model_if_due(loop, step)
            batch = InFlight(step, [g.index for g in groups], rewards=[g.rewards for g in groups])
            result, train_wall, sync_stats = self.train_and_sync(loop, batch)
            self.log_step(writer, loop, step, stats, result, train_wall, sync_stats, queues)
            if self.checkpoint_due(step):
                self.save(step + 1, self.loop_state(writer, loop))
        while self.streams:  # calls with groups still to hand back (none once every launched group was taken)
            self._pump(timeout=self.cfg.fault.stage_timeout_s)
        self.gen_calls = []
        self.finish_syncs(loop.sync)
        return self.summary(loop)

    def start_loop(self, resume: dict) -> LoopState:
        """A fresh loop, or the one a checkpoint held, with its groups not trained yet launched again."""
        loop = super().start_loop({k: v for k, v in resume.items() if k != "pending"})
        for part in resume.get("pending", []):
            self.launch(part["step"], part["indices"], part["positions"])
        return loop

    def loop_state(self, writer, loop: LoopState) -> dict:
        """As batch mode's (`Orchestrator.loop_state`), with the groups not trained yet (per step: their prompt rows
        and batch positions) where batch mode keeps its batches in flight."""
        groups = self.untrained()
        steps = sorted({g.step for g in groups})
        pending = [{"step": s, "indices": [g.index for g in groups if g.step == s],
                    "positions": [g.position for g in groups if g.step == s]} for s in steps]
        return {"launched": loop.launched, "pending": pending, **loop.tally.state(loop.wall()),
                "faults": self.faults, "metrics_lines": writer.metrics_lines, "ledger_lines": writer.ledger_lines,
                "eval_before": self.eval_before}

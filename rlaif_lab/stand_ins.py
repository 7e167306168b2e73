"""Stand-in stage actors for the scale simulation (`jobs/scale_sim.py`): the real Orchestrator, pools, placement
groups, weight-sync bookkeeping and fault handling drive these in place of vLLM engines, judges, the scorer and
DeepSpeed ranks, so the controller can be watched at 64 engines on one machine.

Each stand-in has the real actor's constructor and the methods the loop calls, takes and returns tables of the
declared schemas (`rlaif_ray.data.schemas`, validated as the real stages do), and takes as long as the `Profile`
says the real stage would on the profiled hardware, times `time_scale`: the work it does itself (building the
table) counts against that time, and it sleeps the rest. Response lengths follow the profile's distribution
(`Profile.lengths`: the same for everyone, uniform, or long-tailed), drawn per sample id, so an engine's shard takes
as long as its longest answer at one stream's speed at least. What they do not model: contention between stages on a
node, network time for tables (they cross Ray's object store for real), and slow or failing hardware.
"""
from __future__ import annotations

import hashlib
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import ray

from rlaif_ray.config import RunConfig
from rlaif_ray.data import schemas
from rlaif_ray.data.transport import use_arrow_ipc
from rlaif_ray.judge.pairs import select_pairs
from rlaif_ray.stages.group_calls import GroupLabels, GroupScores
from rlaif_ray.stages.reward import rewards_from_labels
from rlaif_ray.stages.shared_engine import BusyClock


LENGTHS = ("fixed", "uniform", "long_tail")  # Profile.lengths


@dataclass(frozen=True)
class Profile:
    """Service times of a 7B policy on H100-class engines with a 70B judge (every figure an input; README "Scale").

    Sources: `engine_tokens_per_s` and `judge_decode_tokens_per_s` are issue 16's figures (vLLM, one engine per
    H100 for the 7B; a 70B judge engine generating ~1,200 tokens/s); prefill at 10x decode throughput and a
    single stream at 100 tokens/s (a shard never finishes faster than its longest answer) are assumptions of the
    usual order for vLLM on H100; the learner is FLOP-bound: 6·N per trained token plus 2·N for the reference's
    forward, at 40% of an H100's 989 dense bf16 TFLOP/s per rank; a sync broadcasts the bf16 weights at 20 GB/s
    (NCCL over NVLink/InfiniBand, one broadcast whatever the engine count).

    Response lengths (`lengths`), each with the mean `response_tokens` so that only their spread differs: `fixed`
    (every answer that long), `uniform` (1 .. 2·mean − 1 tokens) and `long_tail` (log-normal with σ =
    `length_sigma`, cut at `max_response_tokens`). σ = 0.8 gives p99 / p50 ≈ 6: chat and reasoning answers sampled
    at temperature 1 are skewed like this, a few answers several times the median, up to the generation limit (the
    long-tail motivation of AReaL, veRL's fully-async trainer and slime; their papers report the skew, not one
    distribution, so σ is an assumption of that order). A sample's length is drawn from its id: a re-issued batch
    has the same lengths."""
    name: str = "7B policy (H100 engines), 70B judge"
    policy_params: float = 7.6e9
    prompt_tokens: int = 256
    response_tokens: int = 512
    engine_tokens_per_s: float = 6000.0        # generated tokens/s of one rollout engine at full batch
    stream_tokens_per_s: float = 100.0         # one sequence alone (the floor of a shard's time)
    judge_prompt_tokens: int = 1400            # question + two answers + instructions
    judge_reply_tokens: int = 4                # the verdict
    judge_prefill_tokens_per_s: float = 12000.0
    judge_decode_tokens_per_s: float = 1200.0
    learner_flops_per_s: float = 0.4 * 989e12  # per rank
    sync_bytes_per_s: float = 20e9
    reward_seconds: float = 0.001              # win-rate arithmetic per call
    time_scale: float = 0.01                   # simulated seconds per profiled second
    lengths: str = "fixed"                     # fixed | uniform | long_tail
    length_sigma: float = 0.8                  # long_tail: σ of the log-normal
    max_response_tokens: int = 8192            # long_tail: the generation limit (rollout.max_new_tokens)

    def __post_init__(self):
        if self.lengths not in LENGTHS:
            raise ValueError(f"Profile.lengths={self.lengths!r}: one of {', '.join(LENGTHS)}")

    def response_lengths(self, sample_ids: list[str]) -> np.ndarray:
        """Each sample's response tokens, drawn from its id (the same id, the same length)."""
        mean = self.response_tokens
        if self.lengths == "fixed":
            return np.full(len(sample_ids), mean, dtype=np.int64)
        u = np.asarray([(int.from_bytes(hashlib.blake2b(s.encode(), digest_size=6).digest(), "big") + 0.5) / 2 ** 48
                        for s in sample_ids])  # uniform in (0, 1), one value per id
        if self.lengths == "uniform":
            return np.floor(1 + u * (2 * mean - 1)).astype(np.int64)
        from statistics import NormalDist
        z = np.asarray([NormalDist().inv_cdf(x) for x in u])
        median = mean * math.exp(-self.length_sigma ** 2 / 2)  # the log-normal's mean is median·exp(σ²/2)
        return np.clip(np.round(median * np.exp(self.length_sigma * z)), 1, self.max_response_tokens).astype(np.int64)

    def finish_seconds(self, lengths) -> np.ndarray:
        """When each of a shard's answers (this long, all started together) is done: the engine shares its
        `engine_tokens_per_s` among the answers still running, none faster than `stream_tokens_per_s` (continuous
        batching: as answers finish, the rest speed up until each runs at one stream's speed)."""
        lengths = np.asarray(lengths, dtype=np.float64)
        order, finish = np.argsort(lengths, kind="stable"), np.empty(len(lengths))
        t, made = 0.0, 0.0  # every running answer has made the same tokens so far
        for k, i in enumerate(order):
            t += (lengths[i] - made) / min(self.stream_tokens_per_s, self.engine_tokens_per_s / (len(lengths) - k))
            made, finish[i] = lengths[i], t
        return finish

    def shard_seconds(self, lengths) -> float:
        """An engine's time for a shard of answers this long: until its last answer is done (`finish_seconds`): at
        least its tokens at full-batch speed and its longest answer at one stream's speed."""
        return float(self.finish_seconds(lengths).max())

    def gen_seconds(self, samples: int, draws: int = 400) -> float:
        """The expected time of a shard of `samples` answers (fixed lengths: exact; else the mean over `draws`
        shards of seeded draws)."""
        if self.lengths == "fixed":
            return self.shard_seconds([self.response_tokens] * samples)
        ids = [f"bound-{d}-{k}" for d in range(draws) for k in range(samples)]
        lengths = self.response_lengths(ids).reshape(draws, samples)
        return float(np.mean([self.shard_seconds(row) for row in lengths]))

    def judge_call_seconds(self) -> float:
        return (self.judge_prompt_tokens / self.judge_prefill_tokens_per_s
                + self.judge_reply_tokens / self.judge_decode_tokens_per_s)

    def train_seconds(self, samples: int, ranks: int, reference: bool) -> float:
        flops = (8 if reference else 6) * self.policy_params * samples * (self.prompt_tokens + self.response_tokens)
        return flops / (ranks * self.learner_flops_per_s)

    def sync_seconds(self) -> float:
        return 2 * self.policy_params / self.sync_bytes_per_s

    def to_dict(self) -> dict:
        return asdict(self)


def judge_calls(group_size: int, mode: str, k: int) -> int:
    """Judge prompts for one prompt group: its selected pairs (`critic.pairs`), each in both orders."""
    return 2 * len(select_pairs(group_size, mode, k, seed="sim"))


def _settle(t0: float, seconds: float) -> float:
    """Sleep until `seconds` after t0 (work already done counts against it); the time actually taken."""
    left = seconds - (time.perf_counter() - t0)
    if left > 0:
        time.sleep(left)
    return time.perf_counter() - t0


def _lists(rows: int, width: int, dtype, value=0) -> pa.Array:
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, pa.array(np.full(rows * width, value, dtype=dtype)))


class _Stage:
    profile = Profile()  # `stand_ins(profile)` makes subclasses with another

    def __init__(self, cfg: dict):
        use_arrow_ipc()
        self.cfg = RunConfig.model_validate(cfg)

    def _wait(self, t0: float, profiled_seconds: float) -> float:
        return _settle(t0, profiled_seconds * self.profile.time_scale)

    def ready(self) -> int:
        return 0


class StandInEngine(_Stage):
    """A rollout engine: `samples_per_prompt` answers of `response_tokens` tokens per prompt."""
    table_tokens = 16  # token ids actually carried per answer (the table's size is not what is simulated)

    def __init__(self, model_path: str, cfg: dict, worker_index: int = 0):
        super().__init__(cfg)
        self.worker_index, self.version = worker_index, 0
        self.clock = SharedClock(self.profile)  # the answers of the group calls running at once
        self.stream_slots = threading.BoundedSemaphore(self.cfg.rollout.engine_streams)
        self.busy = BusyClock()  # as the real engine's: overlapping group calls' busy time counted once
        self.pulling = threading.Lock()

    def generate(self, prompts: pa.Table, indices: list[int], step: int, first: int = 0) -> tuple[pa.Table, dict]:
        t0 = time.perf_counter()
        table = self._rollouts(prompts, indices, step)
        lengths = self.profile.response_lengths(table.column("sample_id").to_pylist())
        seconds = self._wait(t0, self.profile.shard_seconds(lengths))
        return table, self._stats(seconds, lengths)

    def generate_groups(self, prompts: pa.Table, indices: list[int], step: int, positions: list[int],
                        min_version: int = 0, published: tuple | None = None):
        """As the real engine's (loop.flow: groups): each prompt group's table and the dict naming it when its last
        answer is done, the last one with the call's stats. The answers of every group call running on this engine at
        once (rollout.engine_streams) share it (`SharedClock`; one call alone: `Profile.finish_seconds`)."""
        t0 = time.perf_counter()
        n = self.cfg.rollout.samples_per_prompt
        table = self._rollouts(prompts, indices, step)
        lengths = self.profile.response_lengths(table.column("sample_id").to_pylist())
        with self.stream_slots:
            pulled = self._pull(published)
            deadline = time.monotonic() + self.cfg.sync.timeout_s
            while self.version < min_version and time.monotonic() < deadline:  # an update beside it (as the real one)
                time.sleep(0.001)
            with self.busy.call():
                keys, version = self.clock.add(lengths, lambda: self.version)
                # the version its answers start under, as the real engine's tables carry (not the one it had when
                # the call came: a call waiting for a stream slot, or for an update, starts under a later one)
                column = table.schema.get_field_index("policy_version")
                table = table.set_column(column, table.schema.field(column), pa.array([version] * table.num_rows,
                                                                                       pa.int64()))
                seconds, pending = [], list(range(len(indices)))
                while pending:
                    finished = self.clock.wait_for_any([keys[g * n:(g + 1) * n] for g in pending])
                    for g in [pending[k] for k in finished]:
                        pending.remove(g)
                        seconds.append(time.perf_counter() - t0)
                        yield table.take(pa.array(np.arange(g * n, (g + 1) * n)))
                        name = {"position": positions[g], "version": version, "samples": n, "seconds": seconds[-1],
                                "tokens": int(lengths[g * n:(g + 1) * n].sum()), "worker": self.worker_index}
                        if not pending:  # the last group's name carries the call's stats (as the real engine's)
                            name["closing"] = {**self._stats(seconds[-1], lengths), "policy_version": version,
                                               "group_seconds": seconds, "busy_seconds": self.busy.take(),
                                               **({"sync": pulled} if pulled else {})}
                        yield name

    def _pull(self, published: tuple | None) -> dict | None:
        """As the real engine's (sync.delivery=pull): the published version loaded if this engine holds an older one."""
        if published is None or self.version >= published[0]:
            return None
        with self.pulling:
            return None if self.version >= published[0] else self.update_weights(ray.get(published[1][0]), published[0])

    def _stats(self, seconds: float, lengths: np.ndarray) -> dict:
        return {"gen_seconds": seconds, "engine_seconds": seconds, "gen_tokens": int(lengths.sum()),
                "gen_samples": len(lengths), "policy_version": self.version, "worker": self.worker_index}

    def _rollouts(self, prompts: pa.Table, indices: list[int], step: int) -> pa.Table:
        """The `rollouts` table of a shard: `samples_per_prompt` placeholder answers per prompt, the real ids."""
        n = self.cfg.rollout.samples_per_prompt
        rows = prompts.take(pa.array(indices, pa.int64())).select(["prompt_id", "prompt", "reference"])
        pids = [pid for pid in rows.column("prompt_id").to_pylist() for _ in range(n)]
        total = len(pids)
        table = pa.Table.from_pydict({
            "sample_id": [schemas.sample_id(step, pid, k % n) for k, pid in enumerate(pids)],
            "prompt_id": pids, "group_index": np.tile(np.arange(n, dtype=np.int32), len(indices)),
            "prompt": np.repeat(np.asarray(rows.column("prompt").to_pylist(), dtype=object), n).tolist(),
            "prompt_token_ids": _lists(total, self.table_tokens, np.int32, 1),
            "response": [""] * total, "response_token_ids": _lists(total, self.table_tokens, np.int32, 2),
            "response_logprobs": _lists(total, self.table_tokens, np.float32, -1.0),
            "finish_reason": ["stop"] * total, "policy_version": [self.version] * total,
            "token_versions": [None] * total,
            "reference": np.repeat(np.asarray(rows.column("reference").to_pylist(), dtype=object), n).tolist(),
        }, schema=schemas.ROLLOUT_SCHEMA)
        return schemas.validate(table, "rollouts")

    def update_weights(self, weights, version: int) -> dict:
        """As the real engine's: the answers in flight finish under the old weights first (new ones held back), or
        (rollout.in_flight_update: continue) wait while the weights load and go on (recomputing their KV is not
        modelled: prefill runs at 10x decode)."""
        continuing = self.cfg.rollout.in_flight_update == "continue"
        with self.clock.paused() if continuing else self.clock.exclusive():
            t0 = time.perf_counter()
            seconds = self._wait(t0, self.profile.sync_seconds())
            self.version = version
        return {"ok": True, "method": "object_store", "sync_seconds": seconds,
                "sync_bytes": int(2 * self.profile.policy_params), "version": version, "worker": self.worker_index}


class SharedClock:
    """The answers running on one stand-in engine, in profiled seconds: the engine's `engine_tokens_per_s` shared
    among them, none faster than `stream_tokens_per_s` (as `Profile.finish_seconds`, but answers join while others
    run). Calls poll it: it advances to the present each time it is asked."""

    def __init__(self, profile: Profile):
        self.profile, self.lock, self.open = profile, threading.Lock(), threading.Event()
        self.open.set()
        self.t0, self.t = time.perf_counter(), 0.0
        self.left: dict[int, float] = {}   # answer -> tokens still to make
        self.done: set[int] = set()
        self.next_key = 0

    def _now(self) -> float:
        return (time.perf_counter() - self.t0) / self.profile.time_scale

    def _rate(self) -> float:
        return min(self.profile.stream_tokens_per_s, self.profile.engine_tokens_per_s / len(self.left))

    def _sleep_to_next_finish(self, ahead: float) -> None:
        time.sleep(max(ahead * self.profile.time_scale, 1e-4))

    def _ahead(self) -> float:
        """Profiled seconds until the next running answer can be done (answers joining later only delay it)."""
        return min(self.left.values()) / self._rate() if self.left else 0.0

    def _advance(self) -> None:
        now = self._now()
        while self.left and self.t < now:
            rate, first = self._rate(), min(self.left.values())
            step = min(first / rate, now - self.t)
            self.t += step
            for key in list(self.left):
                self.left[key] -= step * rate
                if self.left[key] <= 1e-6:
                    del self.left[key]
                    self.done.add(key)
        self.t = max(self.t, now)

    def add(self, lengths, version) -> tuple[list[int], int]:
        """The answers' keys, and `version()` read as they join (under the lock a continuing update holds while it
        loads: the version they start under, as the real engine's `on_added`)."""
        self.open.wait()
        with self.lock:
            self._advance()
            keys = list(range(self.next_key, self.next_key + len(lengths)))
            self.next_key += len(lengths)
            self.left.update(zip(keys, (float(x) for x in lengths)))
            return keys, version()

    def wait_for_any(self, groups: list[list[int]]) -> list[int]:
        """The indices of the groups whose answers are all done, once there is at least one (each group is asked
        for until it is returned, once: its answers are forgotten then)."""
        while True:
            with self.lock:
                self._advance()
                finished = [i for i, keys in enumerate(groups) if all(k in self.done for k in keys)]
                for i in finished:
                    self.done.difference_update(groups[i])
                ahead = self._ahead()
            if finished:
                return finished
            self._sleep_to_next_finish(ahead)

    @contextmanager
    def paused(self):
        """The answers running make no progress while this is held (a weight update that continues them)."""
        with self.lock:
            self._advance()
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.t0 += time.perf_counter() - t0  # the pause is not engine time

    @contextmanager
    def exclusive(self):
        """New answers held back until the ones running are done (a weight update between two policy versions)."""
        self.open.clear()
        try:
            while True:
                with self.lock:
                    self._advance()
                    if not self.left:
                        break
                    ahead = self._ahead()
                self._sleep_to_next_finish(ahead)
            yield
        finally:
            self.open.set()


class StandInJudge(GroupLabels, _Stage):
    """A pairwise judge: `critic.pairs` pairs per group in both orders, `judge_call_seconds` each."""

    def __init__(self, model_path: str, cfg: dict, worker_index: int = 0):
        super().__init__(cfg)
        self.rng = np.random.default_rng(worker_index)

    def label(self, rollouts: pa.Table, method: str | None = None, pairs: str | None = None) -> tuple[pa.Table, dict]:
        t0 = time.perf_counter()
        rollouts = schemas.validate(rollouts, "rollouts")
        c, n = self.cfg.critic, rollouts.num_rows
        groups = len(set(rollouts.column("prompt_id").to_pylist()))
        calls = groups * judge_calls(self.cfg.rollout.samples_per_prompt, pairs or c.pairs, c.pairs_k)
        cols = {"label_method": pa.array(["pairwise"] * n), "judge_model": pa.array(["stand-in"] * n),
                "label_valid": pa.array([True] * n), "label_latency_s": pa.array(np.zeros(n, np.float32)),
                "win_prob": pa.array(self.rng.random(n).astype(np.float32)),
                **{name: pa.array([[]] * n, pa.list_(t)) for name, t in
                   (("pair_partner_ids", pa.string()), ("pair_win_probs", pa.float32()),
                    ("pair_position_agree", pa.bool_()), ("pair_slot1_probs", pa.float32()))}}
        table = rollouts
        for f in schemas.LABEL_FIELDS:
            table = table.append_column(f, cols[f.name] if f.name in cols else pa.nulls(n, f.type))
        table = schemas.validate(table, "labels")
        seconds = self._wait(t0, calls * self.profile.judge_call_seconds())
        return table, {"label_seconds": seconds, "labeled_samples": n, "label_valid": n, "judge_calls": calls,
                       "judge_cache_hits": 0, "judge_calls_per_sample": calls / max(n, 1)}

    def usage(self) -> dict:
        return {}

    def slot1_offset(self) -> float:
        return 0.0  # no position calibration: the stand-in reads no verdicts


class StandInScorer(GroupScores, _Stage):
    """The reward stage (the real rule: rlaif_ray.stages.reward.rewards_from_labels) with the profile's time."""

    def __init__(self, kind: str, reward_model_path: str | None = None, score_points: int = 10,
                 checker: str = "exact", functions: list[dict] | None = None):
        use_arrow_ipc()
        if functions:
            raise ValueError("the scale simulation's stand-in scorer has no reward.functions: leave them out")
        self.kind, self.score_points, self.rm_version = kind, score_points, 0

    def ready(self) -> int:
        return self.rm_version

    def score(self, *shards: pa.Table, save_path: str | None = None) -> tuple[pa.Table, dict]:
        t0 = time.perf_counter()
        labels = schemas.validate(pa.concat_tables(shards), "labels")
        table = schemas.validate(labels.append_column(schemas.REWARD_FIELDS[0],
                                                      rewards_from_labels(labels, self.kind, self.score_points)), "rewards")
        seconds = self._wait(t0, self.profile.reward_seconds * len(shards))
        return table, {"reward_seconds": seconds, "rm_version": self.rm_version}


class StandInRank(_Stage):
    """A learner rank: the real sample accounting (stale samples dropped, invalid ones skipped), FLOP-bound time."""

    def __init__(self, policy_path: str, cfg: dict, rank: int, world_size: int):
        super().__init__(cfg)
        self.rank, self.world_size, self.version = rank, world_size, 0

    def address(self) -> tuple[str, int]:
        return "127.0.0.1", 0

    def setup(self, master_addr: str, master_port: int) -> int:
        return self.rank

    def train_step(self, *tables: pa.Table) -> dict:
        t0 = time.perf_counter()
        if self.rank != 0:  # the batch's accounting is rank 0's; the others only take the step's time
            self._wait(t0, self.profile.train_seconds(tables[0].num_rows * len(tables), self.world_size,
                                                      self.cfg.learner.kl() > 0))
            self.version += 1
            return {}
        table = schemas.validate(pa.concat_tables(tables), "rewards")
        ids = table.column("sample_id").to_pylist()
        staleness = self.version - np.asarray(table.column("policy_version").to_pylist())
        valid = table.column("label_valid").to_pylist()
        stale = [i for i in range(len(ids)) if staleness[i] > self.cfg.loop.max_staleness]
        skipped = [i for i in range(len(ids)) if i not in set(stale) and not valid[i]]
        trained = sorted(set(range(len(ids))) - set(stale) - set(skipped))
        seconds = self._wait(t0, self.profile.train_seconds(len(trained), self.world_size, self.cfg.learner.kl() > 0))
        self.version += 1
        fresh = staleness[trained] if trained else np.zeros(0)
        metrics = {"learner_version": self.version, "train_seconds": seconds, "samples_in": len(ids),
                   "trained": len(trained), "dropped_stale": len(stale), "skipped": len(skipped), "optimizer_step": 1,
                   "staleness_mean": float(fresh.mean()) if len(fresh) else 0.0,
                   "staleness_max": int(fresh.max()) if len(fresh) else 0}
        return {"metrics": metrics, "outcome": {"trained": [ids[i] for i in trained], "stale": [ids[i] for i in stale],
                                                "skipped": [(ids[i], "invalid") for i in skipped]}}

    def export_weights(self):
        """The object-store path's shape: rank 0 hands out a (placeholder) weights object; engines take the
        profile's sync time to load it."""
        return (("weights of version", self.version) if self.rank == 0 else None), {"rank": self.rank}

    def weights_layout(self) -> list:
        return []


def stand_ins(profile: Profile, **replaced) -> dict:
    """Stage -> stand-in actor class with `profile`'s service times, for `Orchestrator(..., stand_ins=...)`;
    `replaced`: stage -> a subclass of its stand-in to use instead (a test's stand-in that does more)."""
    bases = {"rollout": StandInEngine, "critic": StandInJudge, "reward": StandInScorer, "learner": StandInRank,
             **replaced}
    groups = {"rollout": {"concurrency_groups": {"streams": 16}}}  # as RolloutWorker's (rollout.engine_streams)
    made = {stage: type(base.__name__, (base,), {"profile": profile}) for stage, base in bases.items()}
    return {stage: ray.remote(**groups[stage])(cls) if stage in groups else ray.remote(cls) for stage, cls in made.items()}


def bound_seconds(profile: Profile, cfg: RunConfig) -> dict:
    """The profile's best step time for this config, in profiled seconds (shards as the Orchestrator makes them).
    sync: the stages one after another (a stage's shards spread over its actors). async, with loop.max_inflight + 1
    batches in flight, the longest of: the learner's step; each pool's work per step over the actors that can work
    at once (at most shards × batches in flight), the engines' weight loads included; a batch's way through the
    stages over the batches in flight. `async_limit` names the one that binds. Group flow (`loop.flow: groups`)
    has a bound of its own (`_group_limits`)."""
    engines, judges, ranks = cfg.rollout.num_workers, cfg.critic.num_workers, cfg.learner.num_learners
    prompts, n = cfg.data.prompts_per_step, cfg.rollout.samples_per_prompt
    shards = min(cfg.rollout.shards_per_batch or engines, prompts)
    biggest = math.ceil(prompts / shards)
    gen_shard = profile.gen_seconds(biggest * n)
    label_group = profile.judge_call_seconds() * judge_calls(n, cfg.critic.pairs, cfg.critic.pairs_k)
    label_shard = biggest * label_group
    stages = {"gen": math.ceil(shards / engines) * gen_shard, "label": math.ceil(shards / judges) * label_shard,
              "reward": profile.reward_seconds,
              "train": profile.train_seconds(prompts * n, ranks, cfg.learner.kl() > 0),
              "sync": profile.sync_seconds()}
    in_flight = cfg.loop.max_inflight + 1
    if cfg.loop.flow == "groups" and cfg.loop.mode == "async":
        limits = _group_limits(profile, cfg, stages, shards, gen_shard, label_group)
    else:
        limits = {"train": stages["train"] + stages["reward"],
                  "gen": shards * gen_shard / min(engines, shards * in_flight) + stages["sync"],
                  "label": shards * label_shard / min(judges, shards * in_flight),
                  "pipeline depth": (gen_shard + label_shard + stages["reward"] + stages["train"]) / in_flight}
    binding = max(limits, key=limits.get)
    return {"stages": stages, "sync_step": sum(stages.values()), "async_step": limits[binding],
            "async_limit": binding, "samples": prompts * n}


def _group_limits(profile: Profile, cfg: RunConfig, stages: dict, shards: int, gen_call: float,
                  label_group: float) -> dict:
    """Group flow's limits per step (profiled seconds), the longest binding: the learner's step; the engines, each
    running `rollout.engine_streams` shard calls at once (a step's tokens at full-batch speed, or its calls over the
    calls that can run at once, whichever is longer), paused for every weight load; the judges, one group's judge
    prompts at a time; a group's way to the learner's buffer (its call, its judge call, its score) over the steps'
    worth of groups in flight (`loop.max_inflight` + 1: groups waiting to be trained count, the step training does
    not)."""
    engines, judges = cfg.rollout.num_workers, cfg.critic.num_workers
    prompts, n = cfg.data.prompts_per_step, cfg.rollout.samples_per_prompt
    in_flight = cfg.loop.max_inflight + 1
    tokens = prompts * n * profile.response_tokens
    gen = max(tokens / (engines * profile.engine_tokens_per_s),
              shards * gen_call / min(engines * cfg.rollout.engine_streams, shards * in_flight))
    return {"train": stages["train"] + stages["reward"], "gen": gen + stages["sync"],
            "label": prompts * label_group / judges,
            "pipeline depth": (gen_call + label_group + stages["reward"]) / in_flight}

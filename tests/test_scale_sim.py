"""The controller at scale: batches split over the engines (shards), shard stats merged, the pool's one prune per batch,
and the scale simulation (`jobs/scale_sim.py`: the real Orchestrator driving stand-in stage actors)."""
import json
from pathlib import Path

import pytest

from rlaif_ray.runtime.accounting import merge_shard_stats
from rlaif_ray.runtime.orchestrator import shard_indices
from tests.conftest import job_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n,shards", [(64, 64), (10, 3), (5, 8), (7, 1), (3, 0)])
def test_shards_cover_the_batch_in_order(n, shards):
    indices = list(range(100, 100 + n))
    parts = shard_indices(indices, shards)
    assert [i for p in parts for i in p] == indices  # every prompt once, in batch order
    assert len(parts) == max(1, min(shards, n)) and all(parts)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_merged_shard_stats_count_what_the_step_took():
    gen = [{"gen_seconds": 2.0, "engine_seconds": 1.5, "gen_tokens": 10, "gen_samples": 4, "policy_version": 3,
            "worker": 5},
           {"gen_seconds": 3.0, "engine_seconds": 2.5, "gen_tokens": 20, "gen_samples": 4, "policy_version": 2,
            "worker": 6}]
    label = [{"label_seconds": 1.0, "judge_calls": 8, "labeled_samples": 4, "judge_calls_per_sample": 2.0}] * 4
    merged = merge_shard_stats({"gen": gen, "label": label}, {"gen": 2, "label": 1})
    g, lab = merged["gen"], merged["label"]
    # counts add up; the batch is as old as its oldest shard; the engines ran side by side: the slowest shard
    assert (g["gen_tokens"], g["gen_samples"], g["engine_seconds"]) == (30, 8, 4.0)
    assert (g["policy_version"], g["worker"], g["shards"], g["gen_seconds"], g["busy_seconds"]) == (2, 5, 2, 3.0, 5.0)
    # one judge took the four shards one after another: the stage took their sum
    assert lab["label_seconds"] == 4.0 == lab["busy_seconds"] and lab["judge_calls"] == 32
    assert lab["judge_calls_per_sample"] == 2.0  # recomputed, not summed
    one = merge_shard_stats({"gen": gen[:1]}, {"gen": 4})["gen"]
    assert one["gen_seconds"] == 2.0 and one["policy_version"] == 3 and one["shards"] == 1


def test_pool_picks_from_its_counts_between_prunes(ray_cluster):
    import ray

    from rlaif_ray.runtime.pool import ActorPool

    @ray.remote(num_cpus=0)
    class Slow:
        def work(self, seconds):
            import time
            time.sleep(seconds)
            return 1

    actors = [Slow.remote() for _ in range(3)]
    try:
        pool = ActorPool(actors, "slow")
        pool.prune()
        picks = []
        for _ in range(6):  # six shards of one batch: round the pool twice, counting its own calls
            i = pool.pick(prune=False)
            picks.append(i)
            pool.track(i, actors[i].work.remote(60.0 if i == 0 else 0.0))  # actor 0 busy till the end
        assert sorted(picks) == [0, 0, 1, 1, 2, 2]
        ray.get([a.work.remote(0.0) for a in actors[1:]])
        pool.prune()
        assert pool.loads(prune=False)[1:] == [0, 0] and pool.loads(prune=False)[0] >= 1
    finally:
        for a in actors:
            ray.kill(a)


def test_scale_simulation_drives_stand_ins_through_the_real_loop(tmp_path, ray_cluster, toy_world):
    scale_sim = job_module("scale_sim")
    out = tmp_path / "scale"
    code = scale_sim.main(["-c", str(ROOT / "jobs/configs/scale_sim.yaml"), "--shapes", "1x1x1,4x2x2", "--out",
                           str(out), "--time-scale", "0.01", "loop.num_steps=7",
                           "data.prompts_per_step=8"])
    assert code == 0
    data = json.loads((out / "scale_sim.json").read_text())
    small, big = data["results"]["e1-j1-r1"], data["results"]["e4-j2-r2"]
    for row in (small, big):
        for mode in ("sync", "async"):
            r = row[mode]
            assert 0.3 < r["of_bound"] < 1.2, (mode, r["of_bound"])  # the stand-ins took the profile's times
            assert r["driver_cpu_s_per_step"] > 0 and r["faults"] == 0
        assert row["async"]["samples_per_s"] > row["sync"]["samples_per_s"]
    # four engines: every batch in four shards, each engine one per step; more engines, more samples/s
    metrics = [json.loads(line) for line in open(out / "e4-j2-r2-async" / "metrics.jsonl")]
    assert all(m["shards"] == 4 for m in metrics) and all(m["samples_in"] == 64 for m in metrics)
    assert big["sync"]["profiled_samples_per_s"] > 1.2 * small["sync"]["profiled_samples_per_s"]  # the bound: 1.66x
    assert big["bound"]["async_limit"] in ("train", "gen", "label", "pipeline depth")
    # the real ledger: every stand-in sample accounted for once
    ledger = [json.loads(line) for line in open(out / "e4-j2-r2-async" / "samples.jsonl")]
    assert len({row["sample_id"] for row in ledger}) == len(ledger) == 7 * 64
    assert (out / "scale_sim.png").stat().st_size > 10_000 and "| 4 engines, 2 judges, 2 ranks |" in \
        (out / "scale_sim.md").read_text()
    assert scale_sim.main(["--shapes", "4x2", "--out", str(out)]) == 2  # a malformed shape: a clear error
    # the figures again from the measured runs, nothing run: the same rows
    (out / "scale_sim.png").unlink()
    assert scale_sim.main(["-c", str(ROOT / "jobs/configs/scale_sim.yaml"), "--shapes", "1x1x1,4x2x2", "--out",
                           str(out), "--report-only", "loop.num_steps=7", "data.prompts_per_step=8"]) == 0
    again = json.loads((out / "scale_sim.json").read_text())["results"]
    assert again["e4-j2-r2"]["achieved_fraction_of_ideal"] == pytest.approx(big["achieved_fraction_of_ideal"])
    assert (out / "scale_sim.png").exists()


@pytest.mark.parametrize("lengths, tail", [("fixed", (1.0, 1.0)), ("uniform", (1.5, 2.5)), ("long_tail", (4.5, 8.0))])
def test_response_lengths_keep_the_mean_and_spread_as_the_profile_says(lengths, tail):
    import numpy as np

    from rlaif_lab.stand_ins import Profile
    profile = Profile(lengths=lengths)
    ids = [f"s-{step:05d}/p{p:03d}/{k}" for step in range(40) for p in range(64) for k in range(8)]
    got = profile.response_lengths(ids)
    assert np.array_equal(got, profile.response_lengths(ids))  # drawn from the sample id: a re-issue, the same
    assert abs(got.mean() / profile.response_tokens - 1) < 0.03 and got.min() >= 1
    assert got.max() <= profile.max_response_tokens
    p50, p99 = np.percentile(got, [50, 99])
    assert tail[0] <= p99 / p50 <= tail[1]
    # a shard waits for its longest answer: with a long tail the expected shard takes longer than with fixed lengths
    assert profile.shard_seconds([512] * 8) == max(8 * 512 / 6000, 512 / 100)  # 8 answers of 512: one stream's time
    assert profile.shard_seconds([100] * 7 + [2000]) == 2000 / 100               # the longest answer's time
    assert profile.gen_seconds(8) >= Profile().gen_seconds(8) - 1e-9
    if lengths == "long_tail":
        assert profile.gen_seconds(8) > 1.8 * Profile().gen_seconds(8)
    with pytest.raises(ValueError, match="Profile.lengths='gamma'"):
        Profile(lengths="gamma")


def test_group_flow_has_a_bound_of_its_own():
    """Group flow's bound: engines running `engine_streams` calls at once, a group's way over the groups in flight.
    Under the long tail at 64 engines batch flow is bound by its engines (one call at a time, each waiting for its
    longest answer), group flow with 4 calls per engine by the learner's step."""
    from rlaif_lab.stand_ins import Profile, bound_seconds
    scale_sim = job_module("scale_sim")
    from rlaif_ray.config import load_config
    base = load_config(str(ROOT / "jobs/configs/scale_sim.yaml"), ["rollout.in_flight_update=continue"])
    tail = Profile(lengths="long_tail")

    def bound(flow, engines=64, streams=4, **loop):
        cfg = scale_sim.sim_config(base, engines, 16, 8, "async", Path("."), flow, streams)
        cfg.loop = cfg.loop.model_copy(update=loop)
        b = bound_seconds(tail, cfg)
        return b["samples"] / b["async_step"], b["async_limit"]

    batch, groups = bound("batch"), bound("groups")
    assert batch[1] == "gen" and groups[1] == "train" and groups[0] > 1.5 * batch[0]
    train = bound_seconds(tail, scale_sim.sim_config(base, 64, 16, 8, "async", Path("."), "groups", 4))["stages"]
    assert groups[0] == pytest.approx(64 * 8 / (train["train"] + train["reward"]))
    # one call at a time on 8 engines: the engines bind, and more calls per engine raise the bound
    assert bound("groups", engines=8, streams=1)[1] == "gen"
    assert bound("groups", engines=8, streams=1)[0] < bound("groups", engines=8, streams=4)[0]
    # one step in flight: a group's way through the stages (its longest answer) binds
    assert bound("groups", max_inflight=0)[1] == "pipeline depth"


def test_stand_in_engine_takes_its_samples_lengths(toy_world):
    """The stand-in engine (called in this process, no actor) reports the tokens its samples' drawn lengths add up to,
    and takes the time its shard's longest answer needs."""
    import time

    from rlaif_lab.stand_ins import Profile, StandInEngine
    from rlaif_ray.config import load_config
    from rlaif_ray.data.prompts import load_prompts

    cfg = load_config(ROOT / "jobs/configs/scale_sim.yaml", ["rollout.samples_per_prompt=4"])
    profile = Profile(lengths="long_tail", time_scale=0.01)  # ~0.2 s: call overheads stay inside rel=0.2
    engine = type("Engine", (StandInEngine,), {"profile": profile})(toy_world.policy, cfg.model_dump())
    prompts = load_prompts(toy_world.prompts)
    t0 = time.perf_counter()
    table, stats = engine.generate(prompts, [3, 7, 11], step=5)
    took = time.perf_counter() - t0
    lengths = profile.response_lengths(table.column("sample_id").to_pylist())
    assert table.num_rows == 12 and stats["gen_tokens"] == int(lengths.sum())
    assert took >= profile.shard_seconds(lengths) * profile.time_scale * 0.95
    assert stats["gen_seconds"] == pytest.approx(max(took, profile.shard_seconds(lengths) * profile.time_scale), rel=0.2)
    # group flow: each group handed back when its own last answer is done, in that order, the same samples
    t0 = time.perf_counter()
    parts = list(engine.generate_groups(prompts, [3, 7, 11], 5, [4, 5, 6]))
    groups = [(parts[k], parts[k + 1]) for k in range(0, len(parts), 2)]
    finish = profile.finish_seconds(lengths).reshape(3, 4).max(axis=1)
    assert sorted(meta["position"] for _, meta in groups) == [4, 5, 6]
    assert [t.column("sample_id").to_pylist() for t, meta in groups] == \
        [table.column("sample_id").to_pylist()[4 * (m["position"] - 4):4 * (m["position"] - 3)] for _, m in groups]
    assert all(m["seconds"] >= finish[m["position"] - 4] * profile.time_scale * 0.95 for _, m in groups)
    assert [("closing" in m) for _, m in groups] == [False, False, True]  # the last group's dict: the call's stats
    assert parts[-1]["closing"]["gen_samples"] == 12
    assert time.perf_counter() - t0 >= finish.max() * profile.time_scale * 0.95


def test_group_calls_on_one_stand_in_engine_share_it(toy_world):
    """rollout.engine_streams=2: two group calls at once on one stand-in engine run beside each other (answers at one
    stream's speed while the engine has room: together they take about as long as the longer one alone), and a
    weight update waits until their answers are done."""
    import threading
    import time

    from rlaif_lab.stand_ins import Profile, StandInEngine
    from rlaif_ray.config import load_config
    from rlaif_ray.data.prompts import load_prompts

    cfg = load_config(ROOT / "jobs/configs/scale_sim.yaml", ["rollout.samples_per_prompt=4", "loop.flow=groups",
                                                             "rollout.engine_streams=2"])
    profile = Profile(time_scale=0.02)  # fixed lengths: 512 tokens at 100 tokens/s = 5.12 s profiled, ~0.1 s here
    engine = type("Engine", (StandInEngine,), {"profile": profile})(toy_world.policy, cfg.model_dump())
    prompts = load_prompts(toy_world.prompts)
    alone = 512 / 100 * profile.time_scale
    took, stats = {}, {}

    def call(key, indices):
        t0 = time.perf_counter()
        stats[key] = list(engine.generate_groups(prompts, indices, 1, list(range(len(indices)))))[-1]["closing"]
        took[key] = time.perf_counter() - t0
    threads = [threading.Thread(target=call, args=(k, idx)) for k, idx in (("a", [1, 2]), ("b", [3, 4, 5]))]
    for t in threads:
        t.start()
    time.sleep(alone / 3)
    t_update = time.perf_counter()
    engine.update_weights(None, 1)  # waits for the answers in flight: about two thirds of `alone`, then the sync
    assert time.perf_counter() - t_update >= alone / 2
    for t in threads:
        t.join()
    assert max(took.values()) < 1.5 * alone and stats["a"]["policy_version"] == stats["b"]["policy_version"] == 0
    assert engine.version == 1


def test_a_group_call_that_waited_for_its_stream_carries_the_version_it_started_under(toy_world):
    """rollout.engine_streams=1: a group call that waits behind another while a weight update lands starts under the
    new version, and its tables say so, as the real engine's do (the learner counts staleness from the tables: a
    stand-in that stamped the version the call came with had the learner drop fresh groups as stale)."""
    import threading
    import time

    from rlaif_lab.stand_ins import Profile, StandInEngine
    from rlaif_ray.config import load_config
    from rlaif_ray.data.prompts import load_prompts

    cfg = load_config(ROOT / "jobs/configs/scale_sim.yaml", ["rollout.samples_per_prompt=2", "loop.flow=groups"])
    engine = type("Engine", (StandInEngine,), {"profile": Profile(time_scale=0.02)})(toy_world.policy, cfg.model_dump())
    prompts = load_prompts(toy_world.prompts)
    out = {}

    def call(key, indices):
        out[key] = list(engine.generate_groups(prompts, indices, 1, list(range(len(indices)))))
    first = threading.Thread(target=call, args=("first", [1]))
    first.start()
    while engine.clock.next_key == 0:  # the first call's answers are running (~0.1 s)
        time.sleep(0.001)
    second = threading.Thread(target=call, args=("second", [2, 3]))
    second.start()  # waits for the engine's one stream
    engine.update_weights(None, 1)  # lands after the first call, before the second starts
    first.join()
    second.join()
    tables = {key: [x for x in items if not isinstance(x, dict)] for key, items in out.items()}
    metas = {key: [x for x in items if isinstance(x, dict)] for key, items in out.items()}
    assert {v for t in tables["first"] for v in t.column("policy_version").to_pylist()} == {0}
    assert [m["version"] for m in metas["second"]] == [1, 1]
    assert {v for t in tables["second"] for v in t.column("policy_version").to_pylist()} == {1}


def test_answers_share_the_engine_until_each_runs_at_one_streams_speed():
    """Profile.finish_seconds: the engine's tokens/s shared among the answers still running, each capped at one
    stream's speed; the shard's time is its last answer's."""
    from rlaif_lab.stand_ins import Profile
    p = Profile(engine_tokens_per_s=600.0, stream_tokens_per_s=100.0)
    # 12 answers: 50 tokens/s each until the 100-token ones finish (2 s); then 6 run at 100 tokens/s
    finish = p.finish_seconds([100] * 6 + [300] * 6)
    assert finish[:6] == pytest.approx([2.0] * 6) and finish[6:] == pytest.approx([4.0] * 6)
    assert p.shard_seconds([100] * 6 + [300] * 6) == pytest.approx(4.0)
    assert p.finish_seconds([300, 100]) == pytest.approx([3.0, 1.0])  # few answers: one stream's speed each


def test_flows_compare_batch_and_groups_on_the_stand_ins(tmp_path, ray_cluster, toy_world):
    """`scale_sim.py --flows`: the same configuration async in batch flow and in group flow; the group-flow run keeps
    the exact ledger and takes whole steps of groups, its engines loading each version when a call names it
    (sync.delivery=pull, given to group flow only: batch flow's engines are sent theirs)."""
    scale_sim = job_module("scale_sim")
    out = tmp_path / "flows"
    assert scale_sim.main(["-c", str(ROOT / "jobs/configs/scale_sim.yaml"), "--flows", "--shapes", "4x2x2", "--out",
                           str(out), "--time-scale", "0.01", "--lengths", "long_tail", "loop.num_steps=7",
                           "data.prompts_per_step=8", "sync.delivery=pull"]) == 0
    row = json.loads((out / "flows.json").read_text())["results"]["e4-j2-r2"]
    for flow in ("batch", "groups"):
        assert 0.2 < row[flow]["of_bound"] < 1.5 and row[flow]["faults"] == 0, (flow, row[flow]["of_bound"])
        assert 0.0 < row[flow]["host_cpu_busy"] <= 1.0 and row[flow]["driver_share_simulated"] > 0
    # each flow against its own bound: group flow's (its calls several at a time on an engine) is not batch flow's
    bounds = row["bounds"]
    assert bounds["groups"]["async_samples_per_s"] != bounds["batch"]["async_samples_per_s"]
    assert row["groups"]["of_bound"] == pytest.approx(row["groups"]["profiled_samples_per_s"]
                                                      / bounds["groups"]["async_samples_per_s"])
    assert row["groups_over_batch"] == pytest.approx(row["groups"]["samples_per_s"] / row["batch"]["samples_per_s"])
    ledger = [json.loads(line) for line in open(out / "e4-j2-r2-async-groups" / "samples.jsonl")]
    assert len({r["sample_id"] for r in ledger}) == len(ledger) == 7 * 64
    metrics = [json.loads(line) for line in open(out / "e4-j2-r2-async-groups" / "metrics.jsonl")]
    assert all(m["samples_in"] == 64 for m in metrics)
    # versions the engines loaded themselves reach the groups as pushed ones do (max_inflight 2: step 3's oldest
    # group was launched after step 0's version); a step's sync figures are the loads that came back with its calls
    assert max(m["gen_policy_version"] for m in metrics) >= 3 and sum("sync_seconds" in m for m in metrics) >= 3
    batch = [json.loads(line) for line in open(out / "e4-j2-r2-async" / "metrics.jsonl")]
    assert all("sync_seconds" in m for m in batch[1:]) and max(m["gen_policy_version"] for m in batch) >= 3
    assert "| 4 engines, 2 judges, 2 ranks |" in (out / "flows.md").read_text()
    assert (out / "flows.png").stat().st_size > 10_000


def test_a_weight_update_that_continues_the_answers_in_flight_only_pauses_them(toy_world):
    """rollout.in_flight_update=continue on a stand-in engine: the update does not wait for the answers running; they
    pause while the weights load and go on."""
    import threading
    import time

    from rlaif_lab.stand_ins import Profile, StandInEngine
    from rlaif_ray.config import load_config
    from rlaif_ray.data.prompts import load_prompts

    cfg = load_config(ROOT / "jobs/configs/scale_sim.yaml", ["rollout.samples_per_prompt=4", "loop.flow=groups",
                                                             "rollout.engine_streams=2", "rollout.in_flight_update=continue"])
    profile = Profile(time_scale=0.05)
    engine = type("Engine", (StandInEngine,), {"profile": profile})(toy_world.policy, cfg.model_dump())
    prompts = load_prompts(toy_world.prompts)
    alone, sync = 512 / 100 * profile.time_scale, profile.sync_seconds() * profile.time_scale
    took = {}

    def call():
        t0 = time.perf_counter()
        list(engine.generate_groups(prompts, [1, 2], 1, [0, 1]))
        took["call"] = time.perf_counter() - t0
    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(alone / 3)
    t_update = time.perf_counter()
    engine.update_weights(None, 1)
    assert time.perf_counter() - t_update < alone / 3 + sync  # it did not wait for the answers (2/3 of `alone` left)
    thread.join()
    assert took["call"] >= alone + sync * 0.9 and engine.version == 1

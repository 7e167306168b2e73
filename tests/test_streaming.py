"""loop.flow=groups (rlaif_ray.runtime.streaming) on the local cluster with the real stages: prompt groups go from
their engine to the judge, the scorer and the learner one by one, and the run is the one batch mode makes."""
import json
import time
from pathlib import Path

import pytest

from rlaif_ray.runtime.driver import train
from tests.conftest import job_module, small_config

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_group_flow_trains_what_batch_flow_trains(tmp_path, ray_cluster, toy_world):
    """Sync mode, two engines, a shard per prompt (two per engine; in group flow both run at once on their engine,
    rollout.engine_streams=2, and the engines load each version themselves, sync.delivery=pull): the same sample ids
    with the same outcomes, the same rewards and losses, step by step (only one step's groups are in flight, so each
    step takes exactly its own groups, whatever order they finish in), and the same accuracy after the run (the engine
    that evaluates loads the last version, which no group call named)."""
    runs = {}
    for flow in ("batch", "groups"):
        streams = 2 if flow == "groups" else 1
        cfg = small_config(tmp_path / flow, rollout={"num_workers": 2, "shards_per_batch": 4, "engine_streams": streams},
                           loop={"mode": "sync", "num_steps": 3, "eval_samples": 2, "flow": flow},
                           sync={"delivery": "pull" if flow == "groups" else "push"},
                           output={"tensorboard": False, "save_checkpoint": False})
        runs[flow] = train(cfg), tmp_path / flow / "run"
    (batch, batch_dir), (groups, groups_dir) = runs["batch"], runs["groups"]
    assert groups["flow"] == "groups" and groups["generated"] == batch["generated"] == 3 * 4 * 2
    ledgers = {flow: sorted((r["step"], r["sample_id"], r["outcome"]) for r in read_jsonl(d / "samples.jsonl"))
               for flow, (_, d) in runs.items()}
    assert ledgers["groups"] == ledgers["batch"] and len({r[1] for r in ledgers["groups"]}) == 24
    got, want = read_jsonl(groups_dir / "metrics.jsonl"), read_jsonl(batch_dir / "metrics.jsonl")
    for key in ("reward_mean", "loss", "trained", "judge_calls", "gen_tokens"):
        assert [m[key] for m in got] == pytest.approx([m[key] for m in want], abs=1e-5), key
    # two engines, two shard calls each per step; the groups handed back together labelled in one judge call (at
    # least one call per step, at most one per group), every group scored on its own and saved
    assert groups["dispatched"]["rollout"] == [6, 6] and 3 <= groups["dispatched"]["critic"][0] <= 3 * 4
    assert len(list((groups_dir / "labels").glob("step-*-g*.parquet"))) == 3 * 4
    assert all(m["queue_ready"] == 0 and m["inflight"] == 0 for m in got)
    assert groups["faults"]["reissued_groups"] == 0 and groups["busy_fraction"]["gen"] > 0
    # each engine loaded versions 1 and 2 when its next call named them (their receipts in steps 1 and 2's metrics)
    assert [m["gen_policy_version"] for m in got] == [0, 1, 2] and all(m["sync_seconds"] > 0 for m in got[1:])
    assert groups["eval_after"] == batch["eval_after"] and groups["eval_after"] != groups["eval_before"]


def test_groups_handed_back_while_the_judge_is_busy_go_to_it_in_one_call(tmp_path, ray_cluster, toy_world):
    """Group flow, one engine handing back a step's 8 groups 0.2 s apart, one judge whose first call takes 4 s: the
    first group goes to the judge at once, the second waits behind it in the judge's queue (streaming.JUDGE_QUEUE),
    and the six handed back after that wait on the driver and go to the judge as one call when the first call ends,
    not as a call each. Stand-ins (the real driver, pools and object store; rlaif_lab.stand_ins) with timings fixed
    here, so the calls are the same on any machine."""
    from rlaif_lab.stand_ins import Profile, StandInEngine, StandInJudge, stand_ins
    calls_log = tmp_path / "label_calls.jsonl"

    class Engine(StandInEngine):
        def generate_groups(self, *args, **kwargs):
            for item in super().generate_groups(*args, **kwargs):
                yield item
                if isinstance(item, dict) and "position" in item:  # a group just handed back: the next one later
                    time.sleep(0.2)

    class Judge(StandInJudge):
        def label_groups(self, *groups):
            first = not calls_log.exists()
            with open(calls_log, "a") as f:
                f.write(json.dumps({"groups": len(groups)}) + "\n")
            if first:
                time.sleep(4.0)  # every other group is handed back meanwhile (8 x 0.2 s)
            return super().label_groups(*groups)

    from rlaif_ray.config import load_config
    scale_sim = job_module("scale_sim")
    base = load_config(ROOT / "jobs/configs/scale_sim.yaml", ["data.prompts_per_step=8", "loop.num_steps=1"])
    cfg = scale_sim.sim_config(base, 1, 1, 1, "sync", tmp_path / "run", flow="groups")
    summary = train(cfg, stand_ins=stand_ins(Profile(time_scale=0.001), rollout=Engine, critic=Judge))
    calls = [json.loads(line)["groups"] for line in calls_log.read_text().splitlines()]
    # [1, 1, 6] when the driver reads each group before the next comes; a stall of the driver past 0.2 s can put two in
    # one of the first calls ([2, 1, 5]); a call per group would be [1] * 8
    assert len(calls) == 3 and sum(calls) == 8 and calls[-1] >= 4, calls
    assert summary["dispatched"]["critic"] == [3] and summary["generated"] == summary["trained"] == 8 * 8


def test_a_burst_of_waiting_groups_is_spread_over_the_judges_as_they_free(tmp_path, ray_cluster, toy_world):
    """Group flow, one engine handing back a step's 12 groups 0.2 s apart, two judges whose first call takes 4 s: the
    first four groups go to the judges at once (a call running and one waiting on each), the eight handed back after
    that wait on the driver. The judge that frees first takes at most its share of a step (6 = 12 groups / 2 judges,
    what batch flow's shard would give it), the other judge the rest a moment later: not all eight in one call while the
    other judge frees with nothing to do (stand-ins with timings fixed here, as the test above)."""
    from rlaif_lab.stand_ins import Profile, StandInEngine, StandInJudge, stand_ins
    calls_log = tmp_path / "label_calls.jsonl"

    class Engine(StandInEngine):
        def generate_groups(self, *args, **kwargs):
            for item in super().generate_groups(*args, **kwargs):
                yield item
                if isinstance(item, dict) and "position" in item:
                    time.sleep(0.2)

    class Judge(StandInJudge):
        def __init__(self, model_path, cfg, worker_index=0):
            super().__init__(model_path, cfg, worker_index)
            self.index, self.held = worker_index, False

        def label_groups(self, *groups):
            with open(calls_log, "a") as f:
                f.write(json.dumps({"judge": self.index, "groups": len(groups)}) + "\n")
            if not self.held:
                self.held = True
                time.sleep(4.0)
            return super().label_groups(*groups)

    from rlaif_ray.config import load_config
    scale_sim = job_module("scale_sim")
    base = load_config(ROOT / "jobs/configs/scale_sim.yaml", ["data.prompts_per_step=12", "loop.num_steps=1"])
    cfg = scale_sim.sim_config(base, 1, 2, 1, "sync", tmp_path / "run", flow="groups")
    summary = train(cfg, stand_ins=stand_ins(Profile(time_scale=0.001), rollout=Engine, critic=Judge))
    calls = [json.loads(line)["groups"] for line in calls_log.read_text().splitlines()]
    # [1, 1, 1, 1, 6, 2] (a driver stall can merge two of the first four); one call for the eight: [1, 1, 1, 1, 8]
    assert sum(calls) == 12 and max(calls) == 6 and len(calls) <= 8, calls
    assert sorted(summary["dispatched"]["critic"]) == sorted(
        sum(1 for line in calls_log.read_text().splitlines() if json.loads(line)["judge"] == j) for j in (0, 1))
    assert summary["generated"] == summary["trained"] == 12 * 8


def test_judge_calls_take_one_step_each_spread_over_the_judges_with_a_prompt_once():
    """The label calls of the groups handed back together: never two steps in one call (a step's groups may go to the
    learner in different steps), spread over the judges present, and a prompt drawn twice in a step (a prompt set
    smaller than a step) in two calls, since a judge pairs the samples of each prompt id."""
    from rlaif_ray.runtime.streaming import Group, judge_calls
    groups = [Group(step, index, position, 0, 0) for step, index, position in
              [(3, 10, 0), (3, 11, 1), (3, 12, 2), (4, 10, 0), (3, 10, 3), (3, 13, 4)]]
    calls = [[(g.step, g.index) for g in call] for call in judge_calls(groups, 2)]
    assert calls == [[(3, 10), (3, 11)], [(3, 12), (3, 13)], [(3, 10)], [(4, 10)]]
    assert [len(c) for c in judge_calls(groups[:3], 5)] == [1, 1, 1]   # more judges than groups: one each
    assert [len(c) for c in judge_calls(groups[:3], 1)] == [3]


def test_an_engines_busy_clock_counts_overlapping_calls_once():
    """rollout.engine_streams > 1: an engine's group calls overlap; its busy time is the time at least one call had
    requests in it (their union), handed out in increments that add up to it, not the calls' seconds summed."""
    from rlaif_ray.stages.shared_engine import BusyClock
    now = [0.0]
    clock = BusyClock(lambda: now[0])
    first, second, third = clock.call(), clock.call(), clock.call()
    first.__enter__()                       # 0 .. 10
    now[0] = 4.0
    second.__enter__()                      # 4 .. 12, overlapping the first
    now[0] = 10.0
    first.__exit__(None, None, None)
    taken = [clock.take()]                  # 10: the second call still open
    now[0] = 12.0
    second.__exit__(None, None, None)
    taken.append(clock.take())              # 2
    now[0] = 20.0
    taken.append(clock.take())              # 0: idle from 12 to 20
    with third:                             # 20 .. 23
        now[0] = 23.0
    taken.append(clock.take())              # 3
    assert taken == [10.0, 2.0, 0.0, 3.0] and sum(taken) == 15.0  # the calls' own seconds sum to 21

"""The benchmark's arithmetic on constructed metrics (the figures themselves come from jobs/benchmark.py)."""
import pytest

from rlaif_ray.tools.benchmark import compare, format_table, run_figures


def rows(step_seconds, stages, n=6, staleness=0):
    return [{"step": i, "step_seconds": step_seconds, "samples_in": 32, "gen_tokens": 64, "sync_bytes": 2e6,
             "staleness_max": staleness, **{f"{k}_seconds": v for k, v in stages.items()}} for i in range(n)]


def test_ideal_overlap_and_achieved_fraction():
    stages = {"gen": 0.1, "label": 0.4, "reward": 0.0, "train": 0.2, "sync": 0.1}
    sync = run_figures(rows(0.8, stages), warmup=2)
    async_ = run_figures(rows(0.5, stages, staleness=1), warmup=2)
    assert sync["steps_measured"] == 4 and sync["samples_per_s"] == pytest.approx(32 / 0.8)
    assert sync["sync_gb_per_s"] == pytest.approx(2e6 / 0.1 / 1e9)
    cmp = compare(sync, async_)
    assert cmp["ideal_overlap_ratio"] == pytest.approx(0.8 / 0.4)   # sum of stages / slowest stage
    assert cmp["async_over_sync"] == pytest.approx(0.8 / 0.5)
    assert cmp["achieved_fraction_of_ideal"] == pytest.approx(1.6 / 2.0)
    assert cmp["bottleneck_stage"] == "label"
    assert async_["staleness_max_hist"] == {1: 4}
    assert "achieved fraction of ideal:    80%" in format_table(sync, async_, cmp)


def test_transport_from_a_constructed_timeline():
    from rlaif_ray.tools.benchmark import transport_from_timeline, transport_share

    def ev(cat, tid, ts, dur):
        return {"cat": cat, "name": cat, "tid": tid, "ts": ts * 1e6, "dur": dur * 1e6, "ph": "X"}
    events = []
    for k in range(4):  # 4 steps, one generate (worker g) and one train_step on each of two ranks (r0, r1)
        t = 100.0 + k
        events += [ev("task::RolloutWorker.generate", "g", t, 0.30), ev("task:deserialize_arguments", "g", t, 0.01),
                   ev("task:execute", "g", t + 0.01, 0.28), ev("task:store_outputs", "g", t + 0.29, 0.01)]
        for r in ("r0", "r1"):
            events += [ev("task::LearnerRank.train_step", r, t + 0.4, 0.2), ev("task:deserialize_arguments", r, t + 0.4, 0.02),
                       ev("task:execute", r, t + 0.42, 0.18)]
    events.append(ev("task::Other.method", "o", 101.0, 0.5))                 # not a pipeline stage
    events.append(ev("task::RolloutWorker.generate", "g", 500.0, 0.3))       # outside the window
    t = transport_from_timeline(events, 99.0, 110.0)
    assert set(t) == {"gen", "train"} and t["gen"]["calls"] == 4 and t["train"]["calls"] == 8
    assert t["gen"]["deserialize_arguments_s_per_call"] == pytest.approx(0.01)
    assert t["gen"]["store_outputs_s_per_call"] == pytest.approx(0.01)
    assert t["train"]["execute_s_per_call"] == pytest.approx(0.18)
    # per step: gen moves 0.02 s, each of two ranks 0.02 s -> 0.06 s of a 1 s step
    assert transport_share(t, 1.0, {"train": 2}) == pytest.approx(0.06)

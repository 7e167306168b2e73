"""The benchmark's arithmetic on constructed metrics (the figures themselves come from jobs/benchmark.py)."""
import pytest

from rlaif_ray.benchmark import compare, format_table, run_figures


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

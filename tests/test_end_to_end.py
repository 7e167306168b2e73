"""The whole loop on the local cluster: async mode, 2 DeepSpeed ranks, bounded staleness, full accounting."""
import json
from collections import Counter

import pytest
import ray

from rlaif_ray.config import ConfigError
from rlaif_ray.data.prompts import PromptFileError
from rlaif_ray.runtime.driver import train
from tests.conftest import small_config


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def alive_actors() -> int:
    # the GCS table (the state API would need the dashboard, which tests do not start)
    return sum(a["State"] == "ALIVE" for a in ray._private.state.actors().values())


def test_async_run_two_learners(tmp_path, ray_cluster, toy_world):
    alive_before = alive_actors()
    steps, per_step = 4, 4 * 2
    cfg = small_config(tmp_path, learner={"num_learners": 2, "zero_stage": 2}, rollout={"num_workers": 2},
                       loop={"mode": "async", "num_steps": steps, "max_inflight": 2, "max_staleness": 1},
                       output={"trackers": ["mlflow"]})
    summary = train(cfg)
    # two rollout engines behind the least-loaded pool: every batch was split into a shard for each (one judge)
    assert summary["dispatched"]["rollout"] == [steps, steps] and summary["dispatched"]["critic"] == [2 * steps]
    assert set(summary["busy_fraction"]) == {"gen", "label", "reward", "train"}
    assert all(0 < f <= 1.05 for f in summary["busy_fraction"].values())
    run = tmp_path / "run"
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["policy_version"] for m in metrics] == [1, 2, 3, 4] and summary["final_version"] == steps
    # bounded asynchrony: batches were generated ahead of the learner, none trained beyond the bound
    assert max(m["staleness_max"] for m in metrics) <= 1
    assert any(m["gen_policy_version"] < m["policy_version"] - 1 for m in metrics)
    # batch 2 was generated at version 0 (two batches ahead) and reaches the learner at version 2: dropped
    assert summary["dropped_stale"] >= per_step
    # every generated sample is accounted for exactly once
    ledger = read_jsonl(run / "samples.jsonl")
    ids = [row["sample_id"] for row in ledger]
    assert len(ids) == len(set(ids)) == summary["generated"] == steps * per_step
    counts = Counter(row["outcome"] for row in ledger)
    assert counts["trained"] == summary["trained"] and counts["dropped_stale"] == summary["dropped_stale"]
    assert counts["skipped"] == summary["skipped"] and sum(counts.values()) == summary["generated"]
    assert all(row.get("reason") for row in ledger if row["outcome"] == "skipped")
    for m in metrics:
        assert m["trained"] + m["dropped_stale"] + m["skipped"] == per_step
        assert m["samples_per_s"] > 0 and m["gen_seconds"] > 0 and "position_agreement" in m
        assert all(m[q] >= 0 for q in ("queue_gen", "queue_label", "queue_reward", "queue_ready"))
    assert all(m["shards"] == 2 for m in metrics)
    # outputs a person reads, and a checkpoint that reloads in transformers
    assert (run / "report.md").read_text().count("|") > 10 and (run / "report.png").stat().st_size > 1000
    assert list((run / "tensorboard").iterdir())
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(summary["checkpoint"])
    tok = AutoTokenizer.from_pretrained(summary["checkpoint"])
    out = model.generate(**tok("2+3=", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 3
    assert alive_actors() == alive_before  # the run's actors are gone
    # the judge report and the before/after evaluation on the whole prompt set
    report = summary["judge_report"]
    assert 0.0 <= report["position_consistency"] <= 1.0 and 0.0 <= report["first_slot_rate"] <= 1.0
    assert report["judge_calls"] == sum(m["judge_calls"] for m in metrics) and report["labels_per_s"] > 0
    assert summary["eval_before"]["prompts"] == 100 and summary["eval_after"]["policy_version"] == steps
    assert "Judge report" in (run / "report.md").read_text()
    # what the console prints at the end: a dozen lines with the figures above, not the whole summary
    from rlaif_ray.console import run_summary_lines
    from rlaif_ray.runtime.metrics import progress_figures
    lines = run_summary_lines(summary, metrics, str(run))
    text = "\n".join(lines)
    assert len(lines) <= 14 and lines[0].startswith(f"rlaif: finished {steps} steps of ppo (async)")
    b, a = summary["eval_before"], summary["eval_after"]
    assert f"sampled {b['accuracy_sampled']:.3f} -> {a['accuracy_sampled']:.3f}" in text
    assert f"position consistency {report['position_consistency']:.3f}" in text and "faults        none" in text
    assert report["position_offset"] == 0.0 and "log-odds offset" not in text  # the toy critic has no calibration
    assert f"{run}/report.md" in text and summary["checkpoint"] in text
    # examples a person reads: the first prompt's samples of every step, in the report for the first and last
    examples = read_jsonl(run / "examples.jsonl")
    assert sorted({e["step"] for e in examples}) == list(range(steps)) and len(examples) == 4 * steps
    first = [e for e in examples if e["step"] == 0]
    assert len({e["prompt"] for e in first}) == 2 and all(e["correct"] in (True, False) for e in first)
    assert all(e["outcome"] != "trained" or e["reward"] is not None and 0 <= e["judge_win_prob"] <= 1 for e in first)
    assert "## Examples" in (run / "report.md").read_text() and f"| {first[0]['prompt']} |" in (run / "report.md").read_text()
    # MLflow (its local file store in the run folder): the config, every step's metrics, the examples as tables
    from mlflow.tracking import MlflowClient
    mlflow_run = json.loads((run / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    assert [m.step for m in client.get_metric_history(mlflow_run, "samples_per_s")] == list(range(steps))
    assert client.get_run(mlflow_run).data.params["learner.num_learners"] == "2"
    assert client.get_run(mlflow_run).info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(mlflow_run, "examples")}
    assert artifacts == {f"examples/step-{s:06d}.json" for s in range(steps)}
    # the bar: pairwise win rates sum to zero in each prompt group, so it shows their spread, not a mean stuck at 0
    shown = progress_figures(next(m for m in metrics if m.get("reward_std") is not None))
    assert "reward" not in shown and {"reward_sd", "accuracy", "judge_ok", "kl", "samples/s"} <= set(shown)
    # the label dataset: one Parquet file per batch (its shards together), in the rewards schema
    import pyarrow.parquet as pq
    from rlaif_ray.data import schemas
    saved = sorted((run / "labels").glob("step-*.parquet"))
    assert len(saved) == steps and all(pq.read_metadata(p).num_rows == per_step for p in saved)
    schemas.validate(pq.read_table(saved[0]), "rewards")


@pytest.mark.parametrize("algorithm, sections", [
    ("dpo", {"critic": {"method": "cot", "preamble": "{principle}\n",
                        "principles": ["Prefer the correct sum.", "Prefer the exact answer."]}}),
    ("sft", {}),
])
def test_each_learner_type_runs_end_to_end(tmp_path, ray_cluster, toy_world, algorithm, sections):
    steps = 2
    if "critic" in sections:  # the session's toy world by path: "toy" with other judge strings would build another
        # (~60 s; its critic trained on them): this one's critic reads the principle's words untrained, and the test
        # is the learner's and the labels' path, not the verdicts
        sections = {**sections, "model": {"policy": str(toy_world.policy), "critic": str(toy_world.critic)},
                    "data": {"prompts": str(toy_world.prompts)}}
    cfg = small_config(tmp_path, learner={"algorithm": algorithm, "num_learners": 1}, loop={"num_steps": steps,
                       "eval_samples": 2}, **sections)
    summary = train(cfg)
    run = tmp_path / "run"
    metrics = read_jsonl(run / "metrics.jsonl")
    assert summary["algorithm"] == algorithm and summary["final_version"] == steps
    assert all(m["loss"] == m["loss"] for m in metrics)  # not NaN
    ledger = read_jsonl(run / "samples.jsonl")
    assert len(ledger) == len({r["sample_id"] for r in ledger}) == summary["generated"]
    assert summary["eval_after"]["policy_version"] == steps
    if algorithm == "sft":  # one teacher demonstration per prompt, all trained
        assert summary["generated"] == steps * 4 == summary["trained"]
        assert "judge_report" not in summary
    else:
        assert summary["trained"] > 0 and all("pair_accuracy" in m for m in metrics)
        import pyarrow.parquet as pq
        labels = pq.read_table(sorted((run / "labels").glob("*.parquet"))[0]).to_pylist()
        assert {r["label_method"] for r in labels} == {"cot"}
        assert {r["principle"] for r in labels} <= set(cfg.critic.principles) and all(r["principle"] for r in labels)


@pytest.mark.parametrize("overrides, error, fragment", [
    ({"data": {"prompts": "/nonexistent/prompts.jsonl"}}, PromptFileError, "/nonexistent/prompts.jsonl"),
    ({"model": {"policy": "/nonexistent/model"}}, ConfigError, "model.policy: model path does not exist"),
    ({"learner": {"num_learners": 64}}, ConfigError, "learner.num_learners=64"),
])
def test_bad_input_stops_before_any_actor(tmp_path, ray_cluster, toy_world, overrides, error, fragment):
    alive_before = alive_actors()
    with pytest.raises(error) as err:
        train(small_config(tmp_path, **overrides))
    assert fragment in str(err.value)
    assert alive_actors() == alive_before


def test_empty_prompt_row_is_named(tmp_path, ray_cluster, toy_world):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "1+1="}\n{"prompt": ""}\n')
    with pytest.raises(PromptFileError, match="row 2: field 'prompt' is empty"):
        train(small_config(tmp_path, data={"prompts": str(bad)}))


@pytest.mark.parametrize("label_share", [1.0, 0.5])
def test_reward_model_run(tmp_path, ray_cluster, toy_world, label_share):
    """Canonical RLAIF: a reward model warmed up on AI labels, refit during the run, scoring every batch. With
    reward.label_share=0.5 the judge labels every other batch beside the loop (its labels saved, counted, and sent to
    the refit) and the reward model scores every batch from its rollouts."""
    steps = 4 if label_share < 1 else 3
    cfg = small_config(tmp_path, reward={"kind": "reward_model", "warmup_batches": 2, "warmup_steps": 30,
                                         "refresh_every": 2, "train_steps": 5, "margin_scale": 0.5,
                                         "label_share": label_share},
                       loop={"num_steps": steps, "eval_samples": 0})
    summary = train(cfg)
    labelled = sorted(p.name for p in (tmp_path / "run" / "labels").glob("step-*.parquet"))
    if label_share < 1:
        assert labelled == ["step-000001.parquet", "step-000003.parquet"]
        import pyarrow.parquet as pq
        assert set(pq.read_table(tmp_path / "run" / "labels" / labelled[0]).column("label_method").to_pylist()) \
            == {"pairwise"}
        pairs_per_batch = 4 * 1 * 2  # prompts × pairs of 2 samples × both orders
        assert summary["judge_report"]["judge_calls"] == 2 * pairs_per_batch
    else:
        assert len(labelled) == steps
    warm = summary["reward_model_warmup"]
    assert warm["rm_pairs"] > 0 and warm["rm_loss"] == warm["rm_loss"] and 0 <= warm["rm_judge_agreement"] <= 1
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["rm_version"] for m in metrics][0] >= 1  # scored by the warmed-up model, not the random head
    assert all(m["reward_mean"] == m["reward_mean"] for m in metrics)
    from rlaif_ray.stages.reward_model import load_reward_model
    model, tok = load_reward_model(summary["reward_model"])  # the trained reward model reloads
    assert model.config.num_labels == 1


def test_judge_that_cannot_give_the_labels_stops_before_any_actor(tmp_path, ray_cluster, toy_world):
    alive_before = alive_actors()
    given = {"model": {"policy": toy_world.policy, "critic": toy_world.critic}, "data": {"prompts": toy_world.prompts}}
    with pytest.raises(ConfigError, match="label ' first choice' is [0-9]+ tokens"):
        train(small_config(tmp_path, critic={"pairwise_labels": [" first choice", " 2"]}, **given))
    with pytest.raises(ConfigError, match="critic.remote: .*127.0.0.1:9"):
        train(small_config(tmp_path, critic={"remote": {"base_url": "http://127.0.0.1:9/v1", "max_retries": 0}}))
    assert alive_actors() == alive_before


def test_a_fresh_run_never_deletes_an_earlier_one(tmp_path, ray_cluster, toy_world):
    from rlaif_ray.runtime.driver import _fresh_run_dir
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}")  # a folder with no run in it is used as it is
    assert _fresh_run_dir(small_config(tmp_path)) == run
    (run / "summary.json").write_text("{}")
    (tmp_path / "run-2" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        train(small_config(tmp_path))
    assert (run / "summary.json").is_file()
    cfg = small_config(tmp_path, output={"existing": "new"})
    assert _fresh_run_dir(cfg) == tmp_path / "run-3" and cfg.output.run_dir == str(tmp_path / "run-3")
    assert _fresh_run_dir(small_config(tmp_path, output={"existing": "overwrite"})) == run


def test_checker_as_the_reward_runs_without_a_judge(tmp_path, ray_cluster, toy_world):
    """reward.kind=checker: the oracle's reward (+1 right, -1 wrong against the prompt's reference), no judge started
    or asked; every sample's reward is what the checker says of it."""
    cfg = small_config(tmp_path, reward={"kind": "checker"}, data={"prompts_per_step": 4, "checker": "exact"},
                       loop={"mode": "sync", "num_steps": 2, "eval_samples": 0})
    assert not cfg.judge_in_loop()
    summary = train(cfg)
    assert summary["status"] == "finished" and "critic" not in summary["dispatched"]
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    for m in metrics:
        assert m["trained"] == 8 and m["skipped"] == 0
        assert m["reward_mean"] == pytest.approx(2 * m["true_accuracy"] - 1, abs=1e-6)
    import pyarrow.parquet as pq
    rows = pq.read_table(tmp_path / "run" / "labels" / "step-000000.parquet").to_pylist()
    from rlaif_ray.data.checkers import make_checker
    exact = make_checker("exact")
    assert [r["reward"] for r in rows] == [1.0 if exact(r["response"], r["reference"]) else -1.0 for r in rows]
    assert {r["label_method"] for r in rows} == {"none"}
    with pytest.raises(ValueError, match="reward.kind=checker grades each sample on its own"):
        small_config(tmp_path, reward={"kind": "checker"}, learner={"algorithm": "dpo"})

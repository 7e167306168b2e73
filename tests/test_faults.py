"""Faults injected into real runs on the local cluster: stage actors killed mid-run (`ray.kill`, and SIGKILL of
the process), a learner rank killed, the driver interrupted and resumed. Each checks the sample accounting:
every sample id trained once, dropped as stale, or skipped with a reason -- never lost, never duplicated.
The injections hook `Orchestrator.launch`, which the driver calls before it submits each batch."""
import json
import os
import re
import signal
from collections import Counter

import numpy as np
import pytest
import ray

from rlaif_ray.runtime.orchestrator import Orchestrator
from rlaif_ray.runtime.streaming import StreamingOrchestrator
from tests.conftest import small_config

# sync, 2 DeepSpeed ranks, and a reward model refit every 2 steps: a resume must restore all of their state
SYNC = dict(loop={"mode": "sync", "num_steps": 4, "eval_samples": 0}, checkpoint={"every": 2},
            learner={"num_learners": 2}, critic={"backend": "transformers"},
            reward={"kind": "reward_model", "model": "critic", "warmup_batches": 1, "warmup_steps": 5,
                    "refresh_every": 2, "train_steps": 3, "cpus": 0.25, "trainer_cpus": 0.25})


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def pid_of(actor) -> int:
    return ray._private.state.actors(actor._actor_id.hex())["Pid"]


def inject(monkeypatch, faults: dict, orchestrator=Orchestrator):
    """Run `faults[step](orchestrator)` once, just before the batch (or the groups) of that step is submitted."""
    original = orchestrator.launch
    done = set()

    def launch(self, step, indices=None, *rest):
        if step in faults and step not in done and indices is None:
            done.add(step)
            faults[step](self)
        return original(self, step, indices, *rest)
    monkeypatch.setattr(orchestrator, "launch", launch)


def weights(run_dir):
    from safetensors.numpy import load_file
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


POOL_EVENT = re.compile(r"going on with \d+ of|no actor left|back \(a replacement")


def fault_events(faults: dict) -> list[str]:
    """The run's events that are faults (a pool shrinking or growing back is an event, not a fault of its own)."""
    return [e for e in faults["events"] if not POOL_EVENT.search(e)]


def check_ledger(run_dir, summary, steps, per_step):
    ledger = read_jsonl(run_dir / "samples.jsonl")
    ids = [row["sample_id"] for row in ledger]
    assert len(ids) == len(set(ids)) == steps * per_step == summary["generated"]  # none lost, none twice
    counts = Counter(row["outcome"] for row in ledger)
    assert counts["trained"] == summary["trained"] and counts["dropped_stale"] == summary["dropped_stale"]
    assert all(row.get("reason") for row in ledger if row["outcome"] == "skipped")
    assert Counter(row["step"] for row in ledger) == {s: per_step for s in range(steps)}
    return ledger


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, toy_world, tmp_path_factory):
    from rlaif_ray.runtime.driver import train
    run = tmp_path_factory.mktemp("uninterrupted")
    summary = train(small_config(run, **SYNC))
    return run / "run", summary


def test_stage_actors_killed_mid_run(ray_cluster, toy_world, tmp_path, monkeypatch):
    from rlaif_ray.runtime.driver import train
    steps, per_step = 9, 4 * 2
    inject(monkeypatch, {
        1: lambda o: ray.kill(o.rollouts[0]),                             # the only engine, gone for good: replaced
        3: lambda o: os.kill(pid_of(o.critics[0]), signal.SIGKILL),       # the judge engine's process: Ray restarts it
        5: lambda o: os.kill(pid_of(o.rollouts[0]), signal.SIGKILL),      # the replacement engine: Ray restarts it
        6: lambda o: ray.kill(o.scorer, no_restart=False),                # Ray restarts it
        7: lambda o: os.kill(pid_of(o.critics[0]), signal.SIGKILL),       # restarts used up: replaced
    })
    cfg = small_config(tmp_path, loop={"mode": "async", "num_steps": steps, "max_inflight": 1, "max_staleness": 1,
                                       "eval_samples": 1}, fault={"max_actor_restarts": 1},  # Ray restarts, and replacement
                       sync={"method": "collective"})
    summary = train(cfg)
    faults = summary["faults"]
    # ray.kill (step 1) and a kill with no restart left (step 7) fail a batch for sure and force a replacement;
    # a call sent to an actor Ray is restarting may wait for it instead of failing, so the rest may re-issue or not
    assert faults["reissued_batches"] >= 2 and faults["replaced_actors"] >= 2
    assert len([e for e in faults["events"] if e.startswith("step ")]) == faults["reissued_batches"]
    # the collective sync group was formed anew after the engine was replaced (and again after its restart), and the
    # new engine rejoined it: the run ends on the collective path
    assert summary["weight_sync"]["method"] == "collective" and summary["weight_sync"]["groups_formed"] >= 2
    # the restarted engine was given the learner's weights again: it ends on the final version
    assert summary["eval_after"]["policy_version"] == summary["final_version"] == steps
    check_ledger(tmp_path / "run", summary, steps, per_step)
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["policy_version"] for m in metrics] == list(range(1, steps + 1))
    assert max(m["staleness_max"] for m in metrics) <= 1
    # after the engine came back it generated with the learner's weights, not the initial ones
    assert all(m["gen_policy_version"] >= m["policy_version"] - 2 for m in metrics)
    assert summary["trained"] > steps * per_step // 2
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Faults survived" in report and f"re-issued after a stage actor fault: {faults['reissued_batches']}" in report


def test_hung_engine_is_killed_replaced_and_its_batch_reissued(ray_cluster, toy_world, tmp_path, monkeypatch):
    """An engine alive but stuck inside `generate` (it sleeps an hour) is treated like a dead one once its call is
    fault.stage_timeout_s overdue: killed, replaced, the batch re-issued under the same sample ids."""
    from rlaif_ray.runtime.driver import train
    steps, per_step = 5, 4 * 2
    inject(monkeypatch, {2: lambda o: ray.get(o.rollouts[0].inject_fault.remote("hang_generate", 3600))})
    cfg = small_config(tmp_path, loop={"mode": "async", "num_steps": steps, "max_inflight": 1, "eval_samples": 0},
                       fault={"stage_timeout_s": 15}, sync={"method": "collective", "timeout_s": 30})
    summary = train(cfg)
    faults = summary["faults"]
    # the stuck batch, and the next one when it was queued on the same engine
    assert 1 <= faults["reissued_batches"] <= 2 and faults["replaced_actors"] == 1
    assert "did not finish the gen call of step 2 within 15 s (fault.stage_timeout_s): killed" in faults["events"][0]
    assert summary["final_version"] == steps and summary["weight_sync"]["groups_formed"] >= 2
    check_ledger(tmp_path / "run", summary, steps, per_step)


def test_interrupted_driver_resumes_to_the_same_run(uninterrupted, tmp_path, monkeypatch, capsys):
    from rlaif_ray.cli import main
    from rlaif_ray.runtime.driver import train

    def interrupt(orch):
        raise KeyboardInterrupt  # Ctrl-C on the driver, after the step-2 checkpoint
    inject(monkeypatch, {3: interrupt})
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tmp_path, **SYNC))
    run = tmp_path / "run"
    assert len(read_jsonl(run / "metrics.jsonl")) == 3  # step 2 ran past the checkpoint: cut on resume
    assert (run / "checkpoints" / "latest").read_text() == "step-000002"
    monkeypatch.undo()
    capsys.readouterr()
    # the job submitted again with the same config: it finds the checkpoint in its output.run_dir by itself
    assert main(["train", "-c", str(run / "config.yaml"), "--resume", "auto"]) == 0
    console = capsys.readouterr().out  # the short summary, not summary.json
    assert f"--resume auto: continuing {run} from step-000002" in console
    assert "rlaif: finished 4 steps" in console and f"{run}/summary.json" in console and '"final_version"' not in console
    ref_run, ref = uninterrupted
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-000002") and summary["final_version"] == ref["final_version"]
    # the same sample ids in the same order, the same version sequence, the same weights (CPU, sync)
    assert [(r["sample_id"], r["outcome"]) for r in check_ledger(run, summary, 4, 8)] == \
        [(r["sample_id"], r["outcome"]) for r in read_jsonl(ref_run / "samples.jsonl")]
    got, want = read_jsonl(run / "metrics.jsonl"), read_jsonl(ref_run / "metrics.jsonl")
    assert [m["policy_version"] for m in got] == [m["policy_version"] for m in want] == [1, 2, 3, 4]
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want], abs=1e-7)
    assert [m["rm_version"] for m in got] == [m["rm_version"] for m in want]
    assert [m["reward_mean"] for m in got] == pytest.approx([m["reward_mean"] for m in want], abs=1e-6)
    mine, theirs = weights(run), weights(ref_run)
    assert all(np.allclose(mine[k], theirs[k], atol=1e-6) for k in theirs)


def test_learner_rank_and_reward_model_trainer_killed_resume_from_last_checkpoint(uninterrupted, tmp_path,
                                                                                   monkeypatch):
    """The reward-model trainer's process killed at step 2 (its refit fails), then a learner rank's at step 3 (in the
    resumed run): each loss resumes the run from the step-2 checkpoint, which holds the trainer's state too; the run
    is the uninterrupted one."""
    from rlaif_ray.runtime.driver import train
    inject(monkeypatch, {2: lambda o: os.kill(pid_of(o.rm_trainer), signal.SIGKILL),
                         3: lambda o: os.kill(pid_of(o.learners.ranks[1]), signal.SIGKILL)})
    summary = train(small_config(tmp_path, **SYNC))
    run = tmp_path / "run"
    resumes = summary["faults"]["resumes"]
    assert len(resumes) == 2 and resumes[0].startswith("reward-model trainer (") and "learner step" in resumes[1]
    assert summary["resumed_from"].endswith("step-000002")
    ref_run, _ = uninterrupted
    assert [r["sample_id"] for r in check_ledger(run, summary, 4, 8)] == \
        [r["sample_id"] for r in read_jsonl(ref_run / "samples.jsonl")]
    assert [m["policy_version"] for m in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]
    mine, theirs = weights(run), weights(ref_run)
    assert all(np.allclose(mine[k], theirs[k], atol=1e-6) for k in theirs)


def test_resume_refuses_a_changed_config(uninterrupted, tmp_path, capsys):
    from rlaif_ray.cli import main
    ref_run, _ = uninterrupted
    assert main(["train", "--resume", str(ref_run), "learner.learning_rate=0.5"]) == 2
    assert main(["train", "-c", str(ref_run / "config.yaml"), "--resume", "auto", "learner.learning_rate=0.5"]) == 2
    assert "was written with a different config" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2  # not a run folder
    # --resume auto where no checkpoint is: a fresh run (here one that stops on its missing prompts file)
    assert main(["train", "--resume", "auto", f"output.run_dir={tmp_path / 'new'}", "data.prompts=nowhere.jsonl"]) == 2
    assert f"--resume auto: no checkpoint in {tmp_path / 'new'}: starting the run" in capsys.readouterr().out


def test_group_flow_resumes_and_survives_faults_group_by_group(ray_cluster, toy_world, tmp_path, monkeypatch):
    """loop.flow=groups, async, two engines: the driver interrupted after a checkpoint resumes with the groups not
    trained yet; in the resumed run an engine stuck in a group call (killed by the driver once nothing moved for
    fault.stage_timeout_s, and replaced) and the judge's process killed cost only the groups their calls held,
    re-issued under the same ids; every sample id is trained, dropped or skipped exactly once. Two group calls may
    run at once on an engine (rollout.engine_streams=2): a killed engine loses both."""
    from rlaif_ray.runtime.driver import train
    steps, per_step = 6, 4 * 2
    cfg = small_config(tmp_path, rollout={"num_workers": 2, "engine_streams": 2}, checkpoint={"every": 2},
                       loop={"mode": "async", "num_steps": steps, "max_inflight": 1, "eval_samples": 0, "flow": "groups"},
                       fault={"stage_timeout_s": 15})

    def interrupt(orch):
        raise KeyboardInterrupt
    inject(monkeypatch, {3: interrupt}, StreamingOrchestrator)  # after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    run = tmp_path / "run"
    state = json.loads((run / "checkpoints" / "step-000002" / "state.json").read_text())
    # three steps launched, two trained: four groups pending (step 2's, or stragglers of step 1 the learner left)
    assert sum(len(p["positions"]) for p in state["pending"]) == 4 and state["launched"] == 3
    monkeypatch.undo()
    inject(monkeypatch, {4: lambda o: ray.get(o.rollouts[0].inject_fault.remote("hang_generate", 3600)),  # killed
                         5: lambda o: os.kill(pid_of(o.critics[0]), signal.SIGKILL)},  # Ray restarts it
           StreamingOrchestrator)
    summary = train(cfg, resume=True)
    faults = summary["faults"]
    assert summary["resumed_from"].endswith("step-000002") and summary["final_version"] == steps
    assert faults["reissued_batches"] >= 1 and faults["reissued_groups"] >= 1 and faults["replaced_actors"] >= 1
    # one fault per dead actor, however many groups' calls it held (two kills: at most two faults against max_reissues)
    assert faults["reissued_batches"] <= 2 and len(fault_events(faults)) == faults["reissued_batches"], faults
    # the killed engine's replacement starts beside the other engine, which goes on alone meanwhile
    assert "rollout 0 died; going on with 1 of 2; waiting for 1 × {CPU: 1}" in faults["events"], faults["events"]
    assert any(re.fullmatch(r"rollout actor 0 did not finish the gen call of step [45] within 15 s "
                            r"\(fault\.stage_timeout_s\): killed", event) for event in faults["events"])
    check_ledger(run, summary, steps, per_step)
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["policy_version"] for m in metrics] == list(range(1, steps + 1))
    assert max(m["staleness_max"] for m in metrics) <= 1


def test_the_chaos_drill_plans_every_kind_apart_and_checks_the_runs_account(tmp_path):
    """jobs/chaos_run.py's plan (seeded: the same every time) and its check of a run's account against the kills."""
    from rlaif_lab.chaos import GAP, KINDS, check, plan_kills
    plan = plan_kills(3, 40, 9)
    assert plan == plan_kills(3, 40, 9) and plan != plan_kills(4, 40, 9)
    assert set(kind for _, kind in plan) == set(KINDS) and len(plan) == 9
    steps = [step for step, _ in plan]
    assert steps == sorted(steps) and all(b - a >= GAP for a, b in zip(steps, steps[1:])) and 2 <= steps[0]
    with pytest.raises(ValueError, match="kills=3: needs at least 5"):
        plan_kills(0, 40, 3)
    kills = [(2, "rollout", "rollout 0"), (5, "learner", "learner rank 1"), (8, "critic", "critic 1")]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"sample_id": f"s{k}"}) + "\n" for k in range(6)))
    summary = {"final_version": 3, "faults": {"replaced_actors": 2, "reissued_batches": 2, "resumes": ["learner"]}}
    assert all(line.endswith("OK") for line in check(summary, kills, tmp_path, 3, 2))
    summary["faults"]["replaced_actors"] = 1  # a kill the run did not account for
    assert [line for line in check(summary, kills, tmp_path, 3, 2) if line.endswith("MISMATCH")] == [
        "stage actors killed = actors replaced: 2 vs 1: MISMATCH"]

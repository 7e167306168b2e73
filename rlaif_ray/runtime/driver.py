"""The driver's entry: checks the inputs before anything starts (`rlaif_ray.runtime.inputs`), starts Ray, and
runs the job (`train`).

The loop itself lives in `rlaif_ray.runtime.orchestrator`. `train` also carries a run across learner failures: the
step stops (`LearnerFailure`), every actor is shut down, and the run resumes from its latest checkpoint
(`rlaif_ray.runtime.checkpoint`), at most `fault.max_resumes` times; `train(cfg, resume=True)` is `--resume`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import ray

from rlaif_ray.config import ConfigError, RunConfig, dump_config
from rlaif_ray.data.transport import use_arrow_ipc
from rlaif_ray.runtime import checkpoint
from rlaif_ray.runtime.faults import LearnerFailure, RunStopped, trainer_result
from rlaif_ray.runtime.inputs import Resolved, resolve_inputs
from rlaif_ray.runtime.metrics import MetricsWriter
from rlaif_ray.runtime.orchestrator import Orchestrator
from rlaif_ray.runtime.streaming import StreamingOrchestrator
from rlaif_ray.runtime.placement import check_resources
from rlaif_ray.runtime.report import write_report
from rlaif_ray.runtime.trackers import Trackers


def start_ray(cfg: RunConfig) -> None:
    use_arrow_ipc()  # the driver puts the prompt table
    if ray.is_initialized():
        if cfg.ray.py_modules:
            print(f"[rlaif] Ray was started before the run: {', '.join(cfg.ray.py_modules)} must be importable on "
                  "every node by themselves (on this one they are)", flush=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs = {"namespace": cfg.ray.namespace, "log_to_driver": True}
    if cfg.ray.py_modules:  # the user's checker / reward functions, for every actor (joins a submitted job's env)
        kwargs["runtime_env"] = {"py_modules": list(cfg.ray.py_modules)}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, **kwargs)


RUN_FILES = ("summary.json", "metrics.jsonl", "samples.jsonl", "checkpoints")  # a folder holding any holds a run


def _fresh_run_dir(cfg: RunConfig) -> Path:
    """`output.run_dir`, unless it already holds a run: then refused, replaced by the next free `-N` folder, or
    overwritten, as `output.existing` says."""
    run_dir = Path(cfg.output.run_dir)
    if not any((run_dir / name).exists() for name in RUN_FILES) or cfg.output.existing == "overwrite":
        return run_dir
    if cfg.output.existing == "refuse":
        raise ConfigError(f"output.run_dir={run_dir} already holds a run; continue it with --resume {run_dir}, "
                          "replace it with output.existing=overwrite, or write beside it with output.existing=new")
    n = 2
    while any((run_dir.with_name(f"{run_dir.name}-{n}") / name).exists() for name in RUN_FILES):
        n += 1
    cfg.output.run_dir = str(run_dir.with_name(f"{run_dir.name}-{n}"))
    print(f"[rlaif] {run_dir} already holds a run: writing this one to {cfg.output.run_dir}", flush=True)
    return Path(cfg.output.run_dir)


def truth_win_rate(after: dict, before: dict) -> float | None:
    """Ground-truth win rate of the trained policy against the initial one: one sample of each per prompt, the right
    answer beats the wrong one, equals tie (half a win); from each prompt's sampled accuracy before and after."""
    if "sampled_hits" not in after or "sampled_hits" not in before:
        return None  # a checkpoint written before per-prompt hits were kept
    n = after["samples_per_prompt"]
    rates = [(a / n, b / n) for a, b in zip(after["sampled_hits"], before["sampled_hits"])]
    return sum(a * (1 - b) + 0.5 * (a * b + (1 - a) * (1 - b)) for a, b in rates) / len(rates) if rates else None


def _reset_outputs(run_dir: Path) -> None:
    for stale in ("metrics.jsonl", "samples.jsonl", "examples.jsonl", "trackers.json"):
        (run_dir / stale).unlink(missing_ok=True)
    for folder in ("labels", "checkpoints", "tensorboard"):
        shutil.rmtree(run_dir / folder, ignore_errors=True)


def _run_once(cfg: RunConfig, resolved: Resolved, resume_from: Path | None, state: dict | None,
              stand_ins: dict | None = None, trackers: Trackers | None = None, faults: dict | None = None) -> dict:
    """Start the actors, restore the checkpoint `resume_from` (its loaded `state`) if given, run the loop to the
    end, save the policy. `faults`: the run's faults so far (after a learner failure in this driver: more than the
    checkpoint holds); a LearnerFailure leaves the run's faults on the error (`err.faults`)."""

    run_dir = Path(cfg.output.run_dir)
    if state is not None:  # lines written after the checkpoint belong to steps that run again
        checkpoint.truncate_lines(run_dir / "metrics.jsonl", state["metrics_lines"])
        checkpoint.truncate_lines(run_dir / "samples.jsonl", state["ledger_lines"])
    t0 = time.perf_counter()
    orch = (StreamingOrchestrator if cfg.loop.flow == "groups" else Orchestrator)(cfg, resolved, stand_ins)
    startup = time.perf_counter() - t0
    writer = MetricsWriter(run_dir, cfg.output.tensorboard, cfg.loop.num_steps if cfg.output.progress else None,
                           first_step=state["step"] if state else 0, trackers=trackers)
    try:
        if state is not None:
            orch.restore(resume_from, state)
            orch.eval_before = state.get("eval_before")
        else:
            orch.eval_before = orch.evaluate() if cfg.loop.eval_samples else None
        orch.faults.update(faults or {})
        warmup = orch.warm_up_reward_model() if orch.rm_trainer is not None and state is None else None
        summary = orch.run(writer, state)
        if orch.rm_trainer is not None:
            if warmup is not None:
                summary["reward_model_warmup"] = warmup
            summary["reward_model"] = trainer_result(orch.rm_trainer.save.remote(str(run_dir.resolve() / "reward_model")),
                                                     "save")
            summary["reward_model_labels"] = trainer_result(orch.rm_trainer.labels_seen.remote(), "labels seen")
        summary["startup_seconds"] = startup
        if orch.eval_before is not None:
            summary["eval_before"], summary["eval_after"] = orch.eval_before, orch.evaluate()
            summary["win_rate_vs_initial"] = truth_win_rate(summary["eval_after"], summary["eval_before"])
            summary["eval_prompts"] = "held_out" if resolved.eval_prompts is not None else "training"
        if cfg.output.save_checkpoint:
            summary["checkpoint"] = orch.save_checkpoint((run_dir / "checkpoint").resolve())
        if state is not None:
            summary["resumed_from"] = str(resume_from)
    except LearnerFailure as err:
        err.faults = orch.faults
        raise
    finally:
        writer.close()
        orch.shutdown()
    return summary


def train(cfg: RunConfig, resume: bool = False, stand_ins: dict | None = None) -> dict:
    """Run one RLAIF job end to end; returns the summary (also written to run_dir/summary.json).

    `resume`: continue the run in `output.run_dir` from its latest checkpoint. A learner rank failure
    (LearnerFailure) stops the step; the run then resumes from the latest checkpoint by itself (from the
    start when there is none), at most `fault.max_resumes` times."""
    resolved = resolve_inputs(cfg)          # bad input stops here, before Ray or any actor
    run_dir = Path(cfg.output.run_dir)
    if resume:
        resume_from = checkpoint.latest(run_dir)
        if resume_from is None:
            raise ConfigError(f"--resume {run_dir}: no checkpoint in {checkpoint.checkpoints_dir(run_dir)} "
                              "(checkpoints are written every checkpoint.every steps and checkpoint.every_minutes)")
        state = checkpoint.load_state(resume_from, cfg, resolved.prompts)  # what cannot resume fails before Ray
    else:
        resume_from = state = None
        run_dir = _fresh_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        _reset_outputs(run_dir)
    dump_config(cfg, run_dir / "config.yaml")
    start_ray(cfg)
    check_resources(cfg)
    trackers = Trackers(cfg, run_dir, resume=resume)
    summary = None
    try:
        summary = _run_resuming(cfg, resolved, resume_from, state, stand_ins, trackers)
        summary.update(status="finished", policy=resolved.policy, critic=resolved.critic,
                       prompts=resolved.prompts_path, prompts_left_out=resolved.prompts_left_out)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    except RunStopped as err:
        summary = {"status": "stopped", "reason": str(err)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        raise
    finally:
        trackers.close(summary)  # None: the run failed (an exception on its way up)
    write_report(run_dir)
    return summary


def _run_resuming(cfg: RunConfig, resolved: Resolved, resume_from: Path | None, state: dict | None,
                  stand_ins: dict | None = None, trackers: Trackers | None = None) -> dict:
    """`_run_once`, started again from the latest checkpoint after each learner failure (RunStopped past
    `fault.max_resumes`); the summary lists the failures under faults.resumes."""
    run_dir, resumes, faults = Path(cfg.output.run_dir), [], None
    while True:
        try:
            summary = _run_once(cfg, resolved, resume_from, state, stand_ins, trackers, faults)
            summary["faults"]["resumes"] = resumes
            return summary
        except LearnerFailure as err:
            resumes.append(str(err))
            faults = getattr(err, "faults", faults)  # the faults up to the failure: the checkpoint has fewer
            if len(resumes) > cfg.fault.max_resumes:
                raise RunStopped(f"the learners (or the reward-model trainer) failed {len(resumes)} times, over "
                                 f"fault.max_resumes={cfg.fault.max_resumes}; last: {err}") from err
            resume_from = checkpoint.latest(run_dir)
            state = checkpoint.load_state(resume_from, cfg, resolved.prompts) if resume_from else None
            print(f"[rlaif] {err}: resuming from {resume_from or 'the start (no checkpoint yet)'} "
                  f"({len(resumes)}/{cfg.fault.max_resumes})", flush=True)
            if resume_from is None:
                _reset_outputs(run_dir)

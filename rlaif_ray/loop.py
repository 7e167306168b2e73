"""The driver's entry: checks the inputs before anything starts, starts Ray, and runs the job (`train`).

The loop itself lives in `rlaif_ray.orchestrator`. `train` also carries a run across learner failures: the
step stops (`LearnerFailure`), every actor is shut down, and the run resumes from its latest checkpoint
(`rlaif_ray.checkpoint`), at most `fault.max_resumes` times; `train(cfg, resume=True)` is `--resume`.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from rlaif_ray import checkpoint
from rlaif_ray.config import ConfigError, RunConfig, dump_config
from rlaif_ray.prompts import load_prompts


@dataclass
class Resolved:
    """Inputs checked before any actor starts."""
    policy: str
    critic: str
    prompts_path: str
    prompts: object  # pa.Table
    reward_model: str | None = None  # backbone of reward.kind=reward_model
    prompts_left_out: int = 0        # longer than the context allows (data.long_prompts=skip)


def _check_model_path(path: str, key: str) -> None:
    """A local folder must exist and hold a config.json; `org/name` is taken as a hub id."""
    local = Path(path).expanduser()
    is_hub_id = not local.exists() and not path.startswith((".", "~", "/")) and path.count("/") <= 1
    if is_hub_id:
        return
    if not local.is_dir():
        raise ConfigError(f"{key}: model path does not exist: {path}")
    if not (local / "config.json").is_file():
        raise ConfigError(f"{key}: {path} holds no config.json (not a Hugging Face model folder)")


def _check_judge(cfg: RunConfig, critic: str) -> None:
    """The judge can give the labels the config asks for: one token per label (local), a reachable endpoint
    that answers a log-prob request (remote). Checked on the driver, before any actor starts."""
    from rlaif_ray.judge_backends import JudgeLabelError, label_token_ids

    if cfg.critic.remote.base_url:
        from rlaif_ray.remote_judge import OpenAIJudge, RemoteJudgeError
        try:
            with OpenAIJudge(cfg.critic.remote) as judge:
                judge.check()
        except RemoteJudgeError as err:
            raise ConfigError(f"critic.remote: {err}") from None
        return
    if cfg.learner.algorithm == "sft":
        return
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(critic)
    labels = cfg.critic.direct_labels if cfg.critic.method == "direct" else cfg.critic.pairwise_labels
    try:
        label_token_ids(tok, labels, critic)
    except JudgeLabelError as err:
        raise ConfigError(str(err)) from None


def resolve_inputs(cfg: RunConfig) -> Resolved:
    """Build/reuse the toy world if asked, then check model paths and the prompt file."""
    policy, critic, prompts_path = cfg.model.policy, cfg.model.critic, cfg.data.prompts
    if "toy" in (policy, critic, prompts_path):
        from rlaif_ray.toyworld import build_toy_world
        world = build_toy_world(cfg.toy, cfg.critic)
        policy = world.policy if policy == "toy" else policy
        critic = world.critic if critic == "toy" else critic
        prompts_path = world.prompts if prompts_path == "toy" else prompts_path
    _check_model_path(policy, "model.policy")
    if not cfg.critic.remote.base_url:  # a remote judge needs no local critic model
        _check_model_path(critic, "model.critic")
    _check_judge(cfg, critic)
    prompts, left_out = _fit_prompts_to_context(cfg, policy, prompts_path, load_prompts(prompts_path))
    if cfg.data.prompts_per_step > prompts.num_rows:
        raise ConfigError(f"data.prompts_per_step={cfg.data.prompts_per_step} is more than the "
                          f"{prompts.num_rows} prompts in {prompts_path}")
    local = lambda p: str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p  # noqa: E731
    reward_model = None
    if cfg.reward.kind == "reward_model":
        reward_model = {"policy": policy, "critic": critic}.get(cfg.reward.model, cfg.reward.model)
        _check_model_path(reward_model, "reward.model")
        reward_model = local(reward_model)
    return Resolved(local(policy), local(critic), prompts_path, prompts, reward_model, left_out)


def _fit_prompts_to_context(cfg: RunConfig, policy: str, path: str, prompts):
    """Prompts whose tokens leave no room for `rollout.max_new_tokens` in `model.max_model_len` would fail deep
    inside the engine: an error naming the prompt (data.long_prompts=error), or left out and counted (skip)."""
    from transformers import AutoTokenizer

    limit = cfg.model.max_model_len - cfg.rollout.max_new_tokens
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(policy)(prompts.column("prompt").to_pylist())["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > limit]
    if not too_long:
        return prompts, 0
    first = too_long[0]
    if cfg.data.long_prompts == "error":
        raise ConfigError(f"{path}: prompt '{prompts.column('prompt_id')[first].as_py()}' is {lengths[first]} tokens; "
                          f"with rollout.max_new_tokens={cfg.rollout.max_new_tokens} it may have at most {limit} "
                          f"(model.max_model_len={cfg.model.max_model_len}); {len(too_long)} prompt(s) are too long "
                          "(data.long_prompts=skip leaves them out)")
    print(f"[rlaif] data.long_prompts=skip: {len(too_long)} of {prompts.num_rows} prompts in {path} are longer than "
          f"{limit} tokens and are left out", flush=True)
    keep = sorted(set(range(prompts.num_rows)) - set(too_long))
    return prompts.take(keep), len(too_long)


def busy_fractions(busy: dict[str, float], wall: float, pool_sizes: dict[str, int]) -> dict[str, float]:
    """Share of the run's wall time each stage's actors spent working (1.0 = every actor always busy)."""
    return {stage: seconds / (wall * pool_sizes.get(stage, 1)) if wall > 0 else 0.0 for stage, seconds in busy.items()}


def start_ray(cfg: RunConfig) -> None:
    from rlaif_ray.transport import use_arrow_ipc
    use_arrow_ipc()  # the driver puts the prompt table
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs = {"namespace": cfg.ray.namespace, "log_to_driver": True}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, **kwargs)


def _reset_outputs(run_dir: Path) -> None:
    for stale in ("metrics.jsonl", "samples.jsonl"):
        (run_dir / stale).unlink(missing_ok=True)
    for folder in ("labels", "checkpoints", "tensorboard"):
        shutil.rmtree(run_dir / folder, ignore_errors=True)


def _run_once(cfg: RunConfig, resolved: Resolved, resume_from: Path | None, state: dict | None) -> dict:
    """Start the actors, restore the checkpoint `resume_from` (its loaded `state`) if given, run the loop to the
    end, save the policy."""
    from rlaif_ray.metrics import MetricsWriter
    from rlaif_ray.orchestrator import Orchestrator

    run_dir = Path(cfg.output.run_dir)
    if state is not None:  # lines written after the checkpoint belong to steps that run again
        checkpoint.truncate_lines(run_dir / "metrics.jsonl", state["metrics_lines"])
        checkpoint.truncate_lines(run_dir / "samples.jsonl", state["ledger_lines"])
    t0 = time.perf_counter()
    orch = Orchestrator(cfg, resolved)
    startup = time.perf_counter() - t0
    writer = MetricsWriter(run_dir, cfg.output.tensorboard, cfg.loop.num_steps if cfg.output.progress else None,
                           first_step=state["step"] if state else 0)
    try:
        if state is not None:
            orch.restore(resume_from, state)
            orch.eval_before = state.get("eval_before")
        else:
            orch.eval_before = orch.evaluate() if cfg.loop.eval_samples else None
        warmup = orch.warm_up_reward_model() if orch.rm_trainer is not None and state is None else None
        summary = orch.run(writer, state)
        if orch.rm_trainer is not None:
            if warmup is not None:
                summary["reward_model_warmup"] = warmup
            summary["reward_model"] = ray.get(orch.rm_trainer.save.remote(str(run_dir.resolve() / "reward_model")))
        summary["startup_seconds"] = startup
        if orch.eval_before is not None:
            summary["eval_before"], summary["eval_after"] = orch.eval_before, orch.evaluate()
        if cfg.output.save_checkpoint:
            summary["checkpoint"] = orch.save_checkpoint((run_dir / "checkpoint").resolve())
        if state is not None:
            summary["resumed_from"] = str(resume_from)
    finally:
        writer.close()
        orch.shutdown()
    return summary


def train(cfg: RunConfig, resume: bool = False) -> dict:
    """Run one RLAIF job end to end; returns the summary (also written to run_dir/summary.json).

    `resume`: continue the run in `output.run_dir` from its latest checkpoint. A learner rank failure
    (LearnerFailure) stops the step; the run then resumes from the latest checkpoint by itself (from the
    start when there is none), at most `fault.max_resumes` times."""
    import json

    from rlaif_ray.faults import LearnerFailure, RunStopped
    from rlaif_ray.report import write_report

    resolved = resolve_inputs(cfg)          # bad input stops here, before Ray or any actor
    run_dir = Path(cfg.output.run_dir)
    resume_from = state = None
    if resume:
        resume_from = checkpoint.latest(run_dir)
        if resume_from is None:
            raise ConfigError(f"--resume {run_dir}: no checkpoint in {checkpoint.checkpoints_dir(run_dir)} "
                              "(checkpoints are written every checkpoint.every steps)")
        state = checkpoint.load_state(resume_from, cfg, resolved.prompts)  # what cannot resume fails before Ray
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        _reset_outputs(run_dir)
    dump_config(cfg, run_dir / "config.yaml")
    start_ray(cfg)
    from rlaif_ray.placement import check_resources
    check_resources(cfg)
    resumes = []
    try:
        while True:
            try:
                summary = _run_once(cfg, resolved, resume_from, state)
                break
            except LearnerFailure as err:
                resumes.append(str(err))
                if len(resumes) > cfg.fault.max_resumes:
                    raise RunStopped(f"a learner rank failed {len(resumes)} times, over fault.max_resumes="
                                     f"{cfg.fault.max_resumes}; last: {err}") from err
                resume_from = checkpoint.latest(run_dir)
                state = checkpoint.load_state(resume_from, cfg, resolved.prompts) if resume_from else None
                print(f"[rlaif] {err}: resuming from {resume_from or 'the start (no checkpoint yet)'} "
                      f"({len(resumes)}/{cfg.fault.max_resumes})", flush=True)
                if resume_from is None:
                    _reset_outputs(run_dir)
    except RunStopped as err:
        (run_dir / "summary.json").write_text(json.dumps({"status": "stopped", "reason": str(err)}, indent=1))
        raise
    summary["faults"]["resumes"] = resumes
    summary.update(status="finished", policy=resolved.policy, critic=resolved.critic, prompts=resolved.prompts_path,
                   prompts_left_out=resolved.prompts_left_out)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    write_report(run_dir)
    return summary

"""`rlaif-ray eval`: is a checkpoint better than a reference, according to the configured judge?

The candidate checkpoint answers every prompt of `data.prompts` once (greedy unless `--temperature`); the
reference is another checkpoint (answering the same way) or a responses file (JSONL with `prompt_id` or
`prompt`, and `response`). The judge (`critic.method`, any pairwise method; local engine or remote endpoint)
compares each pair in both orders. Reported:
- win rate: mean P(candidate ≻ reference) over prompts, and the hard rate (ties count one half);
- length-controlled win rate: a logistic fit P(win) = σ(a + b·Δlength) over prompts, reported as σ(a),
  the win rate the candidate would have against an answer of its own length (verbosity bias removed);
- ground-truth accuracy of both sides where the prompts carry a reference answer;
- the judge's position consistency on these comparisons.
Written to OUT/eval.json and OUT/eval.png.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from rlaif_ray.config import ConfigError, RunConfig
from rlaif_ray.data.checkers import Checker, is_correct, make_checker


def length_controlled_win_rate(p_win: list[float], length_diff: list[float], iters: int = 50) -> float | None:
    """σ(a) of a logistic fit of the soft outcome on the (scaled) length difference; None if no prompts."""
    if not p_win:
        return None
    y = np.clip(np.asarray(p_win, dtype=np.float64), 0.0, 1.0)
    x = np.asarray(length_diff, dtype=np.float64)
    scale = x.std() or 1.0
    X = np.stack([np.ones_like(x), x / scale], 1)
    w = np.zeros(2)
    for _ in range(iters):  # Newton steps on the cross-entropy, lightly regularised so it always converges
        p = 1 / (1 + np.exp(-X @ w))
        grad = X.T @ (p - y) + 1e-3 * w
        hess = X.T @ (X * (p * (1 - p))[:, None]) + 1e-3 * np.eye(2)
        w -= np.linalg.solve(hess, grad)
    return float(1 / (1 + math.exp(-w[0])))


def load_responses(path: str, prompts: pa.Table) -> dict[str, str]:
    """prompt_id -> response from a JSONL file keyed by `prompt_id` or `prompt`; every prompt must be covered."""
    by_text = dict(zip(prompts.column("prompt").to_pylist(), prompts.column("prompt_id").to_pylist()))
    out: dict[str, str] = {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"reference responses file not found: {path}")
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: row {lineno}: not valid JSON ({err.msg})") from None
        pid = row.get("prompt_id") or by_text.get(row.get("prompt"))
        if pid is None or not isinstance(row.get("response"), str):
            raise ConfigError(f"{path}: row {lineno}: needs a string 'response' and a 'prompt_id' or 'prompt' "
                              "that is in the prompt file")
        out[pid] = row["response"]
    missing = [pid for pid in prompts.column("prompt_id").to_pylist() if pid not in out]
    if missing:
        raise ConfigError(f"{path}: no response for {len(missing)} prompt(s), e.g. prompt_id '{missing[0]}'")
    return out


def _as_reference(candidate: pa.Table, responses: dict[str, str]) -> pa.Table:
    rows = candidate.to_pylist()
    for row in rows:
        row.update(sample_id="ref/" + row["prompt_id"], response=responses[row["prompt_id"]], prompt_token_ids=[],
                   response_token_ids=[], response_logprobs=[], policy_version=-1,
                   token_versions=None)
    return pa.Table.from_pylist(rows, schema=candidate.schema)


def compare(labels: pa.Table, is_correct: Checker = is_correct) -> dict:
    """Figures from a labels table holding, per prompt, one `cand/` and one `ref/` row judged as a pair."""
    rows = labels.to_pylist()
    cand = {r["prompt_id"]: r for r in rows if r["sample_id"].startswith("cand/")}
    ref = {r["prompt_id"]: r for r in rows if r["sample_id"].startswith("ref/")}
    p_win, dlen, hard, agree = [], [], [], []
    for pid, c in cand.items():
        if not c["label_valid"]:
            continue
        p = c["pair_win_probs"][0]
        p_win.append(p)
        hard.append(1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5)
        dlen.append(len(c["response"]) - len(ref[pid]["response"]))
        agree.append(c["pair_position_agree"][0])
    out = {"prompts": len(cand), "judged": len(p_win), "unjudged": len(cand) - len(p_win),
           "win_rate": float(np.mean(p_win)) if p_win else None,
           "win_rate_hard": float(np.mean(hard)) if hard else None,
           "length_controlled_win_rate": length_controlled_win_rate(p_win, dlen),
           "mean_length_diff": float(np.mean(dlen)) if dlen else None,
           "position_consistency": float(np.mean(agree)) if agree else None}
    with_truth = [pid for pid, c in cand.items() if c["reference"] is not None]
    if with_truth:
        out["accuracy_candidate"] = float(np.mean([is_correct(cand[p]["response"], cand[p]["reference"]) for p in with_truth]))
        out["accuracy_reference"] = float(np.mean([is_correct(ref[p]["response"], ref[p]["reference"]) for p in with_truth]))
    return out


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("win_rate", "win rate"), ("win_rate_hard", "win rate (hard)"),
            ("length_controlled_win_rate", "length-controlled"), ("accuracy_candidate", "accuracy: candidate"),
            ("accuracy_reference", "accuracy: reference")]
    shown = [(title, result[k]) for k, title in keys if result.get(k) is not None]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([t for t, _ in shown], [v for _, v in shown], color=["C0", "C0", "C1", "C2", "C7"][:len(shown)])
    ax.axvline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    for k, (_, v) in enumerate(shown):
        ax.text(min(v + 0.01, 0.9), k, f"{v:.3f}", va="center")
    ax.set_title(f"{Path(result['candidate']).name} vs {Path(str(result['reference'])).name} — judge {result['judge']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def evaluate(cfg: RunConfig, checkpoint: str, reference: str, out_dir: str, temperature: float = 0.0) -> dict:
    import ray

    from rlaif_ray.engine import engine_env
    from rlaif_ray.runtime.driver import start_ray
    from rlaif_ray.runtime.inputs import check_model_path, resolve_inputs
    from rlaif_ray.stages.critic import new_labeler
    from rlaif_ray.stages.rollout import RolloutWorker

    if cfg.critic.method == "direct":
        raise ConfigError("eval compares two answers: critic.method must be pairwise, cot or self_reference")
    resolved = resolve_inputs(cfg)
    check_model_path(checkpoint, "checkpoint")
    ref_is_model = Path(reference).is_dir()
    if ref_is_model:
        check_model_path(reference, "--reference")
    else:
        ref_responses = load_responses(reference, resolved.prompts)
    start_ray(cfg)
    raw, env = cfg.model_dump(), {"runtime_env": {"env_vars": engine_env(cfg.engine_for("rollout"))}}
    actors = [RolloutWorker.options(**cfg.rollout.actor_options(), **env)
              .remote(str(Path(checkpoint).resolve()), raw)]
    if ref_is_model:
        actors.append(RolloutWorker.options(**cfg.rollout.actor_options(), **env).remote(
            str(Path(reference).resolve()), raw, 1))
    critic = new_labeler(resolved.critic, cfg, **cfg.critic.actor_options())
    try:
        prompts = ray.put(resolved.prompts)
        cand = ray.get(actors[0].respond.remote(prompts, temperature, "cand"))
        ref = ray.get(actors[1].respond.remote(prompts, temperature, "ref")) if ref_is_model else \
            _as_reference(cand, ref_responses)
        labels, stats = ray.get(critic.label.options(num_returns=2).remote(pa.concat_tables([cand, ref])))
        judge = ray.get(critic.ready.remote())
    finally:
        for a in [*actors, critic]:
            ray.kill(a)
    result = {"candidate": checkpoint, "reference": reference, "judge": judge, "method": cfg.critic.method,
              "temperature": temperature, **compare(labels, make_checker(cfg.data.checker)), "judge_calls": stats["judge_calls"]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    _plot(result, out / "eval.png")
    return result

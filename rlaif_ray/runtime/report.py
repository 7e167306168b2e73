"""A short run report: `report.md` with the summary figures and `report.png` with the curves."""
from __future__ import annotations

import json
from pathlib import Path

from rlaif_ray.runtime.metrics import read_jsonl

CURVES = [("reward_mean", "reward (AI feedback)"), ("true_accuracy", "ground-truth accuracy"),
          ("kl", "KL to reference"), ("position_agreement", "judge position agreement"),
          ("samples_per_s", "samples / s"), ("staleness_mean", "staleness (versions)")]


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = list(CURVES)
    rewards = [r["reward_mean"] for r in rows if r.get("reward_mean") is not None]
    if rewards and max(abs(v) for v in rewards) < 1e-6:  # pairwise win rates sum to zero within a group
        curves[0] = ("judge_truth_agreement", "judge agrees with ground truth")
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, (key, title) in zip(axes.flat, curves):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            steps, values = zip(*pts)
            ax.plot(steps, values, marker="o", ms=2, lw=0.8, alpha=0.45, label="per step")
            w = max(1, len(values) // 10)
            if w > 1:
                windows = [values[max(0, i - w + 1):i + 1] for i in range(len(values))]
                smooth = [sum(win) / len(win) for win in windows]
                ax.plot(steps, smooth, lw=2, label=f"mean of last {w}")
                ax.legend(fontsize=7, loc="best")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _mean(rows, key, sl):
    vals = [r[key] for r in rows[sl] if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    _plot(rows, run_dir / "report.png")
    k = max(1, len(rows) // 3)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        f"# RLAIF run report — {run_dir.name}", "",
        f"- algorithm: **{summary.get('algorithm', 'ppo')}**, mode: **{summary['mode']}**, steps: {len(rows)}, final policy version: {summary['final_version']}",
        f"- wall time: {summary['wall_seconds']:.1f} s (+ {summary.get('startup_seconds', 0):.1f} s actor start-up); "
        f"samples/s: {summary['samples_per_s']:.2f}",
        f"- samples: {summary['generated']} generated = {summary['trained']} trained + "
        f"{summary['dropped_stale']} dropped as stale + {summary['skipped']} skipped (see samples.jsonl)",
        *([f"- busy fraction per stage (share of wall time its actors worked): " + ", ".join(
            f"{k} {v:.2f}" for k, v in summary["busy_fraction"].items())] if summary.get("busy_fraction") else []),
        f"- policy: `{summary['policy']}`; critic: `{summary['critic']}`",
        f"- checkpoint: `{summary.get('checkpoint', 'not saved')}`", "",
        "| metric | first third | last third |", "|---|---|---|",
    ]
    for key, title in CURVES + [("judge_truth_agreement", "judge agrees with ground truth"),
                                ("first_slot_rate", "judge picks slot 1")]:
        lines.append(f"| {title} | {fmt(_mean(rows, key, slice(0, k)))} | {fmt(_mean(rows, key, slice(-k, None)))} |")
    if summary.get("eval_before"):
        b, a = summary["eval_before"], summary["eval_after"]
        lines += ["", f"## Policy on the whole prompt set (ground truth, {b['prompts']} prompts)", "",
                  "| | before | after |", "|---|---|---|",
                  f"| accuracy, {b['samples_per_prompt']} samples per prompt | {fmt(b['accuracy_sampled'])} | "
                  f"{fmt(a['accuracy_sampled'])} |",
                  f"| accuracy, greedy | {fmt(b['accuracy_greedy'])} | {fmt(a['accuracy_greedy'])} |"]
    if summary.get("judge_report"):
        lines += ["", "## Judge report (whole run)", "", "| | |", "|---|---|"]
        lines += [f"| {k.replace('_', ' ')} | {fmt(v) if isinstance(v, float) or v is None else v} |"
                  for k, v in summary["judge_report"].items()]
    faults = summary.get("faults") or {}
    if faults.get("events") or faults.get("resumes") or summary.get("resumed_from"):
        lines += ["", "## Faults survived", "",
                  f"- batches re-issued after a stage actor fault: {faults.get('reissued_batches', 0)}; actors replaced: "
                  f"{faults.get('replaced_actors', 0)}; engines given the weights again: {faults.get('resynced_engines', 0)}",
                  f"- resumes from a checkpoint after a learner failure: {len(faults.get('resumes', []))}"
                  + (f"; this run resumed from `{summary['resumed_from']}`" if summary.get("resumed_from") else "")]
        lines += [f"- {event}" for event in [*faults.get("events", []), *faults.get("resumes", [])][:20]]
    lines += ["", "![curves](report.png)", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out

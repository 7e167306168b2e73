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
        curves[0] = ("reward_std", "reward spread (std over samples)")
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


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _headline(summary: dict, steps: int) -> list[str]:
    busy = summary.get("busy_fraction")
    no_signal = summary.get("no_signal_steps", 0)
    return [
        f"- algorithm: **{summary.get('algorithm', 'ppo')}**, mode: **{summary['mode']}**, steps: {steps}, "
        f"final policy version: {summary['final_version']}",
        f"- wall time: {summary['wall_seconds']:.1f} s (+ {summary.get('startup_seconds', 0):.1f} s actor start-up); "
        f"samples/s: {summary['samples_per_s']:.2f}",
        f"- samples: {summary['generated']} generated = {summary['trained']} trained + "
        f"{summary['dropped_stale']} dropped as stale + {summary['skipped']} skipped (see samples.jsonl)",
        *([f"- steps without any reward signal (every prompt group's rewards equal, so no update): {no_signal}"]
          if no_signal else []),
        *(["- busy fraction per stage (share of wall time its actors worked): " + ", ".join(
            f"{k} {v:.2f}" for k, v in busy.items())] if busy else []),
        f"- policy: `{summary['policy']}`; critic: `{summary['critic']}`",
        f"- checkpoint: `{summary.get('checkpoint', 'not saved')}`",
    ]


def _metric_rows(rows: list[dict]) -> list[str]:
    """First third vs last third of the run. A batch-mean reward that is 0 by construction (pairwise win rates
    sum to zero within a group) says nothing: the reward spread and the share of groups with signal do."""
    for row in rows:
        groups = row.get("signal_groups", 0) + row.get("zero_signal_groups", 0)
        if groups:
            row["signal_share"] = row["signal_groups"] / groups
    rewards = [r["reward_mean"] for r in rows if r.get("reward_mean") is not None]
    curves = list(CURVES)
    if rewards and max(abs(v) for v in rewards) < 1e-6:
        curves[0] = ("reward_std", "reward spread (std over samples)")
    k = max(1, len(rows) // 3)
    lines = ["| metric | first third | last third |", "|---|---|---|"]
    for key, title in curves + [("signal_share", "prompt groups with a reward signal"),
                                ("judge_truth_agreement", "judge agrees with ground truth"),
                                ("first_slot_rate", "judge picks slot 1")]:
        lines.append(f"| {title} | {_fmt(_mean(rows, key, slice(0, k)))} | {_fmt(_mean(rows, key, slice(-k, None)))} |")
    return lines


def _eval_lines(summary: dict) -> list[str]:
    if not summary.get("eval_before"):
        return []
    b, a = summary["eval_before"], summary["eval_after"]
    where = ("the held-out prompts (data.eval_prompts)" if summary.get("eval_prompts") == "held_out"
             else "the whole prompt set")
    return ["", f"## Policy on {where} (ground truth, {b['prompts']} prompts)", "",
            "| | before | after |", "|---|---|---|",
            f"| accuracy, {b['samples_per_prompt']} sample{'s' * (b['samples_per_prompt'] != 1)} per prompt at the "
            f"rollout temperature | {_fmt(b['accuracy_sampled'])} | "
            f"{_fmt(a['accuracy_sampled'])} |",
            f"| accuracy, greedy | {_fmt(b['accuracy_greedy'])} | {_fmt(a['accuracy_greedy'])} |"] + (
        [f"| win rate against the initial policy (ground truth, ties half) | 0.500 | "
         f"{_fmt(summary['win_rate_vs_initial'])} |"] if summary.get("win_rate_vs_initial") is not None else [])


def _reward_model_lines(summary: dict) -> list[str]:
    seen = summary.get("reward_model_labels")
    if not seen:
        return []
    lines = ["", "## What the reward model learned from", ""]
    if seen.get("file"):
        sources = ", ".join(f"{n} {name}" for name, n in sorted(seen["file"]["sources"].items()))
        share = seen["file_share"]
        lines.append(f"- preference file `{seen['file']['path']}`: {seen['file_pairs']} pairs ({sources}); "
                     + ("every minibatch from the file alone" if share >= 1 else
                        f"{_fmt(share)} of each minibatch from the file, the rest from the judge's labels"))
    lines.append(f"- judge labels: {seen['judge_pairs']} pairs buffered over the run")
    lines.append(f"- minibatch rows trained: {seen['trained_on_file']} from the file, {seen['trained_on_judge']} "
                 "from the judge")
    return lines


def _judge_lines(summary: dict) -> list[str]:
    if not summary.get("judge_report"):
        return []
    return ["", "## Judge report (whole run)", "", "| | |", "|---|---|"] + [
        f"| {k.replace('_', ' ')} | {_fmt(v) if isinstance(v, float) or v is None else v} |"
        for k, v in summary["judge_report"].items()]


def _fault_lines(summary: dict) -> list[str]:
    faults = summary.get("faults") or {}
    if not (faults.get("events") or faults.get("resumes") or summary.get("resumed_from")):
        return []
    lines = ["", "## Faults survived", "",
             f"- batches re-issued after a stage actor fault: {faults.get('reissued_batches', 0)}; actors replaced: "
             f"{faults.get('replaced_actors', 0)}; engines given the weights again: {faults.get('resynced_engines', 0)}",
             f"- collective weight syncs that failed (the object store took over): {faults.get('failed_syncs', 0)}",
             f"- resumes from a checkpoint after a learner failure: {len(faults.get('resumes', []))}"
             + (f"; this run resumed from `{summary['resumed_from']}`" if summary.get("resumed_from") else "")]
    return lines + [f"- {event}" for event in [*faults.get("events", []), *faults.get("resumes", [])][:20]]


def _cell(text) -> str:
    """Text for one markdown table cell: one line, pipes escaped, long text cut."""
    text = str(text).replace("\n", " ⏎ ").replace("|", "\\|")
    return text if len(text) <= 160 else text[:157] + "..."


def _example_lines(run_dir: Path) -> list[str]:
    """The examples (run_dir/examples.jsonl) of the first and the last step: what the policy wrote, what the judge
    said, the reward it got."""
    path = run_dir / "examples.jsonl"
    rows = read_jsonl(path) if path.exists() else []
    if not rows:
        return []
    steps = sorted({r["step"] for r in rows})
    lines = ["", "## Examples (first and last step; all in examples.jsonl)"]
    for step in dict.fromkeys([steps[0], steps[-1]]):
        picked = [r for r in rows if r["step"] == step]
        lines += ["", f"Step {step}:", "", "| prompt | response | judge | reward | right | outcome |",
                  "|---|---|---|---|---|---|"]
        for r in picked:
            judge = (f"score {r['judge_score']:.1f}" if r.get("judge_score") is not None else
                     f"P(win) {r['judge_win_prob']:.2f}" if r.get("judge_win_prob") is not None else "–")
            right = {True: "✓", False: "✗"}.get(r.get("correct"), "–")
            lines.append(f"| {_cell(r['prompt'])} | {_cell(r['response'])} | {judge} | {_fmt(r.get('reward'))} | "
                         f"{right} | {r.get('outcome', '')} |")
    return lines


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    _plot(rows, run_dir / "report.png")
    lines = [f"# RLAIF run report — {run_dir.name}", "", *_headline(summary, len(rows)), "", *_metric_rows(rows),
             *_eval_lines(summary), *_reward_model_lines(summary), *_judge_lines(summary), *_fault_lines(summary),
             *_example_lines(run_dir), "",
             "![curves](report.png)", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out

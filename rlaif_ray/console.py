"""What the user's console shows. With `output.console=quiet` (the default) every stage actor sends its own output
(vLLM's engine logs, DeepSpeed's and transformers' messages, warnings) to `run_dir/logs/<stage>-<index>.log`, so the
console holds the driver's progress bar and `[rlaif]` lines; `output.console=all` leaves it where Ray sends it (the
driver's console). Errors still reach the driver: a failing actor's exception comes back through Ray.

The redirect is at the file-descriptor level, so output from C++ (vLLM's CPU kernels, gloo) goes there too. On a
cluster each node writes the logs of its actors under its own `run_dir` (a shared file system gathers them).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def stage_output_to_run_folder(cfg, name: str) -> Path | None:
    """Send this process's stdout and stderr to run_dir/logs/<name>.log (appending) unless `output.console=all`;
    returns the log file's path (None: not redirected)."""
    if cfg.output.console == "all":
        return None
    folder = Path(cfg.output.run_dir).expanduser() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    log = open(path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    return path.resolve()


def run_summary_lines(summary: dict, rows: list[dict], run_dir: str) -> list[str]:
    """The dozen lines a finished run prints (the whole summary stays in `run_dir/summary.json`): what ran, how fast,
    where every sample went, the policy before -> after where a checker exists, what the judge did, the faults, and
    where the report and the checkpoint are. `rows`: the run's metrics.jsonl lines."""
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    steps = len(rows)
    lines = [f"rlaif: finished {steps} step{'s' * (steps != 1)} of {summary.get('algorithm', 'ppo')} "
             f"({summary['mode']}) in {summary['wall_seconds']:.0f} s (+ {summary.get('startup_seconds', 0):.0f} s "
             f"start-up); {summary['samples_per_s']:.2f} samples/s",
             f"  samples       {summary['generated']} generated = {summary['trained']} trained + "
             f"{summary['dropped_stale']} stale + {summary['skipped']} skipped"]
    if summary.get("eval_before"):
        b, a = summary["eval_before"], summary["eval_after"]
        where = "held-out" if summary.get("eval_prompts") == "held_out" else "training"
        win = summary.get("win_rate_vs_initial")
        lines.append(f"  policy        accuracy on {b['prompts']} {where} prompts (checker): sampled "
                     f"{f(b['accuracy_sampled'])} -> {f(a['accuracy_sampled'])}, greedy {f(b['accuracy_greedy'])} -> "
                     f"{f(a['accuracy_greedy'])}" + (f"; win rate vs initial {f(win)}" if win is not None else ""))
    third = max(1, steps // 3)
    trend = lambda key: (_mean(rows[:third], key), _mean(rows[-third:], key))  # noqa: E731
    first, last = trend("true_accuracy")
    if first is not None:
        lines.append(f"  rollouts      right (checker): {f(first)} in the first third of the steps -> {f(last)} "
                     "in the last")
    judge = summary.get("judge_report") or {}
    if judge.get("judge_calls"):
        first, last = trend("judge_truth_agreement")
        agrees = f"agrees with the checker {f(first)} -> {f(last)}; " if first is not None else ""
        parts = [f"{name} {f(judge[key])}" for key, name in (
            ("position_consistency", "position consistency"), ("first_slot_rate", "first-slot rate")) if
            judge.get(key) is not None]
        if judge.get("position_offset"):
            parts.append(f"after a slot-1 log-odds offset of {judge['position_offset']:+.2f} (its calibration)")
        bad = [f"{name} {f(judge[key])}" for key, name in (("unparsable_share", "unparsable"),
                                                           ("failed_share", "failed")) if judge.get(key)]
        rate = judge.get("labels_per_s")
        lines.append(f"  judge         {agrees}{', '.join(parts + bad)}; {judge['judge_calls']} calls"
                     + (f", {rate:.1f} labels/s" if rate else ""))
    if summary.get("reward_model"):
        lines.append(f"  reward model  {summary['reward_model']}")
    faults = summary.get("faults") or {}
    happened = [f"{n} {what}" for what, n in (("batches re-issued", faults.get("reissued_batches", 0)),
                                              ("actors replaced", faults.get("replaced_actors", 0)),
                                              ("failed weight syncs", faults.get("failed_syncs", 0)),
                                              ("resumes", len(faults.get("resumes", []))))
                if n]
    lines.append("  faults        " + (", ".join(happened) if happened else "none"))
    lines.append(f"  report        {run_dir}/report.md (+ report.png)")
    if summary.get("checkpoint"):
        lines.append(f"  checkpoint    {summary['checkpoint']}")
    lines.append(f"  everything    {run_dir}/summary.json, metrics.jsonl, samples.jsonl, examples.jsonl" +
                 (", tensorboard/" if (Path(run_dir) / "tensorboard").is_dir() else ""))
    return lines


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None

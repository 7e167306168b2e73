"""Does a real model learn from AI feedback here? SmolLM2-135M-Instruct trained on the smol task, side by side:

- `tuned`: PPO on the tuned judge's pairwise labels (model.critic: smol_judge, the config as it is);
- `untuned`: the same against SmolLM2 as its own judge, untuned (model.critic=smol: first-slot rate 1.0, noise);
- `checker`: the checker as the reward (reward.kind=checker: the oracle's upper bound, no judge);
- `dpo`: online DPO on the tuned judge's labels (learner.algorithm=dpo).

Every variant starts from the same policy, trains on the smol world's RL prompts and is scored before and after on
its held-out sums (data.eval_prompts: smol_held_out). Writes `study.json`, `study.md` and `curves.png` (the batch's
ground-truth accuracy per step, one line per variant) under --out, plus each run's own folder.

    python jobs/smol_rlaif_study.py --out runs/smol_rlaif_study [--variants tuned,untuned,checker,dpo] [overrides]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG = Path(__file__).resolve().parent / "configs" / "smol_rlaif.yaml"
VARIANTS = {
    "tuned": ("PPO, tuned judge", []),
    "untuned": ("PPO, untuned judge (SmolLM2 as it is)", ["model.critic=smol"]),
    "checker": ("PPO, checker as the reward (oracle)", ["reward.kind=checker"]),
    "dpo": ("online DPO, tuned judge", ["learner.algorithm=dpo"]),
}


def run_variant(key: str, overrides: list[str], out: Path) -> dict:
    from rlaif_ray.config import load_config
    from rlaif_ray.runtime.driver import train
    label, own = VARIANTS[key]
    cfg = load_config(CONFIG, [*own, *overrides, f"output.run_dir={out / key}", "output.existing=overwrite"])
    t0 = time.perf_counter()
    summary = train(cfg)
    metrics = [json.loads(line) for line in (out / key / "metrics.jsonl").read_text().splitlines()]
    b, a = summary["eval_before"], summary["eval_after"]
    row = {"variant": key, "label": label, "seconds": round(time.perf_counter() - t0, 1),
           "sampled_before": b["accuracy_sampled"], "sampled_after": a["accuracy_sampled"],
           "greedy_before": b["accuracy_greedy"], "greedy_after": a["accuracy_greedy"],
           "eval_prompts": b["prompts"], "eval_samples": b["samples_per_prompt"],
           "judge": summary.get("judge_report", {}), "curve": [m.get("true_accuracy") for m in metrics]}
    agreement = [m["judge_truth_agreement"] for m in metrics if m.get("judge_truth_agreement") is not None]
    row["judge"]["judge_truth_agreement"] = sum(agreement) / len(agreement) if agreement else None
    print(f"[study] {label}: held-out sampled {row['sampled_before']:.3f} -> {row['sampled_after']:.3f}, greedy "
          f"{row['greedy_before']:.3f} -> {row['greedy_after']:.3f} ({row['seconds']:.0f} s)", flush=True)
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for row in rows:
        y = np.asarray([np.nan if v is None else v for v in row["curve"]], dtype=float)
        k = min(5, len(y))
        smooth = np.convolve(np.nan_to_num(y, nan=np.nanmean(y)), np.ones(k) / k, mode="valid")
        ax.plot(np.arange(1, len(y) + 1), y, alpha=0.25)
        ax.plot(np.arange(k, len(y) + 1), smooth, color=ax.lines[-1].get_color(),
                label=f"{row['label']}: held-out {row['sampled_before']:.2f} → {row['sampled_after']:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("ground-truth accuracy of the batch (sampled)")
    ax.set_title("SmolLM2-135M-Instruct learning the smol task (moving mean of 5 steps)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | held-out sampled before → after | greedy before → after | judge agrees with truth "
             "| position consistency | first-slot rate | wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        j = r["judge"]
        fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {r['label']} | {r['sampled_before']:.3f} → {r['sampled_after']:.3f} "
                     f"(**{r['sampled_after'] - r['sampled_before']:+.3f}**) | {r['greedy_before']:.3f} → "
                     f"{r['greedy_after']:.3f} | {fmt(j.get('judge_truth_agreement'))} | {fmt(j.get('position_consistency'))} "
                     f"| {fmt(j.get('first_slot_rate'))} "
                     f"| {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/smol_rlaif_study")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every variant, e.g. loop.num_steps=20")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    rows = []
    for key in keys:
        rows.append(run_variant(key, args.overrides, out))
        (out / "study.json").write_text(json.dumps(rows, indent=1))  # what finished so far
    (out / "study.md").write_text(markdown(rows))
    plot(rows, out / "curves.png")
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()

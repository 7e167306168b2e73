"""The papers' claims on the real policy (`jobs/claims_study.py --smol`): SmolLM2-135M-Instruct on the smol task
(`jobs/configs/smol_rlaif.yaml` as it is, one seed), judged by SmolLM2 untuned and by SmolLM2 tuned as a judge
(model.critic=smol_judge). Three measurements, each against the checker's ground truth:

- position bias (claim 3): both judges label the initial policy's batch of the RL prompts; agreement of one order
  alone, of both orders averaged and of self-reference, the position consistency and the first-slot rate;
- labeler quality (claim 2 on the real policy: a better labeler, a better policy): PPO against each judge; held-out
  accuracy before -> after beside each judge's agreement;
- RLAIF vs RLHF (claim 1): a reward model (SmolLM2's own checkpoint as the backbone, so the tuned judge's
  checker-trained weights help neither side) trained on the tuned judge's labels of the initial batch vs one
  trained on simulated human labels of the same batch (the checker, wrong at `--rater-noise`), then PPO/GRPO on it.
"""
from __future__ import annotations

from pathlib import Path

CONFIG = Path(__file__).resolve().parent / "configs" / "smol_rlaif.yaml"
JUDGES = {"untuned": ("SmolLM2 judge, untuned", ["model.critic=smol"]),
          "tuned": ("SmolLM2 judge, tuned (smol_judge)", [])}
# reward models start from the policy's checkpoint: the tuned judge learned from the checker, and the comparison is
# of the labels, not of a backbone that already knows the answer; 30 minibatches of 32 pairs before RL (about 8 min
# on one core), no refit
REWARD_MODEL = {"reward.kind": "reward_model", "reward.model": "policy", "learner.advantage": "grpo",
                "reward.refresh_every": 0, "reward.warmup_steps": 30, "reward.label_share": 0}
RUNS = {  # name -> (claim, what its reward is, overrides; FILE_AI / FILE_HUMAN: the files the study writes)
    "rlaif_tuned": ("2", "tuned judge, pairwise (PPO)", []),
    "rlaif_untuned": ("2", "untuned judge, pairwise (PPO)", ["model.critic=smol"]),
    "rlaif_rm": ("1", "reward model on the tuned judge's labels (AI file)",
                 [f"{k}={v}" for k, v in REWARD_MODEL.items()] + ["preferences.path=FILE_AI"]),
    "rlhf_rm": ("1", "reward model on simulated human labels (human file)",
                [f"{k}={v}" for k, v in REWARD_MODEL.items()] + ["preferences.path=FILE_HUMAN"]),
}
TOLERANCE = 0.05


def run(chosen: list[str], out: Path, rater_noise: float, seed: int, label_figures, train, rm_truth_agreement) -> dict:
    """The smol section of the study: judges' label figures, then the runs the chosen claims need."""
    from rlaif_ray.config import load_config
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"config": str(CONFIG.relative_to(CONFIG.parents[2])), "seed": seed, "judges": {}, "runs": {}}
    heldout = None
    # claim 1 alone needs only the tuned judge's pairwise labels (its AI file); claims 2-3 compare both judges
    judges = {k: v for k, v in JUDGES.items() if k == "tuned" or {"2", "3"} & set(chosen)}
    methods = ("pairwise", "self_reference") if "3" in chosen else ("pairwise",)
    for key, (label, overrides) in judges.items():
        cfg = load_config(CONFIG, [*overrides, f"loop.seed={seed}"])
        files = key == "tuned" and "1" in chosen
        figures = label_figures(cfg, out, rater_noise, files=files, methods=methods)
        pair = figures["methods"]["pairwise"]
        result["judges"][key] = {"label": label, **pair["orders"], "first_slot_rate": pair["first_slot_rate"],
                                 "unparsable_share": pair["unparsable_share"],
                                 "self_reference": (figures["methods"].get("self_reference") or {}).get("truth_agreement")}
        result["batch"] = figures["batch"]
        if files:
            result["files"], heldout = figures["files"], figures["heldout_pairs"]
    subst = {"FILE_AI": (result.get("files") or {}).get("ai"), "FILE_HUMAN": (result.get("files") or {}).get("human")}
    for name, (claim, label, overrides) in RUNS.items():
        if claim not in chosen:
            continue
        resolved = [o.split("=", 1)[0] + "=" + subst.get(o.split("=", 1)[1], o.split("=", 1)[1]) for o in overrides]
        row = train(str(CONFIG), resolved, out / "runs" / f"{name}-s{seed}", seed)
        if "reward_model" in row and heldout:
            row["rm_truth_agreement"] = rm_truth_agreement(row["reward_model"], heldout)
        result["runs"][name] = {"claim": claim, "label": label, **row}
    result["verdicts"] = verdicts(result)
    return result


def verdicts(r: dict) -> list[str]:
    from rlaif_lab.claims import verdict
    out, j, runs = [], r["judges"], r["runs"]
    for key in j:
        x = j[key]
        if x["one_order"] is not None:
            out.append(verdict(x["both_orders"] >= x["one_order"], f"{x['label']}: averaging both orders agrees with "
                               "the truth at least as well as one order",
                               f"{x['both_orders']:.3f} vs {x['one_order']:.3f}; position consistency "
                               f"{x['position_consistency']:.3f}, first-slot rate {x['first_slot_rate']:.3f}"))
    if "rlaif_tuned" in runs and "rlaif_untuned" in runs and "tuned" in j and "untuned" in j:
        gain = {k: runs[f"rlaif_{k}"]["accuracy_sampled"] - runs[f"rlaif_{k}"]["before_sampled"] for k in j}
        better_judge = (j["tuned"]["both_orders"] or 0) > (j["untuned"]["both_orders"] or 0)
        out.append(verdict(better_judge and gain["tuned"] > gain["untuned"],
                           "a better labeler gives a better policy (labeler quality -> policy gain)",
                           f"judge agreement {j['untuned']['both_orders']:.3f} -> {j['tuned']['both_orders']:.3f}; "
                           f"held-out sampled gain {gain['untuned']:+.3f} -> {gain['tuned']:+.3f}"))
    if "rlaif_rm" in runs and "rlhf_rm" in runs:
        a, h = runs["rlaif_rm"]["accuracy_sampled"], runs["rlhf_rm"]["accuracy_sampled"]
        before = runs["rlaif_rm"]["before_sampled"]
        # both policies ending below where they started: each reward model was exploited, and which one was exploited
        # less says nothing about RLAIF against RLHF
        holds = None if max(a, h) < before else a >= h - TOLERANCE
        out.append(verdict(holds, "RLAIF is comparable to RLHF (held-out accuracy within 0.05 or better)",
                           (f"both policies ended below the initial {before:.3f}: the reward models were exploited; "
                            if holds is None else "") +
                           f"held-out sampled {a:.3f} with the tuned judge's labels vs {h:.3f} with simulated human "
                           f"labels; reward models agree with the truth on {_f(runs['rlaif_rm'].get('rm_truth_agreement'))}"
                           f" vs {_f(runs['rlhf_rm'].get('rm_truth_agreement'))} of held-out pairs"))
    return out


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def to_markdown(r: dict, rater_noise: float) -> list[str]:
    lines = [f"## On the real policy: SmolLM2-135M-Instruct ({r['config']}, seed {r['seed']})", "",
             f"Both judges label the initial policy's batch ({r['batch']['samples']} samples of "
             f"{r['batch']['prompts']} RL prompts, {r['batch']['decided_pairs']} pairs with exactly one right answer).",
             "", "| judge | one order agrees | both orders averaged | self-reference | position consistency | "
                 "first-slot rate | PPO held-out sampled before → after | greedy before → after |",
             "|---|---|---|---|---|---|---|---|"]
    for key, j in r["judges"].items():
        run = r["runs"].get(f"rlaif_{key}")
        ppo = (f"{run['before_sampled']:.3f} → **{run['accuracy_sampled']:.3f}** | {run['before_greedy']:.3f} → "
               f"{run['accuracy_greedy']:.3f}") if run else "– | –"
        lines.append(f"| {j['label']} | {_f(j['one_order'])} | {_f(j['both_orders'])} | {_f(j['self_reference'])} | "
                     f"{_f(j['position_consistency'])} | {_f(j['first_slot_rate'])} | {ppo} |")
    rms = [n for n in ("rlaif_rm", "rlhf_rm") if n in r["runs"]]
    if rms:
        f = r["files"]
        lines += ["", f"RLAIF vs RLHF: the AI file holds the tuned judge's labels ({f['ai_pairs']} pairs; right on "
                      f"{_f(f['ai_truth_agreement'])} of decided pairs), the human file the simulated raters' "
                      f"({f['human_pairs']} decided pairs, rater noise {rater_noise:g}: right on "
                      f"{_f(f['human_truth_agreement'])}).", "",
                  "| run | reward | RM agrees with truth (held out) | held-out sampled before → after | greedy | "
                  "win rate vs initial |", "|---|---|---|---|---|---|"]
        for n in rms:
            x = r["runs"][n]
            lines.append(f"| {n} | {x['label']} | {_f(x.get('rm_truth_agreement'))} | {x['before_sampled']:.3f} → "
                         f"**{x['accuracy_sampled']:.3f}** | {x['accuracy_greedy']:.3f} | {_f(x.get('win_rate'))} |")
    return lines + [""] + [f"- {v}" for v in r["verdicts"]] + [""]


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    judges = list(r["judges"])
    for off, key in ((-0.27, "one_order"), (0, "both_orders"), (0.27, "self_reference")):
        a.bar([i + off for i in range(len(judges))], [r["judges"][j][key] or 0 for j in judges], width=0.27,
              label=key.replace("_", " "))
    a.set_xticks(range(len(judges)), judges)
    a.set_ylim(0, 1.15)
    a.set_title("SmolLM2 judges: agreement with truth")
    a.legend(fontsize=7, ncol=3, loc="upper center")
    names = list(r["runs"])
    b.bar(names, [r["runs"][n]["accuracy_sampled"] for n in names], color="tab:blue", label="after")
    if names:
        b.axhline(r["runs"][names[0]]["before_sampled"], color="grey", ls="--", lw=0.8, label="before")
    b.set_ylim(0, 1)
    b.set_title("SmolLM2 policy: held-out sampled accuracy")
    b.tick_params(axis="x", rotation=20)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

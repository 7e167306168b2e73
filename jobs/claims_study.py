"""The papers' headline claims, side by side on the toy world's ground truth, from one command:

    python jobs/claims_study.py -c jobs/configs/toy_cpu.yaml --out runs/claims [--seeds 0,1] [--smol [--no-toy]]
                                [overrides...]

1. RLAIF vs RLHF (Lee et al. 2023): the policy trained against a reward model that learned from AI labels, from
   simulated human labels (the checker with `--rater-noise`, 0.25 by default: rlaif_lab.claims), and from both
   (half of each minibatch); plus d-RLAIF (direct scores, no reward model) and online DPO on the judge's pairs. AI
   and human labels are the same artefact: preference files of the initial policy's samples, the AI one written
   from the judge's labels as `rlaif-ray preferences` writes it. Ground-truth accuracy and win rate against the
   initial policy; each reward model's agreement with the truth on a held-out batch.
2. Labeler size (Lee et al.: alignment grows with the labeler's size): three toy critics of width 32, 64 and 128
   built by one recipe; agreement with the truth per labeling method, and the policy accuracy each one's RLAIF gives.
3. Position bias and its remedies (Lee et al.; MT-Bench): agreement of one order alone, both orders averaged and
   self-reference, with the position consistency, for each toy critic.
4. Strong teacher (Sharma et al. 2024): SFT on the critic's own answers against the weak-teacher SFT policy (the toy
   policy was pre-trained on a weak teacher's answers) followed by RLAIF with the same critic, same steps.
`--smol` adds claims 1-3 on the real policy, SmolLM2-135M-Instruct judged by SmolLM2 untuned and tuned as a judge
(jobs/claims_smol.py: about an hour on 2 cores); `--no-toy` leaves the toy claims out.
Writes OUT/claims.json, OUT/claims.md (one table and a verdict line per claim) and OUT/claims.png (and with `--smol`
OUT/claims_smol.png); prints the tables.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import claims_smol  # jobs/ is on the path: the script's own folder

CLAIMS = ("1", "2", "3", "4")
WIDTHS = (32, 64, 128)
METHODS = ("pairwise", "cot", "self_reference", "direct")
REWARD_MODEL = {"reward.kind": "reward_model", "reward.model": "critic", "learner.advantage": "grpo",
                "reward.refresh_every": 0, "reward.warmup_steps": 150}  # trained before RL, on the labels given
FEEDBACK_RUNS = {  # claim 1: name -> overrides (FILE_AI / FILE_HUMAN: the preference files the study writes)
    "rlaif_rm": {**REWARD_MODEL, "preferences.path": "FILE_AI", "reward.label_share": 0},
    "rlhf_rm": {**REWARD_MODEL, "preferences.path": "FILE_HUMAN", "reward.label_share": 0},
    # the human file and the judge's labels of as many fresh initial-policy samples, half of each minibatch
    "mixed_rm": {**REWARD_MODEL, "preferences.path": "FILE_HUMAN", "preferences.share": 0.5,
                 "reward.warmup_batches": "PROMPT_BATCHES"},
    "d_rlaif": {"critic.method": "direct", "reward.kind": "direct_score"},
    "online_dpo": {"learner.algorithm": "dpo", "reward.kind": "win_rate"},
}
RLAIF = {"learner.algorithm": "ppo", "reward.kind": "win_rate"}  # claims 2 and 4: the base config's RLAIF
SFT_CRITIC = {"learner.algorithm": "sft"}
TOLERANCE = 0.05  # "comparable": within 5 points of accuracy
CEILING = 0.995   # agreement at which a remedy has nothing left to fix (the verdict says "not measurable here")


def _train(cfg_path, overrides, run_dir, seed):
    from rlaif_ray.config import load_config
    from rlaif_ray.runtime.driver import train

    cfg = load_config(cfg_path, [*overrides, f"loop.seed={seed}", f"output.run_dir={run_dir}",
                                 "output.progress=false", "output.existing=overwrite"])
    t0 = time.perf_counter()
    s = train(cfg)
    row = {"seed": seed, "accuracy_sampled": s["eval_after"]["accuracy_sampled"],
           "accuracy_greedy": s["eval_after"]["accuracy_greedy"], "win_rate": s.get("win_rate_vs_initial"),
           "before_sampled": s["eval_before"]["accuracy_sampled"], "before_greedy": s["eval_before"]["accuracy_greedy"],
           "steps": s["final_version"], "wall_seconds": time.perf_counter() - t0}
    if "reward_model_labels" in s:
        row["reward_model"], row["reward_model_labels"] = s["reward_model"], s["reward_model_labels"]
    print(f"[claims] {Path(run_dir).name} seed {seed}: sampled {row['before_sampled']:.3f} -> "
          f"{row['accuracy_sampled']:.3f}, win rate {row['win_rate']:.3f}", flush=True)
    return row


def _summarise(runs):
    from rlaif_lab.claims import mean_of
    keys = ("accuracy_sampled", "accuracy_greedy", "win_rate", "rm_truth_agreement", "before_sampled", "before_greedy")
    out = {k: mean_of(runs, k) for k in keys}
    out["seeds"], out["per_seed"] = [r["seed"] for r in runs], runs
    out["spread_sampled"] = (max(r["accuracy_sampled"] for r in runs) - min(r["accuracy_sampled"] for r in runs)
                             if len(runs) > 1 else None)
    return out


def label_figures(cfg, out: Path, rater_noise: float, files: bool, methods=METHODS) -> dict:
    """One critic's labels of the initial policy's batch: agreement per method, the position-bias figures, and (with
    `files`) the human and AI preference files and the held-out batch's decided pairs."""
    import ray

    from rlaif_ray.data.checkers import make_checker
    from rlaif_ray.data.preferences import labels_to_preferences
    from rlaif_ray.judge.quality import judge_bias_counts, judge_report, label_quality
    from rlaif_lab import claims
    from rlaif_lab.studies import initial_batch

    checker = make_checker(cfg.data.checker)
    result = {"methods": {}}
    with initial_batch(cfg, heldout=files) as (rollouts, critic, resolved, heldout):
        points = cfg.critic.score_points()
        for method in methods:
            labels, stats = ray.get(critic.label.options(num_returns=2).remote(rollouts, method))
            report = judge_report({**judge_bias_counts(labels), **stats})
            row = {"truth_agreement": label_quality(labels, checker, points).get("judge_truth_agreement"),
                   "position_consistency": report.get("position_consistency"),
                   "first_slot_rate": report.get("first_slot_rate"), "unparsable_share": report.get("unparsable_share")}
            if method == "pairwise":
                row["orders"] = claims.order_agreement(labels, checker)
                ai_rows = labels_to_preferences(labels)
            result["methods"][method] = row
            print(f"[claims] {Path(resolved.critic).parent.name} {method}: agreement {row['truth_agreement']}", flush=True)
        result["batch"] = {"prompts": resolved.prompts.num_rows, "samples": rollouts.num_rows,
                           "decided_pairs": len(claims.decided_pairs(rollouts, checker))}
        if files:
            human_rows = claims.simulated_rater_rows(rollouts, checker, rater_noise, cfg.loop.seed)
            refs = dict(zip(rollouts.column("prompt").to_pylist(), rollouts.column("reference").to_pylist()))
            result["files"] = {
                "human": str(claims.write_jsonl(human_rows, out / "human_preferences.jsonl").resolve()),
                "ai": str(claims.write_jsonl(ai_rows, out / "ai_preferences.jsonl").resolve()),
                "human_pairs": len(human_rows), "ai_pairs": len(ai_rows),
                "human_truth_agreement": claims.file_truth_agreement(human_rows, checker, refs),
                "ai_truth_agreement": claims.file_truth_agreement(ai_rows, checker, refs)}
            result["heldout_pairs"] = [(p, heldout.column("response")[g].as_py(), heldout.column("response")[b].as_py(),
                                        1.0) for g, b in claims.decided_pairs(heldout, checker)
                                       for p in [heldout.column("prompt")[g].as_py()]]
    return result


def rm_truth_agreement(path: str, pairs: list) -> float:
    from rlaif_ray.stages.reward_model import load_reward_model, ranking_accuracy
    model, tok = load_reward_model(path)
    model.eval()
    return ranking_accuracy(model, tok, pairs)


def _spread(run: dict) -> str:
    """" (±x)": half the range of the sampled accuracy over the seeds, when there are several."""
    return "" if run.get("spread_sampled") is None else f" (±{run['spread_sampled'] / 2:.3f})"


def to_markdown(study: dict) -> str:
    from rlaif_lab.claims import fmt
    lines = [f"# The papers' claims against ground truth ({study['config']}{' ' if study['overrides'] else ''}"
             f"{' '.join(study['overrides'])}; seeds {', '.join(map(str, study['seeds']))})", ""]
    c = study["claims"]
    if "1" in c:
        f = c["1"]["files"]
        lines += ["## 1. RLAIF vs RLHF (Lee et al. 2023)", "",
                  f"Labels of the initial policy's {c['1']['batch']['samples']} samples: human file {f['human_pairs']} "
                  f"pairs (rater noise {study['rater_noise']:g}: agrees with the truth on {fmt(f['human_truth_agreement'])}"
                  f" of decided pairs), AI file {f['ai_pairs']} pairs (judge agrees on {fmt(f['ai_truth_agreement'])}).",
                  "", "| run | labels | RM agrees with truth (held out) | sampled accuracy (seed spread) | "
                      "greedy accuracy | win rate vs initial |", "|---|---|---|---|---|---|"]
        for name, r in c["1"]["runs"].items():
            lines.append(f"| {name} | {c['1']['labels'][name]} | {fmt(r['rm_truth_agreement'])} | "
                         f"{fmt(r['accuracy_sampled'])}{_spread(r)} | {fmt(r['accuracy_greedy'])} | "
                         f"**{fmt(r['win_rate'])}** |")
        lines += ["", f"Initial policy: sampled accuracy {fmt(c['1']['before'])}.", ""] + \
                 [f"- {v}" for v in c["1"]["verdicts"]] + [""]
    if "2" in c:
        lines += ["## 2. Labeler size (Lee et al. 2023)", "",
                  "| critic width (params) | " + " | ".join(f"{m} agrees" for m in c["2"]["methods"]) +
                  " | RLAIF sampled accuracy (seed spread) | win rate vs initial |",
                  "|---|" + "---|" * (len(c["2"]["methods"]) + 2)]
        for w, r in c["2"]["critics"].items():
            lines.append(f"| {w} ({r['params']:,}) | " + " | ".join(fmt(r["methods"][m]["truth_agreement"])
                                                                   for m in c["2"]["methods"]) +
                         f" | {fmt(r['run']['accuracy_sampled'])}{_spread(r['run'])} | {fmt(r['run']['win_rate'])} |")
        lines += [""] + [f"- {v}" for v in c["2"]["verdicts"]] + [""]
    if "3" in c:
        lines += ["## 3. Position bias and its remedies (Lee et al.; MT-Bench)", "",
                  "| judge | position consistency | one order agrees | both orders averaged | self-reference | "
                  "decided pairs |", "|---|---|---|---|---|---|"]
        for name, r in c["3"]["judges"].items():
            lines.append(f"| {name} | {fmt(r['position_consistency'])} | {fmt(r['one_order'])} | "
                         f"{fmt(r['both_orders'])} | {fmt(r['self_reference'])} | {r['decided_pairs']} |")
        lines += [""] + [f"- {v}" for v in c["3"]["verdicts"]] + [""]
    if "4" in c:
        r = c["4"]
        lines += ["## 4. Strong teacher (Sharma et al. 2024)", "",
                  "| policy | sampled accuracy | greedy accuracy | win rate vs initial |", "|---|---|---|---|",
                  f"| weak-teacher SFT (the initial toy policy) | {fmt(r['rlaif']['before_sampled'])} | "
                  f"{fmt(r['rlaif']['before_greedy'])} | 0.500 |",
                  f"| SFT on the critic's answers | {fmt(r['sft_critic']['accuracy_sampled'])}{_spread(r['sft_critic'])} | "
                  f"{fmt(r['sft_critic']['accuracy_greedy'])} | {fmt(r['sft_critic']['win_rate'])} |",
                  f"| weak-teacher SFT + RLAIF (same critic) | {fmt(r['rlaif']['accuracy_sampled'])}{_spread(r['rlaif'])} | "
                  f"{fmt(r['rlaif']['accuracy_greedy'])} | {fmt(r['rlaif']['win_rate'])} |", ""] + \
                 [f"- {v}" for v in r["verdicts"]] + [""]
    if c:
        lines += [f"Every toy run {study['steps']} steps; figures are means over seeds "
                  f"{', '.join(map(str, study['seeds']))} (± half the range over the seeds)."]
    lines += [f"Whole study {study['wall_seconds'] / 60:.0f} min on this machine."]
    return "\n".join(lines)


def plot(study: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c = study["claims"]
    panels = [k for k in CLAIMS if k in c]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, k in zip(axes[0], panels):
        if k == "1":
            names = list(c["1"]["runs"])
            ax.bar(names, [c["1"]["runs"][n]["win_rate"] or 0 for n in names], color="tab:blue")
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_title("1. win rate vs initial policy")
            ax.tick_params(axis="x", rotation=30)
        elif k == "2":
            widths = list(c["2"]["critics"])
            for m in c["2"]["methods"]:
                ax.plot(widths, [c["2"]["critics"][w]["methods"][m]["truth_agreement"] or math.nan for w in widths],
                        marker="o", label=m)
            ax.plot(widths, [c["2"]["critics"][w]["run"]["accuracy_sampled"] for w in widths], marker="s", color="k",
                    label="policy accuracy")
            ax.set_title("2. labeler size")
            ax.set_xscale("log", base=2)
            ax.set_xticks(widths, [str(w) for w in widths])
            ax.set_xlabel("critic width")
            ax.legend(fontsize=7)
        elif k == "3":
            judges = list(c["3"]["judges"])
            for off, key in ((-0.27, "one_order"), (0, "both_orders"), (0.27, "self_reference")):
                ax.bar([i + off for i in range(len(judges))],
                       [c["3"]["judges"][j][key] or 0 for j in judges], width=0.27, label=key.replace("_", " "))
            ax.set_xticks(range(len(judges)), [j.replace(" judge", "") for j in judges], rotation=20)
            ax.set_title("3. agreement with truth")
            ax.legend(fontsize=7, ncol=3, loc="upper center")
        else:
            r = c["4"]
            ax.bar(["weak SFT", "SFT on critic", "weak SFT + RLAIF"],
                   [r["rlaif"]["before_sampled"], r["sft_critic"]["accuracy_sampled"], r["rlaif"]["accuracy_sampled"]],
                   color=["grey", "tab:orange", "tab:blue"])
            ax.set_title("4. strong teacher: accuracy")
            ax.tick_params(axis="x", rotation=15)
        ax.set_ylim(0, 1.15 if k == "3" else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from rlaif_ray.config import ConfigError, load_config
    from rlaif_lab.claims import verdict

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", default="jobs/configs/toy_cpu.yaml")
    parser.add_argument("--out", default="runs/claims")
    parser.add_argument("--claims", default=",".join(CLAIMS), help="which claims, of 1,2,3,4")
    parser.add_argument("--seeds", default="0", help="loop.seed of every training run, comma-separated")
    parser.add_argument("--rater-noise", type=float, default=0.25,
                        help="share of decided pairs a simulated human rater gets wrong")
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="toy critic widths for claims 2 and 3")
    parser.add_argument("--runs", default=",".join(FEEDBACK_RUNS), help="claim 1's runs, of " + ",".join(FEEDBACK_RUNS))
    parser.add_argument("--smol", action="store_true",
                        help="claims 1-3 on SmolLM2 with an untuned and a tuned SmolLM2 judge too (about an hour)")
    parser.add_argument("--no-toy", action="store_true", help="leave the toy world's claims out (with --smol)")
    parser.add_argument("--report-only", action="store_true",
                        help="re-write claims.md and claims.png from OUT/claims.json (nothing is run)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    if args.report_only:
        if not (out / "claims.json").is_file():
            print(f"claims_study: error: --report-only reads {out / 'claims.json'}, which is not there", file=sys.stderr)
            return 2
        study = json.loads((out / "claims.json").read_text())
        if "smol" in study:  # the SmolLM2 verdicts read again from its figures (their rules may have changed)
            study["smol"]["verdicts"] = claims_smol.verdicts(study["smol"])
        return write_outputs(study, out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [k for k in args.claims.split(",") if k]
    runs = [r for r in args.runs.split(",") if r]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
        widths = [int(w) for w in args.widths.split(",") if w]
    except ValueError:
        print("claims_study: error: --seeds and --widths take comma-separated integers", file=sys.stderr)
        return 2
    bad = ([k for k in chosen if k not in CLAIMS] + [r for r in runs if r not in FEEDBACK_RUNS] +
           [str(w) for w in widths if w not in WIDTHS])
    if args.no_toy and not args.smol:
        print("claims_study: error: --no-toy leaves nothing to run without --smol", file=sys.stderr)
        return 2
    if bad or not seeds or not 0 <= args.rater_noise < 0.5 or not chosen:
        print(f"claims_study: error: unknown or empty {', '.join(bad) or '--seeds/--claims'} (claims {','.join(CLAIMS)};"
              f" runs {','.join(FEEDBACK_RUNS)}; widths {','.join(map(str, WIDTHS))}; --rater-noise in [0, 0.5))",
              file=sys.stderr)
        return 2
    try:
        base = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"claims_study: error: {err}", file=sys.stderr)
        return 2
    if base.loop.eval_samples < 1:
        print("claims_study: error: the claims are read from ground-truth accuracy: loop.eval_samples must be at least 1",
              file=sys.stderr)
        return 2
    study = {"config": args.config, "overrides": args.overrides, "seeds": seeds, "rater_noise": args.rater_noise,
             "steps": base.loop.num_steps, "claims": {}}
    c = study["claims"]
    # the run's settings, then the command line's overrides (which win: e.g. reward.warmup_steps for a short study)
    train_at = lambda name, overrides, seed: _train(args.config, [*overrides, *args.overrides],  # noqa: E731
                                                    out / "runs" / f"{name}-s{seed}", seed)

    toy = not args.no_toy
    if toy and "1" in chosen:
        figures = label_figures(base, out, args.rater_noise, files=True, methods=("pairwise",))
        files, heldout = figures["files"], figures.pop("heldout_pairs")
        batches = math.ceil(figures["batch"]["prompts"] / base.data.prompts_per_step)  # the file's prompts, judged
        subst = {"FILE_AI": files["ai"], "FILE_HUMAN": files["human"], "PROMPT_BATCHES": batches}
        result = {"files": files, "batch": figures["batch"], "runs": {}, "labels": {}}
        for name in runs:
            overrides = [f"{k}={subst.get(v, v) if isinstance(v, str) else v}" for k, v in FEEDBACK_RUNS[name].items()]
            rows = []
            for seed in seeds:
                row = train_at(name, overrides, seed)
                if "reward_model" in row:
                    row["rm_truth_agreement"] = rm_truth_agreement(row["reward_model"], heldout)
                rows.append(row)
            result["runs"][name] = _summarise(rows)
            seen = rows[0].get("reward_model_labels")
            result["labels"][name] = ("judge (direct scores)" if name == "d_rlaif" else "judge (pairs, online)"
                                      if name == "online_dpo" else
                                      f"{seen['trained_on_file']} file rows ({Path(seen['file']['path']).stem}) + "
                                      f"{seen['trained_on_judge']} judge rows")
        result["before"] = mean_of_before(result["runs"])
        r = result["runs"]
        result["verdicts"] = verdicts_claim1(r, verdict)
        c["1"] = result
    if toy and ("2" in chosen or "3" in chosen or "4" in chosen):
        critics = {}
        for w in widths if ("2" in chosen or "3" in chosen) else [64]:
            cfg_w = load_config(args.config, [*args.overrides, f"toy.critic_width={w}"])
            figures = label_figures(cfg_w, out, args.rater_noise, files=False,
                                    methods=METHODS if "2" in chosen else ("pairwise", "self_reference"))
            critics[w] = {"methods": figures["methods"], "params": critic_params(cfg_w)}
            if "2" in chosen or ("4" in chosen and w == 64):
                critics[w]["run"] = _summarise([train_at(f"rlaif_critic{w}", [*(f"{k}={v}" for k, v in RLAIF.items()),
                                                                           f"toy.critic_width={w}"], s) for s in seeds])
        if "2" in chosen:
            c["2"] = {"methods": [m for m in METHODS], "critics": critics, "verdicts": verdicts_claim2(critics, verdict)}
        if "3" in chosen:
            judges = {f"toy critic {w}": position_row(critics[w]["methods"]) for w in critics}
            c["3"] = {"judges": judges, "verdicts": verdicts_claim3(judges, verdict)}
        if "4" in chosen:
            rlaif = critics[64]["run"] if "run" in critics.get(64, {}) else _summarise(
                [train_at("rlaif_critic64", [f"{k}={v}" for k, v in RLAIF.items()], s) for s in seeds])
            sft = _summarise([train_at("sft_critic", [f"{k}={v}" for k, v in SFT_CRITIC.items()], s) for s in seeds])
            c["4"] = {"rlaif": rlaif, "sft_critic": sft, "verdicts": [verdict(
                sft["accuracy_sampled"] >= rlaif["accuracy_sampled"] - TOLERANCE,
                "SFT on the strong critic's answers matches or beats weak-teacher SFT + RLAIF",
                f"sampled accuracy {sft['accuracy_sampled']:.3f} vs {rlaif['accuracy_sampled']:.3f}, tolerance "
                f"{TOLERANCE}; seeds {seeds}")]}
    if args.smol and any(k in chosen for k in ("1", "2", "3")):
        study["smol"] = claims_smol.run(chosen, out / "smol", args.rater_noise, seeds[0], label_figures, _train,
                                        rm_truth_agreement)
    study["wall_seconds"] = time.perf_counter() - t0
    (out / "claims.json").write_text(json.dumps(study, indent=1, default=str))
    return write_outputs(study, out)


def write_outputs(study: dict, out: Path) -> int:
    text = to_markdown(study) + ("\n\n![claims](claims.png)\n" if study["claims"] else "\n")
    if study["claims"]:
        plot(study, out / "claims.png")
    if "smol" in study:
        text += "\n" + "\n".join(claims_smol.to_markdown(study["smol"], study["rater_noise"])) + \
            "\n![claims on SmolLM2](claims_smol.png)\n"
        claims_smol.plot(study["smol"], out / "claims_smol.png")
    (out / "claims.md").write_text(text)
    print(text)
    print(f"written: {out / 'claims.json'}, {out / 'claims.md'}" + (f", {out / 'claims.png'}" if study["claims"] else "")
          + (f", {out / 'claims_smol.png'}" if "smol" in study else ""))
    return 0


def mean_of_before(runs: dict) -> float | None:
    values = [r["before_sampled"] for r in runs.values() if r.get("before_sampled") is not None]
    return sum(values) / len(values) if values else None


def critic_params(cfg) -> int:
    from rlaif_ray.runtime.inputs import resolve_inputs
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(resolve_inputs(cfg).critic)
    h, layers, v = c.hidden_size, c.num_hidden_layers, c.vocab_size
    return v * h + layers * (4 * h * h + 3 * h * c.intermediate_size + 2 * h) + h  # tied embeddings


def position_row(methods: dict) -> dict:
    orders = methods["pairwise"]["orders"]
    return {**orders, "self_reference": (methods.get("self_reference") or {}).get("truth_agreement")}


def verdicts_claim1(r: dict, verdict) -> list[str]:
    out = []
    if "rlaif_rm" in r and "rlhf_rm" in r:
        a, h = r["rlaif_rm"]["win_rate"], r["rlhf_rm"]["win_rate"]
        out.append(verdict(a >= h - TOLERANCE / 2, "RLAIF is comparable to RLHF (win rate within 0.025 or better)",
                           f"win rate {a:.3f} with AI labels vs {h:.3f} with human labels"))
    if "mixed_rm" in r and "rlhf_rm" in r:
        m, h = r["mixed_rm"]["win_rate"], r["rlhf_rm"]["win_rate"]
        out.append(verdict(m >= h - TOLERANCE / 2, "adding AI labels to human labels does not hurt",
                           f"win rate {m:.3f} mixed vs {h:.3f} human only"))
    if "d_rlaif" in r and "rlaif_rm" in r:
        d, a = r["d_rlaif"]["win_rate"], r["rlaif_rm"]["win_rate"]
        out.append(verdict(d > a, "d-RLAIF beats canonical RLAIF with a reward model", f"win rate {d:.3f} vs {a:.3f}"))
    if "online_dpo" in r and "rlaif_rm" in r:
        o, a = r["online_dpo"]["win_rate"], r["rlaif_rm"]["win_rate"]
        out.append(verdict(o > a, "online AI feedback (OAIF, online DPO) beats an offline reward model",
                           f"win rate {o:.3f} vs {a:.3f}"))
    return out


def verdicts_claim2(critics: dict, verdict) -> list[str]:
    widths = sorted(critics)
    if len(widths) < 2:
        return [verdict(None, "alignment grows with labeler size", "one critic size measured")]
    agree = [critics[w]["methods"]["pairwise"]["truth_agreement"] for w in widths]
    acc = [critics[w]["run"]["accuracy_sampled"] for w in widths if "run" in critics[w]]
    grows = all(b >= a for a, b in zip(agree, agree[1:]))
    out = [verdict(grows, "the judge's agreement with the truth grows with its size (pairwise)",
                   " → ".join(f"{a:.3f}" for a in agree) + f" for widths {widths}")]
    if len(acc) == len(widths):
        out.append(verdict(all(b >= a - 0.01 for a, b in zip(acc, acc[1:])),
                           "the policy's accuracy under RLAIF grows with the judge's size",
                           " → ".join(f"{a:.3f}" for a in acc)))
    return out


def verdicts_claim3(judges: dict, verdict) -> list[str]:
    out = []
    for name, r in judges.items():
        if r["one_order"] is None:
            out.append(verdict(None, f"{name}: both orders beat one", "no decided pairs"))
            continue
        ceiling = CEILING if r["one_order"] >= CEILING else None  # a perfect judge leaves a remedy nothing to fix
        out.append(verdict(None if ceiling else r["both_orders"] >= r["one_order"],
                           f"{name}: averaging both orders agrees with the truth at least as well as one order",
                           f"{r['both_orders']:.3f} vs {r['one_order']:.3f}; position consistency "
                           f"{r['position_consistency']:.3f}" + ("; one order is already right" if ceiling else "")))
        if r.get("self_reference") is not None:
            at_top = r["both_orders"] >= CEILING
            out.append(verdict(None if at_top else r["self_reference"] > r["both_orders"],
                               f"{name}: self-reference beats both orders averaged",
                               f"{r['self_reference']:.3f} vs {r['both_orders']:.3f}"
                               + ("; both orders are already right" if at_top else "")))
    return out


if __name__ == "__main__":  # vLLM on CPU spawns processes: keep the guard
    sys.exit(main())

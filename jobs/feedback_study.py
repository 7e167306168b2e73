"""The AI-feedback study (the toy world by default, any config with a checker), from one command: how well each labeling method agrees with the
ground truth, and how much the policy's ground-truth accuracy moves under each learner.

    python jobs/feedback_study.py -c jobs/configs/toy_cpu.yaml --out runs/study [overrides...]

1. Labeler agreement: the initial policy samples `rollout.samples_per_prompt` answers to every prompt; the
   same batch is labelled by every method (pairwise, cot, self_reference, direct); per method: agreement
   with the checker on pairs with exactly one right answer (direct: score > 5.5 iff right), position
   consistency, first-slot rate, unparsable share, labels/s. Then the pairwise method once per pair selection
   (`--pairs`, see `critic.pairs`): agreement on the judged pairs, how often the resulting win rate ranks a
   right answer above a wrong one of the same prompt, judged pairs and judge calls per sample.
2. Learners: one run each of RLAIF-PPO on pairwise win rates (group-mean and GRPO advantages), RLAIF-PPO
   with a reward model trained on the labels (initialised from the judge's checkpoint), online DPO, and SFT on the critic's own answers (the strong-teacher baseline), same seed and steps;
   ground-truth accuracy on the whole prompt set before and after (sampled at the rollout temperature, and greedy).
Writes OUT/study.json and OUT/study.md (tables a person reads); prints them.
"""
import argparse
import json
import sys
import time
from pathlib import Path

METHODS = ("pairwise", "cot", "self_reference", "direct")
PAIRS = ("all", "anchor", "round_robin", "random_k")
LEARNERS = {  # name -> overrides on the base config
    "ppo_group_mean": {"learner.algorithm": "ppo", "learner.advantage": "group_mean", "reward.kind": "win_rate"},
    "ppo_grpo": {"learner.algorithm": "ppo", "learner.advantage": "grpo", "reward.kind": "win_rate"},
    # the reward model starts from the judge's checkpoint (the policy's is too weak to learn correctness from a
    # few hundred pairs); its scores are unnormalised and shift at every refit, so GRPO's std normalisation
    "ppo_reward_model": {"learner.algorithm": "ppo", "reward.kind": "reward_model", "reward.model": "critic",
                         "learner.advantage": "grpo"},
    "dpo": {"learner.algorithm": "dpo", "reward.kind": "win_rate"},
    "sft_critic": {"learner.algorithm": "sft"},
}


def reward_ranking(labels, checker) -> float | None:
    """Share of (right, wrong) answer pairs of one prompt whose win rates rank the right one first (ties: half)."""
    groups: dict = {}
    for r in labels.to_pylist():
        if r["win_prob"] is not None and r["reference"] is not None:
            groups.setdefault(r["prompt_id"], []).append((checker(r["response"], r["reference"]), r["win_prob"]))
    scores = [float(w > v) + 0.5 * (w == v) for rows in groups.values() for ok, w in rows if ok
              for bad, v in rows if not bad]
    return sum(scores) / len(scores) if scores else None


def labeler_agreement(base, out: Path, methods=METHODS, pair_modes=PAIRS) -> dict:
    import pyarrow as pa
    import ray

    from rlaif_ray.data.checkers import make_checker
    from rlaif_ray.judge.quality import judge_bias_counts, judge_report, label_quality
    from rlaif_lab.studies import initial_batch

    checker = make_checker(base.data.checker)
    with initial_batch(base) as (rollouts, critic, resolved, _):
        points = base.critic.score_points()  # concrete after resolve_inputs (the judge's tokenizer)
        result = {}
        for method in methods:
            t0 = time.perf_counter()
            labels, stats = ray.get(critic.label.options(num_returns=2).remote(rollouts, method))
            report = judge_report({**judge_bias_counts(labels), **stats})
            quality = label_quality(labels, checker, points)
            result[method] = {"judge_truth_agreement": quality.get("judge_truth_agreement"),
                              "valid_labels": stats["label_valid"] / labels.num_rows,
                              "seconds": time.perf_counter() - t0, "judge_cache_hits": stats["judge_cache_hits"],
                              **{k: report[k] for k in ("position_consistency", "first_slot_rate", "unparsable_share",
                                                        "labels_per_s", "judge_calls")}}
            print(f"[study] {method}: agreement with ground truth {result[method]['judge_truth_agreement']}", flush=True)
        for mode in pair_modes:  # the cache answers pairs judged before: judge_calls counts them all the same
            labels, stats = ray.get(critic.label.options(num_returns=2).remote(rollouts, "pairwise", mode))
            result[f"pairs={mode}"] = {
                "judge_truth_agreement": label_quality(labels, checker).get("judge_truth_agreement"),
                "reward_ranks_right_first": reward_ranking(labels, checker),
                "pairs": stats["pairs"], "judge_calls_per_sample": stats["judge_calls_per_sample"]}
            print(f"[study] pairs={mode}: {result[f'pairs={mode}']}", flush=True)
        result["_batch"] = {"prompts": resolved.prompts.num_rows, "samples": rollouts.num_rows,
                            "policy_accuracy": label_quality(pa.Table.from_pydict(
                                {c: rollouts.column(c) for c in ("sample_id", "reference", "response")}), checker).get(
                                "true_accuracy")}
    return result


def fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def to_markdown(study: dict) -> str:
    lines = [f"## Labeler agreement with ground truth ({study['config']}{' ' if study['overrides'] else ''}"
             f"{' '.join(study['overrides'])})", "",
             f"Batch: {study['labelers']['_batch']['samples']} samples of the initial policy "
             f"({study['labelers']['_batch']['prompts']} prompts, sampled accuracy "
             f"{fmt(study['labelers']['_batch']['policy_accuracy'])}).", "",
             "| method | agrees with ground truth | position consistency | first-slot rate | unparsable | labels/s |",
             "|---|---|---|---|---|---|"]
    for m in (m for m in METHODS if m in study["labelers"]):
        r = study["labelers"][m]
        lines.append(f"| {m} | {fmt(r['judge_truth_agreement'])} | {fmt(r['position_consistency'])} | "
                     f"{fmt(r['first_slot_rate'])} | {fmt(r['unparsable_share'])} | {fmt(r['labels_per_s'], 1)} |")
    modes = [k for k in study["labelers"] if k.startswith("pairs=")]
    if modes:
        lines += ["", "| pairwise, pair selection | agrees with ground truth | win rate ranks right first | "
                      "judged pairs | judge calls / sample |", "|---|---|---|---|---|"]
        for k in modes:
            r = study["labelers"][k]
            lines.append(f"| {k[6:]} | {fmt(r['judge_truth_agreement'])} | {fmt(r['reward_ranks_right_first'])} | "
                         f"{r['pairs']} | {fmt(r['judge_calls_per_sample'], 2)} |")
    if not study["learners"]:
        return "\n".join(lines + ["", f"Seed {study['seed']}; whole study {study['wall_seconds']:.0f} s on this machine."])
    lines += ["", "## Policy ground-truth accuracy, before → after", "",
              "| learner | sampled before | sampled after | greedy before | greedy after | steps | run wall s |",
              "|---|---|---|---|---|---|---|"]
    for name, r in study["learners"].items():
        b, a = r["eval_before"], r["eval_after"]
        lines.append(f"| {name} | {fmt(b['accuracy_sampled'])} | **{fmt(a['accuracy_sampled'])}** | "
                     f"{fmt(b['accuracy_greedy'])} | **{fmt(a['accuracy_greedy'])}** | {r['final_version']} | "
                     f"{r['wall_seconds']:.0f} |")
    lines += ["", f"Seed {study['seed']}; whole study {study['wall_seconds']:.0f} s on this machine."]
    return "\n".join(lines)


def main(argv=None) -> int:
    from rlaif_ray.config import ConfigError, load_config
    from rlaif_ray.runtime.driver import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", default="jobs/configs/toy_cpu.yaml")
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--learners", default=",".join(LEARNERS),
                        help=f"subset of {','.join(LEARNERS)}; empty: the labeler study only")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"labeling methods measured, of {','.join(METHODS)}")
    parser.add_argument("--pairs", default=",".join(PAIRS),
                        help=f"pair selections the pairwise method is measured with, of {','.join(PAIRS)}; empty: none")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # overrides anywhere on the line
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [name for name in args.learners.split(",") if name]
    methods, modes = [m for m in args.methods.split(",") if m], [mode for mode in args.pairs.split(",") if mode]
    unknown = [x for chosen, known in ((names, LEARNERS), (methods, METHODS), (modes, PAIRS))
               for x in chosen if x not in known]
    if unknown:
        print(f"feedback_study: error: unknown {', '.join(unknown)} (learners: {', '.join(LEARNERS)}; methods: "
              f"{', '.join(METHODS)}; pairs: {', '.join(PAIRS)})", file=sys.stderr)
        return 2
    try:
        base = load_config(args.config, args.overrides)
        runs = {name: load_config(args.config, [*args.overrides, *(f"{k}={v}" for k, v in LEARNERS[name].items()),
                                                f"output.run_dir={out / name}", "output.progress=false",
                                                "output.existing=overwrite"])
                for name in names}
    except ConfigError as err:
        print(f"feedback_study: error: {err}", file=sys.stderr)
        return 2
    study = {"config": args.config, "overrides": args.overrides, "seed": base.loop.seed,
             "labelers": labeler_agreement(base, out, methods, modes), "learners": {}}
    for name, cfg in runs.items():
        summary = train(cfg)
        study["learners"][name] = {k: summary[k] for k in ("eval_before", "eval_after", "final_version", "wall_seconds",
                                                           "trained", "generated")}
        print(f"[study] {name}: sampled accuracy {summary['eval_before']['accuracy_sampled']:.3f} -> "
              f"{summary['eval_after']['accuracy_sampled']:.3f}", flush=True)
    study["wall_seconds"] = time.perf_counter() - t0
    (out / "study.json").write_text(json.dumps(study, indent=1))
    (out / "study.md").write_text(to_markdown(study))
    print(to_markdown(study))
    print(f"written: {out / 'study.json'}, {out / 'study.md'}")
    return 0


if __name__ == "__main__":  # vLLM on CPU spawns processes: keep the guard
    sys.exit(main())

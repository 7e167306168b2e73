"""Prompt injection against the AI judge on the toy world: the label flip rate per attack and labeling method.

    python jobs/injection_study.py -c jobs/configs/toy_cpu.yaml --out runs/injection [overrides...]

The initial policy samples `rollout.samples_per_prompt` answers to every prompt; each labeling method judges
the batch clean and then with every attack in `rlaif_ray.judge.injection.ATTACKS` appended to the wrong answers.
Per method and attack: over the pairs (wrong, right) the clean judge decided for the right answer, the share
it now decides for the wrong one (flip rate), the mean shift of P(wrong wins), and the share of rows that kept a
valid label (the parsing never breaks: a reply without label mass is counted as unparsable).
Writes OUT/injection.json and OUT/injection.md; prints the table.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from feedback_study import fmt  # jobs/ is on sys.path when a job script runs

METHODS = ("pairwise", "cot", "self_reference")


def study(cfg) -> dict:
    import ray

    from rlaif_ray.judge.injection import ATTACKS, attack, flip_rate, victims
    from rlaif_lab.studies import initial_batch

    with initial_batch(cfg) as (rollouts, critic, _, _):
        targets = victims(rollouts)
        result = {"samples": rollouts.num_rows, "attacked_responses": len(targets), "methods": {}}
        for method in METHODS:
            clean = ray.get(critic.label.options(num_returns=2).remote(rollouts, method)[0])
            rows = {}
            for name, text in ATTACKS.items():
                attacked = ray.get(critic.label.options(num_returns=2).remote(attack(rollouts, targets, text), method)[0])
                rows[name] = flip_rate(clean, attacked, targets)
                print(f"[injection] {method} / {name}: flip rate {rows[name]['flip_rate']}", flush=True)
            result["methods"][method] = rows
    return result


def to_markdown(result: dict) -> str:
    from rlaif_ray.judge.injection import ATTACKS
    lines = [f"Batch: {result['samples']} samples of the initial policy, {result['attacked_responses']} wrong "
             "answers attacked.", "", "| method | attack (appended to wrong answers) | pairs | flip rate | "
             "mean shift of P(wrong wins) | rows with a valid label |", "|---|---|---|---|---|---|"]
    for method, rows in result["methods"].items():
        for name, r in rows.items():
            lines.append(f"| {method} | `{ATTACKS[name]!r}` | {r['pairs']} | **{fmt(r['flip_rate'])}** | "
                         f"{fmt(r['mean_shift'])} | {fmt(r['valid_label_share'])} |")
    lines += ["", f"Seed {result['seed']}; {result['wall_seconds']:.0f} s on this machine."]
    return "\n".join(lines)


def main(argv=None) -> int:
    from rlaif_ray.config import ConfigError, load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", default="jobs/configs/toy_cpu.yaml")
    parser.add_argument("--out", default="runs/injection")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # overrides anywhere on the line
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"injection_study: error: {err}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    result = study(cfg)
    result.update(seed=cfg.loop.seed, wall_seconds=time.perf_counter() - t0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "injection.json").write_text(json.dumps(result, indent=1))
    (out / "injection.md").write_text(to_markdown(result))
    print(to_markdown(result))
    print(f"written: {out / 'injection.json'}, {out / 'injection.md'}")
    return 0


if __name__ == "__main__":  # vLLM on CPU spawns processes: keep the guard
    sys.exit(main())

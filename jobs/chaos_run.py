"""The chaos drill: a seeded long toy run in which actors of every kind are killed at random steps (engines, judges,
the scorer, the reward-model trainer, learner ranks); then the run's faults summary and sample ledger are checked
against the kills made (rlaif_lab/chaos.py).

    python jobs/chaos_run.py --seed 0 --kills 8 --out runs/chaos

Prints the kills, the checks (each OK or MISMATCH) and the wall time; exits 1 on a mismatch. The run
(jobs/configs/chaos_toy.yaml): the toy world, async, two engines, two judges, a reward model refitted every 2 steps,
two DeepSpeed ranks, a checkpoint every 4 steps; overrides as for `rlaif-ray train`.
"""
import argparse
import random
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    from rlaif_lab.chaos import check, kill, plan_kills
    from rlaif_ray.config import ConfigError, load_config
    from rlaif_ray.runtime.driver import train
    from rlaif_ray.runtime.orchestrator import Orchestrator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", default="jobs/configs/chaos_toy.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="runs/chaos")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    plan = plan_kills(args.seed, args.steps, args.kills)
    resumes = sum(kind in ("reward_trainer", "learner") for _, kind in plan)
    try:
        cfg = load_config(args.config, [*args.overrides, f"loop.num_steps={args.steps}", f"loop.seed={args.seed}",
                                        f"fault.max_reissues={4 * args.kills}", f"fault.max_resumes={resumes}",
                                        f"output.run_dir={args.out}"])
    except ConfigError as err:
        print(f"chaos_run: error: {err}", file=sys.stderr)
        return 2
    rng, made, todo = random.Random(args.seed), [], dict(plan)
    original = Orchestrator.launch

    def launch(self, step, indices=None, *rest):  # the kill planned for a step, once, as the driver reaches it
        if indices is None and step in todo:
            kind = todo.pop(step)
            made.append((step, kind, kill(self, kind, rng)))
            print(f"[chaos] step {step}: killed {made[-1][2]}", flush=True)
        return original(self, step, indices, *rest)
    Orchestrator.launch = launch
    t0 = time.time()
    summary = train(cfg)
    wall = time.time() - t0
    lines = check(summary, made, Path(cfg.output.run_dir), args.steps,
                  cfg.data.prompts_per_step * cfg.rollout.samples_per_prompt)
    print(f"[chaos] {len(made)} kills in {args.steps} steps (seed {args.seed}), {wall:.0f} s:")
    for step, kind, what in made:
        print(f"  step {step:3d}  {kind:15s} {what}")
    print("\n".join(f"[chaos] {line}" for line in lines))
    print(f"[chaos] faults summary: {summary['faults']['replaced_actors']} actors replaced, "
          f"{summary['faults']['reissued_batches']} batches re-issued, {len(summary['faults']['resumes'])} resumes; "
          f"sampled accuracy {summary.get('eval_before', {}).get('accuracy_sampled')} -> "
          f"{summary.get('eval_after', {}).get('accuracy_sampled')}")
    return 1 if any(line.endswith("MISMATCH") for line in lines) else 0


if __name__ == "__main__":  # vLLM on CPU spawns processes: keep the guard
    sys.exit(main())

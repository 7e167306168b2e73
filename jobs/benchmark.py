"""Throughput benchmark: the same config and seed run in sync and then async mode on one Ray cluster,
figures printed side by side and written as JSON (compare across commits).

    python jobs/benchmark.py -c jobs/configs/toy_cpu.yaml loop.num_steps=60 --rounds 3 --out runs/bench
    python jobs/benchmark.py -c jobs/configs/toy_cpu.yaml loop.num_steps=30 --flows --rounds 2 --out runs/bench-flows

`--flows`: batch flow against group flow (`loop.flow`), both in the config's async mode, instead of sync against async.

Also a Ray job: `ray job submit --working-dir . -- python jobs/benchmark.py -c ... ray.address=auto`.
"""
import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    import time

    import ray

    from rlaif_ray.config import ConfigError, load_config
    from rlaif_lab.benchmark import compare, format_table, transport_from_timeline, transport_share
    from rlaif_lab.stage_alone import engine_alone

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", default="jobs/configs/toy_cpu.yaml")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the figures")
    parser.add_argument("--rounds", type=int, default=1, help="sync/async pairs; the median round is shown")
    parser.add_argument("--alone-batches", type=int, default=20, help="batches for the engine-alone measurement")
    parser.add_argument("--flows", action="store_true", help="batch flow against group flow (loop.flow), both async")
    parser.add_argument("--engine-streams", type=int, default=1,
                        help="--flows: rollout.engine_streams of the group-flow run (group calls one engine runs at once)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # overrides anywhere on the line
    try:
        base = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"benchmark: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.flows:
        return run_flows(base, args, out)
    rounds = []  # per round: {"sync": figures, "async": figures, "windows": ...}
    for k in range(args.rounds):  # sync and async alternate, so slow spells of a shared machine hit both
        figures, windows = {}, {}
        for mode in ("sync", "async"):
            t0 = time.time()
            figures[mode] = one_run(base, args, out, k, mode, mode=mode,
                                    max_inflight=0 if mode == "sync" else max(1, base.loop.max_inflight))
            windows[mode] = (t0, time.time())
        rounds.append({**figures, "windows": windows})
    alone = engine_alone(base, args.alone_batches)
    time.sleep(2.0)  # workers report task events every second
    events = ray.timeline()
    calls_per_step = {"train": base.learner.num_learners}
    for r in rounds:
        for mode, (t0, t1) in r.pop("windows").items():
            transport = transport_from_timeline(events, t0, t1)
            r[mode]["transport"] = transport
            r[mode]["transport_share"] = transport_share(transport, r[mode]["step_seconds"], calls_per_step)
        r["comparison"] = compare(r["sync"], r["async"])
        in_loop = r["async"]["engine_tokens_per_s"]
        r["comparison"].update(engine_alone_tokens_per_s=alone,
                               rollout_efficiency=in_loop / alone if in_loop and alone else None)
    ratios = [r["comparison"]["async_over_sync"] for r in rounds]
    median = median_round(ratios)
    shown = rounds[median]
    print(format_table(shown["sync"], shown["async"], shown["comparison"]))
    if len(rounds) > 1:
        print(f"(the round with the median async/sync ratio; ratios of all rounds: "
              f"{', '.join(f'{x:.2f}x' for x in ratios)}; achieved fractions of ideal: "
              f"{', '.join(format(r['comparison']['achieved_fraction_of_ideal'], '.0%') for r in rounds)})")
    result = {"config": args.config, "overrides": args.overrides, **{k: v for k, v in shown.items()},
              "rounds": rounds, "median_round": median}
    (out / "benchmark.json").write_text(json.dumps(result, indent=1))
    print(f"written: {out / 'benchmark.json'}")
    return 0


def one_run(base, args, out: Path, k: int, name: str, flow: str = "batch", **loop) -> dict:
    """One training run of the base config with `loop.*` changed as given (in `flow`, with --engine-streams for
    group flow), into its own subfolder of `out`: its figures after the warm-up steps."""
    from rlaif_ray.runtime.driver import train
    from rlaif_ray.runtime.metrics import read_jsonl
    from rlaif_lab.benchmark import run_figures

    cfg = base.model_copy(deep=True)
    for key, value in {**loop, "flow": flow}.items():
        setattr(cfg.loop, key, value)
    cfg.rollout.engine_streams = args.engine_streams if flow == "groups" else 1
    cfg.output.run_dir = str(out / (name if args.rounds == 1 else f"round{k}_{name}"))
    cfg.output.progress, cfg.output.save_checkpoint = False, False
    cfg.checkpoint.every, cfg.checkpoint.every_minutes = 0, 0.0  # no checkpoint inside the measured steps
    cfg.output.existing = "overwrite"  # this job's own subfolder
    summary = train(cfg)
    figures = {**run_figures(read_jsonl(Path(cfg.output.run_dir) / "metrics.jsonl"), args.warmup),
               **{key: summary[key] for key in ("startup_seconds", "busy_fraction", "generated", "trained")}}
    print(f"[benchmark] round {k + 1}/{args.rounds} {name}: {figures['samples_per_s']:.1f} samples/s", flush=True)
    return figures


def median_round(ratios: list[float]) -> int:
    return sorted(range(len(ratios)), key=lambda i: ratios[i])[len(ratios) // 2]


def run_flows(base, args, out: Path) -> int:
    """`--flows`: the config async in batch flow and in group flow, alternating per round; the median round shown."""
    from rlaif_lab.benchmark import format_flows

    rounds = []
    for k in range(args.rounds):
        figures = {flow: one_run(base, args, out, k, flow, flow=flow, mode="async",
                                 max_inflight=max(1, base.loop.max_inflight))
                   for flow in ("batch", "groups")}
        figures["groups_over_batch"] = figures["groups"]["samples_per_s"] / figures["batch"]["samples_per_s"]
        rounds.append(figures)
    ratios = [r["groups_over_batch"] for r in rounds]
    median = median_round(ratios)
    print(format_flows(rounds[median]["batch"], rounds[median]["groups"]))
    if len(rounds) > 1:
        print(f"(the round with the median ratio; all rounds: {', '.join(f'{x:.2f}x' for x in ratios)})")
    (out / "benchmark_flows.json").write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                                          **rounds[median], "rounds": rounds}, indent=1))
    print(f"written: {out / 'benchmark_flows.json'}")
    return 0


if __name__ == "__main__":  # vLLM on CPU spawns processes: keep the guard
    sys.exit(main())

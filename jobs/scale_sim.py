"""The loop at cluster scale, simulated on one machine: the real Orchestrator (pools, placement groups, sharding,
weight-sync bookkeeping, fault handling, metrics) drives stand-in stage actors that take and return tables of the
declared schemas after the service times of a profile (rlaif_lab.stand_ins.Profile: a 7B policy on
H100-class engines, a 70B judge), sync and async, over a sweep of engine, judge and learner-rank counts.

    python jobs/scale_sim.py --out runs/scale                 # the sweep in docs/performance.md (~25 min on 2 cores)
    python jobs/scale_sim.py --out runs/scale --quick         # 1, 8, 64 engines only
    python jobs/scale_sim.py --out runs/scale-tail --quick --lengths long_tail   # long-tailed response lengths
    python jobs/scale_sim.py --out runs/flows --flows --shapes 8x16x8,64x16x8 --lengths long_tail  # batch vs groups

Per configuration: samples/s against the profile's bound, achieved / ideal overlap (async over sync speed-up over
the sync run's (sum of stages) / (slowest stage)), the driver's own CPU seconds per step (all its threads, Ray's
included) as a share of the simulated step and of the profiled one, queue depths and staleness. Writes
OUT/scale_sim.json, OUT/scale_sim.md and OUT/scale_sim.png.

`--flows`: per configuration, async in batch flow and in group flow (`loop.flow: groups`) side by side instead of sync
and async: samples/s of each over the profile's async bound, the ratio, the engines' busy share, staleness and the
driver's CPU; writes OUT/flows.json, OUT/flows.md and OUT/flows.png.
"""
import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

SWEEPS = {  # name -> list of (engines, judges, learner ranks)
    "engines": [(e, 16, 8) for e in (1, 2, 4, 8, 16, 32, 64)],
    "judges": [(64, j, 8) for j in (1, 4, 16)],
    "ranks": [(64, 16, r) for r in (1, 2, 8)],
}
QUICK = {"engines": [(e, 16, 8) for e in (1, 8, 64)], "judges": [], "ranks": []}


def sim_config(base, engines: int, judges: int, ranks: int, mode: str, run_dir: Path, flow: str = "batch",
               engine_streams: int = 1):
    cfg = base.model_copy(deep=True)
    cfg.rollout.num_workers, cfg.critic.num_workers, cfg.learner.num_learners = engines, judges, ranks
    # a stand-in sleeps most of its time: a hundredth of a logical CPU each, so 89 of them fit a laptop's Ray
    cfg.rollout.cpus_per_worker = cfg.critic.cpus_per_worker = cfg.learner.cpus_per_learner = cfg.reward.cpus = 0.01
    cfg.rollout.gpus_per_worker = cfg.critic.gpus_per_worker = cfg.learner.gpus_per_learner = 0.0
    cfg.loop.mode, cfg.loop.flow = mode, flow
    cfg.rollout.engine_streams = engine_streams if flow == "groups" else 1
    if flow != "groups":  # (group flow's settings given on the command line: batch flow has none of them)
        cfg.rollout.in_flight_update, cfg.sync.delivery = "finish", "push"
    cfg.loop.max_inflight = 0 if mode == "sync" else max(1, base.loop.max_inflight)
    cfg.loop.eval_samples = 0
    cfg.sync.method = "object_store"  # the stand-in engines take the profile's broadcast time either way
    cfg.output.run_dir, cfg.output.existing = str(run_dir), "overwrite"
    cfg.output.progress = cfg.output.save_checkpoint = cfg.output.save_labels = False
    cfg.checkpoint.every, cfg.checkpoint.every_minutes = 0, 0.0  # the stand-in learner keeps no state
    return cfg


def run_one(base, profile, shape, mode, out: Path, warmup: int, flow: str = "batch", engine_streams: int = 1) -> dict:
    from rlaif_ray.runtime.driver import train
    from rlaif_ray.runtime.metrics import read_jsonl
    from rlaif_lab.benchmark import HostLoad, run_figures
    from rlaif_lab.stand_ins import stand_ins

    engines, judges, ranks = shape
    run_dir = out / (f"e{engines}-j{judges}-r{ranks}-{mode}" + ("-groups" if flow == "groups" else ""))
    cfg = sim_config(base, engines, judges, ranks, mode, run_dir, flow, engine_streams)
    with HostLoad(run_dir / "metrics.jsonl") as host:
        summary = train(cfg, stand_ins=stand_ins(profile))
    rows = read_jsonl(run_dir / "metrics.jsonl")
    # left out: the warm-up steps (the pipeline filling) and the last max_inflight steps (it drains: nothing new is
    # launched, so the stages have less to do than in the steady state); both modes measure the same steps
    last = len(rows) - base.loop.max_inflight
    measured = rows[warmup:last]
    figures = run_figures(measured, 0)
    driver = sum(r["driver_cpu_seconds"] for r in measured) / len(measured)
    trained = sum(r["trained"] for r in measured) / max(sum(r["samples_in"] for r in measured), 1)
    return {**figures, "driver_cpu_s_per_step": driver, "trained_share": trained, "startup_seconds": summary["startup_seconds"],
            "busy_fraction": summary["busy_fraction"], "faults": summary["faults"]["reissued_batches"],
            # this machine's CPUs over the measured steps (from the step before the first to the last)
            "host_cpu_busy": host.busy_share(warmup, last)}


def _share(x: float | None) -> str:
    return "?" if x is None else f"{x:.0%}"


def key_of(shape) -> str:
    return f"e{shape[0]}-j{shape[1]}-r{shape[2]}"


def derive(base, shape, scale: float, sync: dict, async_: dict, profile) -> dict:
    """One configuration's figures from its two measured runs and the profile's bound: samples/s of each mode over
    its bound, the ideal overlap (bound sync step / bound async step: what the profile lets async gain, pools
    included) and the fraction of it achieved, the driver's CPU share of the simulated and of the profiled step."""
    from rlaif_lab.benchmark import compare
    from rlaif_lab.stand_ins import bound_seconds

    bound = bound_seconds(profile, sim_config(base, *shape, "async", Path(".")))
    ideal = bound["sync_step"] / bound["async_step"]
    speedup = async_["samples_per_s"] / sync["samples_per_s"] if sync["samples_per_s"] else 0.0
    row = {"engines": shape[0], "judges": shape[1], "ranks": shape[2], "time_scale": scale,
           "async_over_sync": speedup, "ideal_overlap_ratio": ideal, "achieved_fraction_of_ideal": speedup / ideal,
           "measured_stage_ideal": compare(sync, async_)["ideal_overlap_ratio"],
           "bound": {"sync_samples_per_s": bound["samples"] / bound["sync_step"],
                     "async_samples_per_s": bound["samples"] / bound["async_step"],
                     "stage_seconds_profiled": bound["stages"], "async_limit": bound["async_limit"]},
           "sync": sync, "async": async_}
    for mode in ("sync", "async"):  # samples/s on the profiled cluster: the simulated rate × the time scale
        r = row[mode]
        r["profiled_samples_per_s"] = r["samples_per_s"] * scale
        r["of_bound"] = r["profiled_samples_per_s"] / row["bound"][f"{mode}_samples_per_s"]
        r["driver_share_simulated"] = r["driver_cpu_s_per_step"] / r["step_seconds"]
        r["driver_share_profiled"] = r["driver_cpu_s_per_step"] / (r["step_seconds"] / scale)
    return row


def derive_flows(base, shape, scale: float, batch: dict, groups: dict, profile, engine_streams: int = 1) -> dict:
    """One configuration's batch-vs-group-flow figures (both async): samples/s on the profiled cluster, each over
    its own bound from the profile (batch flow's: shards per engine as batch mode cuts them; group flow's: its calls
    `engine_streams` at a time on an engine, groups as they finish), the ratio, the driver's CPU share of the
    profiled and of the simulated step (this machine's time: where it is large, the driver's CPU, not the loop,
    sets the simulated pace), this machine's CPU busy share."""
    from rlaif_lab.stand_ins import bound_seconds

    bounds = {flow: bound_seconds(profile, sim_config(base, *shape, "async", Path("."), flow, engine_streams))
              for flow in ("batch", "groups")}
    row = {"engines": shape[0], "judges": shape[1], "ranks": shape[2], "time_scale": scale,
           "bounds": {flow: {"async_samples_per_s": b["samples"] / b["async_step"], "async_limit": b["async_limit"],
                             "stage_seconds_profiled": b["stages"]} for flow, b in bounds.items()},
           "batch": batch, "groups": groups,
           "groups_over_batch": groups["samples_per_s"] / batch["samples_per_s"] if batch["samples_per_s"] else 0.0}
    row["bound"] = row["bounds"]["batch"]
    for flow in ("batch", "groups"):
        r = row[flow]
        r["profiled_samples_per_s"] = r["samples_per_s"] * scale
        r["of_bound"] = r["profiled_samples_per_s"] / row["bounds"][flow]["async_samples_per_s"]
        r["driver_share_profiled"] = r["driver_cpu_s_per_step"] / (r["step_seconds"] / scale)
        r["driver_share_simulated"] = r["driver_cpu_s_per_step"] / r["step_seconds"]
    return row


def run_flows(base, shapes, profile, args, out: Path) -> dict:
    """`--flows`: each configuration async in batch flow and in group flow, at the same time scale."""
    from rlaif_lab.stand_ins import bound_seconds

    results = {}
    for shape in shapes:
        bound = bound_seconds(profile, sim_config(base, *shape, "sync", out))
        scaled = replace(profile, time_scale=args.time_scale or min(0.1, args.sync_step_seconds / bound["sync_step"]))
        runs = {flow: run_one(base, scaled, shape, "async", out, args.warmup, flow, args.engine_streams)
                for flow in ("batch", "groups")}
        results[shape] = row = derive_flows(base, shape, scaled.time_scale, runs["batch"], runs["groups"], profile,
                                            args.engine_streams)
        g, b = row["groups"], row["batch"]
        print(f"[flows] {shape[0]:3d} engines {shape[1]:2d} judges {shape[2]} ranks: groups "
              f"{g['profiled_samples_per_s']:6.1f} samples/s ({g['of_bound']:.0%} of its bound)"
              f", batch {b['profiled_samples_per_s']:6.1f} ({b['of_bound']:.0%} of its bound): "
              f"{row['groups_over_batch']:.2f}x; driver {g['driver_cpu_s_per_step'] * 1e3:.0f} / "
              f"{b['driver_cpu_s_per_step'] * 1e3:.0f} ms/step ({g['driver_share_simulated']:.0%} / "
              f"{b['driver_share_simulated']:.0%} of the simulated step); this machine's CPUs "
              f"{_share(g['host_cpu_busy'])} / {_share(b['host_cpu_busy'])} busy", flush=True)
    return results


def main(argv=None) -> int:
    from rlaif_ray.config import ConfigError, load_config
    from rlaif_ray.runtime.driver import start_ray
    from rlaif_lab.scale_report import write_outputs
    from rlaif_lab.stand_ins import LENGTHS, Profile, bound_seconds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", default="jobs/configs/scale_sim.yaml")
    parser.add_argument("--out", default="runs/scale")
    parser.add_argument("--warmup", type=int, help="first steps left out of the figures (default loop.max_inflight + "
                        "1: a slow first step lets the pipeline run that many batches ahead, and the measured steps "
                        "must not live on that lead); the last loop.max_inflight steps are left out too")
    parser.add_argument("--time-scale", type=float,
                        help="simulated seconds per profiled second, for every configuration (default: per "
                             "configuration, so that its profiled sync step takes --sync-step-seconds, at most 0.1)")
    parser.add_argument("--sync-step-seconds", type=float, default=4.0,
                        help="the simulated length of a sync step when --time-scale is not given")
    parser.add_argument("--quick", action="store_true", help="1, 8 and 64 engines only")
    parser.add_argument("--lengths", choices=LENGTHS, default="fixed",
                        help="response lengths of the profile: all the same, uniform, or long-tailed (same mean)")
    parser.add_argument("--flows", action="store_true",
                        help="batch flow against group flow (loop.flow), both async, instead of sync against async")
    parser.add_argument("--engine-streams", type=int, default=4,
                        help="--flows: rollout.engine_streams of the group-flow runs (group calls one engine runs at once)")
    parser.add_argument("--sweep", action="append", choices=list(SWEEPS), help="run only these sweeps")
    parser.add_argument("--report-only", action="store_true",
                        help="recompute the figures and rewrite the outputs from OUT/scale_sim.json, running nothing")
    parser.add_argument("--shapes", help="run only these configurations, as ENGINESxJUDGESxRANKS,... (e.g. 2x1x1,4x2x2)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # overrides anywhere on the line
    try:  # --flows: the overrides are group flow's settings (sim_config gives batch flow its own)
        base = load_config(args.config, args.overrides + (["loop.flow=groups"] if args.flows else []))
    except ConfigError as err:
        print(f"scale_sim: error: {err}", file=sys.stderr)
        return 2
    if args.warmup is None:
        args.warmup = base.loop.max_inflight + 1
    sweeps = {k: v for k, v in (QUICK if args.quick else SWEEPS).items() if not args.sweep or k in args.sweep}
    if args.shapes:
        try:
            sweeps = {"engines": [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]}
            assert all(len(s) == 3 and min(s) >= 1 for s in sweeps["engines"])
        except (ValueError, AssertionError):
            print(f"scale_sim: error: --shapes {args.shapes!r}: expected ENGINESxJUDGESxRANKS,... e.g. 2x1x1,4x2x2",
                  file=sys.stderr)
            return 2
    shapes = sorted({s for v in sweeps.values() for s in v})
    out = Path(args.out)
    if args.flows:
        from rlaif_lab.scale_report import write_flows
        start_ray(base)
        profile = Profile(lengths=args.lengths)
        results = run_flows(base, shapes, profile, args, out)
        written = write_flows(out, profile, results, {"config": args.config, "overrides": args.overrides,
                                                      "engine_streams": args.engine_streams,
                                                      "warmup": args.warmup, "date": time.strftime("%Y-%m-%d")})
        print("\n" + (out / "flows.md").read_text())
        print("written: " + ", ".join(str(p) for p in written))
        return 0
    if args.report_only:  # the figures again from the runs already measured (the bound's arithmetic may change)
        if not (out / "scale_sim.json").is_file():
            print(f"scale_sim: error: --report-only: no {out / 'scale_sim.json'} (run the sweep first)", file=sys.stderr)
            return 2
        saved = json.loads((out / "scale_sim.json").read_text())
        measured, profile = saved["results"], Profile(lengths=saved["profile"].get("lengths", "fixed"))
        results = {s: derive(base, s, measured[key_of(s)]["time_scale"], measured[key_of(s)]["sync"],
                             measured[key_of(s)]["async"], profile) for s in shapes if key_of(s) in measured}
        sweeps = {k: [s for s in v if s in results] for k, v in sweeps.items()}
    else:
        start_ray(base)
        results, profile = {}, Profile(lengths=args.lengths)
        for shape in shapes:
            bound = bound_seconds(profile, sim_config(base, *shape, "async", out))
            scaled = replace(profile, time_scale=args.time_scale or min(0.1, args.sync_step_seconds / bound["sync_step"]))
            runs = {mode: run_one(base, scaled, shape, mode, out, args.warmup) for mode in ("sync", "async")}
            results[shape] = row = derive(base, shape, scaled.time_scale, runs["sync"], runs["async"], profile)
            a, sy = row["async"], row["sync"]
            print(f"[scale] {shape[0]:2d} engines {shape[1]:2d} judges {shape[2]} ranks: async "
                  f"{a['profiled_samples_per_s']:6.1f} samples/s ({a['of_bound']:.0%} of bound), sync "
                  f"{sy['profiled_samples_per_s']:6.1f} ({sy['of_bound']:.0%}); achieved/ideal overlap "
                  f"{row['achieved_fraction_of_ideal']:.0%} of {row['ideal_overlap_ratio']:.2f}x; driver "
                  f"{a['driver_cpu_s_per_step'] * 1e3:.0f} ms/step = {a['driver_share_simulated']:.1%} of the "
                  f"simulated step", flush=True)
    written = write_outputs(out, profile, sweeps, results, {"config": args.config, "overrides": args.overrides,
                                                            "warmup": args.warmup, "date": time.strftime("%Y-%m-%d")})
    print("\n" + (out / "scale_sim.md").read_text())
    print("written: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What `jobs/scale_sim.py` writes: the sweep as JSON, a Markdown table per sweep and one picture (samples/s against
the profile's bound, achieved / ideal overlap, and the driver's CPU share, each against the engine count; then
samples/s against judges and learner ranks at 64 engines)."""
from __future__ import annotations

import json
from pathlib import Path

DRIVER_TARGET = 0.05
OVERLAP_TARGET = 0.9


def table(rows: list[dict], axis: str) -> str:
    lines = [f"| {axis} | async samples/s on the profiled cluster (of bound; what binds) | sync samples/s (of bound) | achieved / ideal "
             "overlap | driver CPU ms/step (share of simulated / profiled step) | queue depth gen / label / ready "
             "(async mean) | engines busy async / sync | staleness (async) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, s = r["async"], r["sync"]
        q = a.get("queue_mean", {})
        lines.append(
            f"| {r['engines']} engines, {r['judges']} judges, {r['ranks']} ranks | {a['profiled_samples_per_s']:.1f} "
            f"({a['of_bound']:.0%}; {r['bound']['async_limit']}) | {s['profiled_samples_per_s']:.1f} "
            f"({s['of_bound']:.0%}) | "
            f"**{r['achieved_fraction_of_ideal']:.0%}** of {r['ideal_overlap_ratio']:.2f}x | "
            f"{a['driver_cpu_s_per_step'] * 1e3:.0f} ({a['driver_share_simulated']:.1%} / "
            f"{a['driver_share_profiled']:.2%}) | {q.get('queue_gen', 0):.1f} / {q.get('queue_label', 0):.1f} / "
            f"{q.get('queue_ready', 0):.1f} | {_busy(a)} / {_busy(s)} | {a['staleness_max_hist']} |")
    return "\n".join(lines)


def _busy(mode: dict) -> str:
    """The engines' busy share of the run (the rest is idle: waiting for a batch's slowest answer, or for work)."""
    gen = (mode.get("busy_fraction") or {}).get("gen")
    return "n/a" if gen is None else f"{gen:.0%}"


def plot(path: Path, sweeps: dict, results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    engines = [results[s] for s in sweeps.get("engines", [])]
    xs = [r["engines"] for r in engines]
    ax = axes[0]
    for mode, style in (("async", "-o"), ("sync", "-s")):
        ax.plot(xs, [r[mode]["profiled_samples_per_s"] for r in engines], style, label=f"{mode} (measured)")
        ax.plot(xs, [r["bound"][f"{mode}_samples_per_s"] for r in engines], ":", label=f"{mode} bound (profile)")
    ax.set(xscale="log", yscale="log", xlabel="rollout engines (16 judges, 8 ranks)", ylabel="samples/s (profiled cluster)",
           title="throughput")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(xs, [r["achieved_fraction_of_ideal"] for r in engines], "-o", label="achieved / ideal overlap")
    ax.plot(xs, [r["async"]["of_bound"] for r in engines], "-^", label="async / bound")
    ax.axhline(OVERLAP_TARGET, color="grey", ls="--", lw=0.8, label=f"target {OVERLAP_TARGET:.0%}")
    ax.set(xscale="log", xlabel="rollout engines", ylim=(0, 1.2), title="overlap")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.plot(xs, [r["async"]["driver_share_simulated"] for r in engines], "-o", label="of the simulated step")
    ax.plot(xs, [r["async"]["driver_share_profiled"] for r in engines], "-s", label="of the profiled step")
    ax.axhline(DRIVER_TARGET, color="grey", ls="--", lw=0.8, label=f"target {DRIVER_TARGET:.0%}")
    ax.set(xscale="log", xlabel="rollout engines", ylabel="driver CPU / step time (async)", title="driver share")
    ax.legend(fontsize=7)
    ax = axes[3]
    for name, key, marker in (("judges", "judges", "o"), ("ranks", "ranks", "s")):
        rows = [results[s] for s in sweeps.get(name, [])]
        if rows:
            ax.plot([r[key] for r in rows], [r["async"]["profiled_samples_per_s"] for r in rows], f"-{marker}",
                    label=f"{name}: async")
            ax.plot([r[key] for r in rows], [r["bound"]["async_samples_per_s"] for r in rows], ":",
                    label=f"{name}: bound")
    ax.set(xscale="log", yscale="log", xlabel="judges / learner ranks (64 engines)", title="the other stages")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, profile, sweeps: dict, results: dict, meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    key = lambda s: f"e{s[0]}-j{s[1]}-r{s[2]}"  # noqa: E731
    data = {**meta, "profile": profile.to_dict(), "sweeps": {k: [key(s) for s in v] for k, v in sweeps.items()},
            "results": {key(s): r for s, r in results.items()}}
    paths = [out / "scale_sim.json", out / "scale_sim.md", out / "scale_sim.png"]
    paths[0].write_text(json.dumps(data, indent=1))
    scales = sorted({r["time_scale"] for r in results.values()})
    md = [f"Profile: {profile.name}; response lengths {profile.lengths} (mean {profile.response_tokens} tokens); "
          f"time scale {scales[0]:.3g}–{scales[-1]:.3g} simulated seconds per profiled second "
          "(per configuration: its sync step simulated in a few seconds)."]
    for name, shapes in sweeps.items():
        if shapes:
            md += ["", f"**{name}**", "", table([results[s] for s in shapes], name)]
    paths[1].write_text("\n".join(md) + "\n")
    plot(paths[2], sweeps, results)
    return paths


def _bound(bound: dict) -> str:
    return f"{bound['async_samples_per_s']:.1f}, {bound['async_limit']}"


def _pct(x: float | None, digits: int = 0) -> str:
    return "?" if x is None else f"{x:.{digits}%}"


def write_flows(out: Path, profile, results: dict, meta: dict) -> list[Path]:
    """`scale_sim.py --flows`: flows.json, a Markdown table and a picture (samples/s of both flows and the bound, and
    the engines' busy share, against the engine count)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [results[s] for s in sorted(results)]
    data = {**meta, "profile": profile.to_dict(), "results": {f"e{s[0]}-j{s[1]}-r{s[2]}": r for s, r in results.items()}}
    paths = [out / "flows.json", out / "flows.md", out / "flows.png"]
    paths[0].write_text(json.dumps(data, indent=1))
    md = [f"Profile: {profile.name}; response lengths {profile.lengths} (mean {profile.response_tokens} tokens); both "
          f"flows async (loop.max_inflight as configured), group flow with rollout.engine_streams="
          f"{meta.get('engine_streams', 1)}, the same time scale per configuration. Each flow against its own bound "
          "(the profile's best step for that flow; what binds in brackets). The driver's share of the simulated step "
          "and this machine's CPU busy share say whether the machine running the simulation, not the loop, set the "
          "pace: the driver's CPU does not shrink with the time scale.", "",
          "| configuration | group flow samples/s (of its bound) | batch flow samples/s (of its bound) | groups / batch | "
          "engines busy groups / batch | trained (not dropped as stale) groups / batch | driver CPU ms/step groups / batch "
          "(share of profiled / simulated step) | this machine's CPUs busy groups / batch | staleness groups |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g, b = r["groups"], r["batch"]
        bounds = r.get("bounds", {"batch": r["bound"], "groups": r["bound"]})
        md.append(f"| {r['engines']} engines, {r['judges']} judges, {r['ranks']} ranks | "
                  f"{g['profiled_samples_per_s']:.1f} ({g['of_bound']:.0%} of {_bound(bounds['groups'])}) | "
                  f"{b['profiled_samples_per_s']:.1f} ({b['of_bound']:.0%} of {_bound(bounds['batch'])}) | "
                  f"**{r['groups_over_batch']:.2f}x** | {_busy(g)} / {_busy(b)} | "
                  f"{g.get('trained_share', 1):.0%} / {b.get('trained_share', 1):.0%} | "
                  f"{g['driver_cpu_s_per_step'] * 1e3:.0f} / {b['driver_cpu_s_per_step'] * 1e3:.0f} "
                  f"({_pct(g['driver_share_profiled'], 1)} / {_pct(b['driver_share_profiled'], 1)}; "
                  f"{_pct(g.get('driver_share_simulated'))} / {_pct(b.get('driver_share_simulated'))}) | "
                  f"{_pct(g.get('host_cpu_busy'))} / {_pct(b.get('host_cpu_busy'))} | {g['staleness_max_hist']} |")
    paths[1].write_text("\n".join(md) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["engines"] for r in rows]
    for flow, style in (("groups", "-o"), ("batch", "-s")):
        axes[0].plot(xs, [r[flow]["profiled_samples_per_s"] for r in rows], style, label=f"{flow} flow")
        axes[1].plot(xs, [(r[flow].get("busy_fraction") or {}).get("gen", 0) for r in rows], style, label=f"{flow} flow")
    for flow, style, color in (("groups", ":", "C0"), ("batch", "--", "C1")):  # (a marker: one configuration shows)
        axes[0].plot(xs, [r.get("bounds", {}).get(flow, r["bound"])["async_samples_per_s"] for r in rows], style,
                     marker="_", markersize=24, color=color, label=f"{flow} flow's bound (profile)")
    axes[0].set(xscale="log", yscale="log", xlabel="rollout engines", ylabel="samples/s (profiled cluster)",
                title=f"throughput, {profile.lengths} lengths")
    axes[1].set(xscale="log", xlabel="rollout engines", ylabel="engines' busy share", ylim=(0, 1.05), title="engines busy")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths

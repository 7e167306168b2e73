"""Where each stage runs: one placement group per stage, one bundle per actor, from the config.

`learner.colocate`: rollout engines and learner ranks share one placement group of whole-GPU bundles, engine i and
learner rank i in bundle i with their fractions of its GPU, so that every GPU holds exactly one of each (a group
per stage of fractional bundles let Ray put two engines on one GPU and two learner ranks on another, which NCCL
refuses: "Duplicate GPU detected").

Each bundle holds the actor's CPUs, GPUs and custom resources (e.g.
`{"rollout_node": 1}` to pin engines to a node type of the cluster). Strategies: rollout engines and judges
default to SPREAD (one per node where possible), the learner ranks to PACK (fast collectives); STRICT_* make
it a requirement. On one machine SPREAD and PACK both fit, so the same config scales from a laptop to N nodes
by changing counts and resources.
"""
from __future__ import annotations

from dataclasses import dataclass

import ray

from rlaif_ray.config import ConfigError, RunConfig


@dataclass(frozen=True)
class StageShape:
    name: str
    count: int
    cpus: float
    gpus: float
    resources: dict
    strategy: str

    def bundle(self) -> dict:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {}), **self.resources}


def stage_shapes(cfg: RunConfig) -> list[StageShape]:
    """Every stage's bundle shape, read from the config once (the only place that maps config keys to bundles)."""
    r, c, w, lr = cfg.rollout, cfg.critic, cfg.reward, cfg.learner
    judges = [StageShape("critic", c.num_workers, c.cpus_per_worker, c.gpus_per_worker, dict(c.resources), c.placement)]
    shapes = [StageShape("rollout", r.num_workers, r.cpus_per_worker, r.gpus_per_worker, dict(r.resources), r.placement),
              *(judges if cfg.judge_in_loop() else []),  # reward.label_share=0: no judge holds resources
              StageShape("reward", 1, w.cpus, 0.0, dict(w.resources), "PACK"),
              StageShape("learner", lr.num_learners, lr.cpus_per_learner, lr.gpus_per_learner, dict(lr.resources),
                         lr.placement)]
    if cfg.reward.kind == "reward_model":
        shapes.append(StageShape("reward_trainer", 1, w.trainer_cpus, 0.0, dict(w.resources), "PACK"))
    return shapes


def stage_shape(cfg: RunConfig, name: str) -> StageShape:
    return next(s for s in stage_shapes(cfg) if s.name == name)


COLOCATED = "rollout+learner"


def group_shapes(cfg: RunConfig) -> list[tuple[tuple[str, ...], StageShape]]:
    """The placement groups to make: (the stages that share it, its bundle shape). One per stage, except under
    `learner.colocate`: one group of whole-GPU bundles for the engines and the learner ranks together."""
    shapes = stage_shapes(cfg)
    if not cfg.learner.colocate:
        return [((s.name,), s) for s in shapes]
    r, lr = stage_shape(cfg, "rollout"), stage_shape(cfg, "learner")
    resources = {k: r.resources.get(k, 0.0) + lr.resources.get(k, 0.0) for k in {**r.resources, **lr.resources}}
    shared = StageShape(COLOCATED, lr.count, r.cpus + lr.cpus, 1.0, resources, lr.strategy)
    rest = [((s.name,), s) for s in shapes if s.name not in ("rollout", "learner")]
    return [(("rollout", "learner"), shared), *rest]


def check_resources(cfg: RunConfig) -> None:
    """Fail before any actor starts if the cluster cannot hold what the config asks for (CPUs, GPUs, and every
    custom resource a stage names), with the stage and key in the message."""
    have = ray.cluster_resources()
    shapes = stage_shapes(cfg)
    learner = next(s for s in shapes if s.name == "learner")
    if learner.count * learner.cpus > have.get("CPU", 0):
        raise ConfigError(f"learner.num_learners={learner.count} needs {learner.count * learner.cpus:g} CPUs; "
                          f"the cluster has {have.get('CPU', 0):g}")
    need: dict[str, float] = {}
    for shape in shapes:
        for key, value in shape.bundle().items():
            need[key] = need.get(key, 0.0) + value * shape.count
    for key, value in need.items():
        if value > have.get(key, 0.0) + 1e-9:
            users = ", ".join(s.name for s in shapes if key in s.bundle())
            hint = " (raise ray.num_cpus or lower the counts)" if key == "CPU" else ""
            what = {"CPU": "CPUs", "GPU": "GPUs"}.get(key, f"of resource {key!r}")
            raise ConfigError(f"the stages need {value:g} {what} in all ({users}); the cluster has "
                              f"{have.get(key, 0.0):g}{hint}")


def shape_text(bundle: dict[str, float]) -> str:
    """`{CPU: 1, rollout_node: 1}`: a bundle as a person reads it (resources it does not use left out)."""
    return "{" + ", ".join(f"{key}: {value:g}" for key, value in bundle.items() if value) + "}"


def room_for(bundle: dict[str, float]) -> str:
    """Whether a live node of the cluster could hold `bundle` (an actor's resources), as a sentence for the error
    of an actor that never came up: which resources it needs, and what would provide them."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    shape = shape_text(bundle)
    fits = [n for n in nodes if all(n["Resources"].get(key, 0.0) >= value for key, value in bundle.items())]
    if not fits:
        return (f"it needs {shape} and none of the {len(nodes)} live node(s) has that: a node that has it (started "
                "by hand, or by the autoscaler) would take it")
    return (f"it needs {shape}; {len(fits)} live node(s) have that, but it is taken (by other actors, or by other "
            "bundles of the stage's placement group)")


def plan_on_nodes(cfg: RunConfig, nodes: dict[str, dict[str, float]]) -> dict[str, list[str]]:
    """Where every stage's bundles would land on a cluster described as node name -> resources (CPU, GPU and custom
    ones, as `ray status` lists them), without starting anything: stage by stage in config order, PACK/STRICT_PACK
    filling the node already used first, SPREAD/STRICT_SPREAD a fresh node first, first fit. Raises ConfigError
    naming the stage, the bundle and what the nodes have left when a bundle fits nowhere (or a STRICT_ strategy
    cannot be met). A check for configs written for clusters this machine is not (`jobs/configs/gpu_*.yaml`)."""
    free = {name: dict(res) for name, res in nodes.items()}
    plan: dict[str, list[str]] = {}

    def fits(node: str, bundle: dict) -> bool:
        return all(free[node].get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())

    for stages, shape in group_shapes(cfg):
        bundle, placed = shape.bundle(), []
        for _ in range(shape.count):
            order = sorted(free, key=lambda n: (n not in placed) if "PACK" in shape.strategy else (n in placed))
            if shape.strategy == "STRICT_PACK":  # one node that holds all of the stage's bundles
                whole = {k: v * shape.count for k, v in bundle.items()}
                order = [placed[0]] if placed else [n for n in order if fits(n, whole)]
            elif shape.strategy == "STRICT_SPREAD":
                order = [n for n in order if n not in placed]
            node = next((n for n in order if fits(n, bundle)), None)
            if node is None:
                left = {n: {k: round(v, 3) for k, v in r.items() if v} for n, r in free.items()}
                raise ConfigError(f"stage {shape.name}: bundle {len(placed) + 1} of {shape.count} ({bundle}, "
                                  f"{shape.strategy}) fits on no node; free: {left}")
            for k, v in bundle.items():
                free[node][k] = free[node].get(k, 0.0) - v
            placed.append(node)
        for stage in stages:  # colocated: engine i and learner rank i in bundle i, on one GPU
            plan[stage] = placed
    return plan


def stage_groups(cfg: RunConfig) -> dict:
    """One ready placement group per stage (name -> PlacementGroup), waiting at most `fault.recovery_timeout_s` for
    room (a resumed run whose node was lost waits for a new one); removes them all if one cannot be placed."""
    from ray.util.placement_group import placement_group, remove_placement_group

    groups, made = {}, []
    try:
        for stages, shape in group_shapes(cfg):
            pg = placement_group([shape.bundle() for _ in range(shape.count)], strategy=shape.strategy)
            made.append((shape, pg))
            groups.update(dict.fromkeys(stages, pg))  # colocated: "rollout" and "learner" name the same group
        timeout_s = cfg.fault.recovery_timeout_s
        for shape, pg in made:
            if not pg.wait(timeout_seconds=timeout_s):
                raise ConfigError(f"stage {shape.name}: {shape.count} bundle(s) of {shape_text(shape.bundle())} with "
                                  f"strategy {shape.strategy} could not be placed within {timeout_s:g} s "
                                  f"(fault.recovery_timeout_s): {room_for(shape.bundle())}")
    except BaseException:
        for _, pg in made:
            remove_placement_group(pg)
        raise
    return groups


def in_bundle(pg, index: int, shape: StageShape) -> dict:
    """`.options(...)` that put an actor of `shape`'s stage into bundle `index` of `pg` with exactly the bundle's
    resources."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"num_cpus": shape.cpus, "num_gpus": shape.gpus, "resources": dict(shape.resources) or None,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)}


def where(groups: dict) -> dict[str, list[str]]:
    """Stage -> the node id of each bundle (for the run summary and the placement test)."""
    from ray.util.placement_group import placement_group_table

    out = {}
    for name, pg in groups.items():
        table = placement_group_table(pg)
        nodes = table.get("bundles_to_node_id", {})
        out[name] = [nodes.get(i) for i in range(len(table.get("bundles", {})))]
    return out

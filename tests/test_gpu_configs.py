"""The GPU configs a user starts from (`jobs/configs/gpu_*.yaml`) load, and every stage's bundles fit the cluster
each one is written for (no GPU here: the placement is planned against the node shapes, not run). The KubeRay RayJob
starts the one-node GPU config, on a worker group of that shape."""
import json
import os
from pathlib import Path

import pytest
import yaml

from rlaif_ray.config import ConfigError, load_config
from rlaif_ray.runtime.placement import plan_on_nodes

ROOT = Path(__file__).resolve().parents[1]
EIGHT_GPU_NODE = {"CPU": 96.0, "GPU": 8.0}


def aws_nodes() -> dict[str, dict]:
    """cluster/aws.yaml at its worker maxima used for the run: 4 rollout nodes (4x L4, 48 vCPU), 2 learner nodes
    (8x A100, 96 vCPU), and the CPU-less head; custom resources as the launcher file declares them."""
    types = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())["available_node_types"]
    hardware = {"gpu_rollout": ({"CPU": 48.0, "GPU": 4.0}, 4), "gpu_learner": ({"CPU": 96.0, "GPU": 8.0}, 2)}
    nodes = {"head": dict(types["head"]["resources"])}
    for kind, (res, count) in hardware.items():
        for k in range(count):
            nodes[f"{kind}-{k}"] = {**res, **types[kind]["resources"]}
    return nodes


def test_one_node_config_fills_an_eight_gpu_node():
    cfg = load_config(ROOT / "jobs/configs/gpu_1node.yaml")
    plan = plan_on_nodes(cfg, {"node": dict(EIGHT_GPU_NODE)})
    gpus = {"rollout": cfg.rollout.gpus_per_worker, "critic": cfg.critic.gpus_per_worker,
            "learner": cfg.learner.gpus_per_learner}
    assert sum(len(plan[s]) * g for s, g in gpus.items()) == 8
    assert cfg.model.dtype == "bfloat16" and cfg.critic.chat_template == "auto" and cfg.data.checker == "last_number"
    # one GPU fewer and it does not fit: the error names the stage and what is left
    with pytest.raises(ConfigError, match=r"stage learner: bundle 4 of 4 .* fits on no node"):
        plan_on_nodes(cfg, {"node": {"CPU": 96.0, "GPU": 7.0}})


def test_multinode_config_places_stages_on_the_node_types_of_the_cluster_file():
    cfg = load_config(ROOT / "jobs/configs/gpu_multinode.yaml")
    nodes = aws_nodes()
    plan = plan_on_nodes(cfg, nodes)
    assert {n.rsplit("-", 1)[0] for n in plan["rollout"] + plan["critic"]} == {"gpu_rollout"}
    assert {n.rsplit("-", 1)[0] for n in plan["learner"]} == {"gpu_learner"} and len(set(plan["learner"])) == 2
    assert len(set(plan["rollout"])) == 4  # SPREAD: the engines on every rollout node
    assert "head" not in {n for placed in plan.values() for n in placed}
    # the learner group does not fit on one learner node
    one_learner_node = {n: r for n, r in nodes.items() if n != "gpu_learner-1"}
    with pytest.raises(ConfigError, match="stage learner"):
        plan_on_nodes(cfg, one_learner_node)


def test_strict_strategies_are_planned_strictly():
    from tests.conftest import small_config
    two = {"a": {"CPU": 2.0}, "b": {"CPU": 2.0}}
    cfg = small_config(learner={"num_learners": 2, "placement": "STRICT_PACK"})
    assert len(set(plan_on_nodes(cfg, {n: dict(r, CPU=4.0) for n, r in two.items()})["learner"])) == 1
    with pytest.raises(ConfigError, match="stage learner"):
        plan_on_nodes(small_config(learner={"num_learners": 3, "placement": "STRICT_SPREAD"}), two)


def test_kuberay_rayjob_runs_the_one_node_gpu_config():
    spec = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())["spec"]
    words = spec["entrypoint"].split()
    config = words[words.index("-c") + 1]
    assert config == "jobs/configs/gpu_1node.yaml"
    cfg = load_config(ROOT / config, [w for w in words[words.index("-c") + 2:]])
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    node = {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}
    plan_on_nodes(cfg, {"worker": node})  # the worker group's pod holds the whole run


COLOCATED = {"learner": {"colocate": True, "num_learners": 8, "gpus_per_learner": 0.5},
             "rollout": {"num_workers": 8, "gpus_per_worker": 0.5}, "loop": {"mode": "sync"}}


def test_colocation_plans_one_engine_and_one_learner_rank_per_gpu():
    """learner.colocate on one 8-GPU node: one group of eight whole-GPU bundles, engine i and learner rank i in
    bundle i (issue 26: fractional bundles per stage let Ray pair two engines and two ranks on a GPU instead)."""
    from rlaif_ray.runtime.placement import group_shapes
    from tests.conftest import small_config
    cfg = small_config(**COLOCATED)
    shared = [shape for stages, shape in group_shapes(cfg) if stages == ("rollout", "learner")]
    assert len(shared) == 1 and shared[0].count == 8 and shared[0].bundle()["GPU"] == 1.0
    assert not any("rollout" in stages or "learner" in stages for stages, _ in group_shapes(cfg)
                   if stages != ("rollout", "learner"))
    plan = plan_on_nodes(cfg, {"node": dict(EIGHT_GPU_NODE)})
    assert plan["rollout"] == plan["learner"] == ["node"] * 8
    with pytest.raises(ConfigError, match=r"stage rollout\+learner: bundle 8 of 8"):
        plan_on_nodes(cfg, {"node": {"CPU": 96.0, "GPU": 7.0}})


@pytest.mark.parametrize("change, message", [
    ({"rollout": {"num_workers": 4}}, "must equal learner.num_learners"),
    ({"learner": {"gpus_per_learner": 0.75}}, "at most 1"),
    ({"sync": {"method": "collective"}}, "cannot be in one NCCL group"),
])
def test_colocation_refuses_what_cannot_pair_on_a_gpu(change, message):
    from tests.conftest import small_config
    sections = {k: dict(v) for k, v in COLOCATED.items()}
    for key, value in change.items():
        sections.setdefault(key, {}).update(value)
    with pytest.raises(ValueError, match=message):
        small_config(**sections)


def test_colocated_actors_share_gpus_one_of_each_on_a_real_ray_cluster(tmp_path):
    """The same on a real Ray cluster that declares 8 GPUs (Ray hands out GPU ids without touching a device): the
    actors placed as the orchestrator places them report the GPU ids Ray gave them."""
    import subprocess
    import sys
    script = tmp_path / "colocated.py"
    script.write_text('''
import json, os, ray
from rlaif_ray.runtime.placement import in_bundle, stage_groups, stage_shape
from tests.conftest import small_config
from tests.test_gpu_configs import COLOCATED

@ray.remote
class Probe:
    def gpus(self):
        return ray.get_gpu_ids()

ray.init(num_cpus=24, num_gpus=8, include_dashboard=False)
cfg = small_config(**COLOCATED)
cfg.fault.recovery_timeout_s = 60
groups = stage_groups(cfg)
assert groups["rollout"] is groups["learner"]
out = {}
for stage in ("rollout", "learner"):
    shape = stage_shape(cfg, stage)
    actors = [Probe.options(**in_bundle(groups[stage], i, shape)).remote() for i in range(shape.count)]
    out[stage] = ray.get([a.gpus.remote() for a in actors], timeout=60)
print("GPUS " + json.dumps(out))
''')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("GPUS ")), None)
    assert line, proc.stderr[-3000:]
    gpus = json.loads(line[len("GPUS "):])
    engines = [g[0] for g in gpus["rollout"]]
    learners = [g[0] for g in gpus["learner"]]
    assert all(len(g) == 1 for g in gpus["rollout"] + gpus["learner"])
    assert sorted(map(str, engines)) == sorted(map(str, learners)) == sorted(map(str, set(engines)))  # 8 distinct
    assert engines == learners  # engine i and learner rank i on the same GPU

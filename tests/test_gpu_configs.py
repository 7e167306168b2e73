"""The GPU configs a user starts from (`jobs/configs/gpu_*.yaml`) load, and every stage's bundles fit the cluster
each one is written for (no GPU here: the placement is planned against the node shapes, not run). The KubeRay RayJob
starts the one-node GPU config, on a worker group of that shape."""
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

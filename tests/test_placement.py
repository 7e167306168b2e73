"""Stage placement from config: resource checks that name the stage and key, and a toy run across a head and
two worker nodes where each stage lands where the config says."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlaif_ray.config import ConfigError
from rlaif_ray.runtime.placement import check_resources, stage_shapes
from tests.conftest import small_config

ROOT = Path(__file__).resolve().parents[1]


def test_stage_shapes_follow_the_config():
    cfg = small_config(rollout={"num_workers": 3, "gpus_per_worker": 0.5, "resources": {"accel": 1}},
                       learner={"num_learners": 2, "placement": "STRICT_PACK"}, reward={"kind": "reward_model"})
    shapes = {s.name: s for s in stage_shapes(cfg)}
    assert set(shapes) == {"rollout", "critic", "reward", "learner", "reward_trainer"}
    assert shapes["rollout"].count == 3 and shapes["rollout"].bundle() == {"CPU": 1.0, "GPU": 0.5, "accel": 1}
    assert shapes["rollout"].strategy == "SPREAD" and shapes["learner"].strategy == "STRICT_PACK"
    with pytest.raises(ValueError, match="placement"):
        small_config(critic={"placement": "EVERYWHERE"})


def test_missing_custom_resource_is_a_config_error_naming_stage_and_key(ray_cluster):
    with pytest.raises(ConfigError, match=r"need 2 of resource 'rollout_node' in all \(rollout\); the cluster has 0"):
        check_resources(small_config(rollout={"num_workers": 2, "resources": {"rollout_node": 1}}))
    with pytest.raises(ConfigError, match=r"need 1 GPUs in all \(critic\)"):
        check_resources(small_config(critic={"gpus_per_worker": 1}))
    check_resources(small_config())  # the default shape fits the test cluster


def test_toy_run_across_three_nodes_lands_where_the_config_says(tmp_path, toy_world):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_run.py"), str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MULTINODE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = json.loads(lines[-1].removeprefix("MULTINODE "))
    nodes, placed = out["nodes"], out["placement"]
    assert set(placed["learner"]) == {nodes["a"]}                          # PACK, and only node a has learner_node
    assert sorted(placed["rollout"]) == sorted([nodes["a"], nodes["b"]])   # SPREAD: one engine per worker node
    assert placed["critic"][0] in (nodes["a"], nodes["b"])                 # needs accel: never the head
    assert out["final_version"] == 3 and min(out["dispatched"]["rollout"]) >= 1
    assert out["generated"] == 3 * 4 * 2 == out["trained"] + out["dropped_stale"] + out["skipped"]


def test_an_actor_that_cannot_be_placed_is_named_with_what_would_place_it(ray_cluster):
    """An actor that never came back (fault.recovery_timeout_s): the error names the resources it needs, whether a
    live node has them, and what would provide them."""
    import ray

    from rlaif_ray.runtime.faults import RunStopped, probe
    from rlaif_ray.runtime.placement import room_for
    assert room_for({"CPU": 1.0, "rollout_node": 1.0}) == (
        "it needs {CPU: 1, rollout_node: 1} and none of the 1 live node(s) has that: a node that has it (started by "
        "hand, or by the autoscaler) would take it")
    assert room_for({"CPU": 1.0}).startswith("it needs {CPU: 1}; 1 live node(s) have that, but it is taken")

    @ray.remote(num_cpus=1, resources={"rollout_node": 1})
    class Engine:
        def ready(self):
            return 0
    engine = Engine.remote()  # pending: no node has a rollout_node
    with pytest.raises(RunStopped, match=r"^rollout actor 3 \(a replacement\) did not come back within 2 s "
                                         r"\(fault.recovery_timeout_s\): it needs \{CPU: 1, rollout_node: 1\} and "
                                         r"none of the 1 live node\(s\) has that"):
        probe(engine, 2.0, "rollout actor 3 (a replacement)", {"CPU": 1.0, "rollout_node": 1.0})
    ray.kill(engine)

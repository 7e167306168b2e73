"""Run by tests/test_placement.py in its own process: a `ray.cluster_utils.Cluster` with a head and two worker
nodes (custom resources standing in for GPUs), a short toy run placed on it by config, and the placement and
accounting printed as one JSON line (`MULTINODE {...}`)."""
import json
import os
import sys


def main(run_dir: str) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.cluster_utils import Cluster

    from rlaif_ray.config import RunConfig
    from rlaif_ray.runtime.driver import train

    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 1})
    try:
        node_a = cluster.add_node(num_cpus=4, resources={"accel": 2, "learner_node": 2})
        node_b = cluster.add_node(num_cpus=4, resources={"accel": 2})
        cluster.wait_for_nodes()
        cfg = RunConfig.model_validate({
            "data": {"prompts_per_step": 4},
            "rollout": {"num_workers": 2, "samples_per_prompt": 2, "max_new_tokens": 4, "resources": {"accel": 1},
                        "placement": "SPREAD"},
            "critic": {"num_workers": 1, "resources": {"accel": 1}, "backend": "transformers"},  # no third engine
            "learner": {"num_learners": 2, "resources": {"learner_node": 1}, "placement": "PACK"},
            "loop": {"num_steps": 3, "eval_samples": 0},
            "ray": {"address": cluster.address},
            "output": {"run_dir": run_dir, "progress": False, "save_checkpoint": False, "tensorboard": False},
        })
        summary = train(cfg)
        print("MULTINODE " + json.dumps({
            "nodes": {"head": cluster.head_node.node_id, "a": node_a.node_id, "b": node_b.node_id},
            "placement": summary["placement"], "dispatched": summary["dispatched"],
            "final_version": summary["final_version"], "generated": summary["generated"],
            "trained": summary["trained"], "dropped_stale": summary["dropped_stale"], "skipped": summary["skipped"]}),
            flush=True)
    finally:
        import ray
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":  # vLLM on CPU spawns processes: keep the guard
    sys.exit(main(sys.argv[1]))

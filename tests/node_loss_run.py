"""Run by tests/test_node_loss.py in its own process: nodes of a `ray.cluster_utils.Cluster` lost and added under a
toy run, as preempted cloud nodes go and the autoscaler brings new ones. Prints one JSON line (`NODELOSS {...}`).

The head holds the judge and the scorer (resource `stage_node`), two nodes an engine each (`accel`), one node the
learner (`learner_node`). The driver's own `Orchestrator.launch` is hooked to act on the cluster just before the
batch of a given step is submitted (so the steps are exact, whatever the machine's speed):
- first run: step 3 loses engine 0's node (the run goes on with 1 of 2 engines); step 6 adds a node with room and
  waits there until the replacement is up (it joins the pool at that launch); step 9 loses both engine nodes: no
  engine is left, the run waits `fault.recovery_timeout_s`, checkpoints and stops.
- the job submitted again (`train(resume=True)`, as `--resume auto` does) on a new engine node: step 12 loses the
  learner's node (a new one is added); the run resumes from its last checkpoint by itself and finishes.
"""
import json
import logging
import os
import sys
import time


def main(run_dir: str) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.cluster_utils import Cluster

    from rlaif_ray.config import RunConfig
    from rlaif_ray.runtime import checkpoint
    from rlaif_ray.runtime.faults import RunStopped
    from rlaif_ray.runtime.orchestrator import Orchestrator
    from rlaif_ray.runtime.driver import train

    events: list[str] = []

    class Events(logging.Handler):
        def emit(self, record):
            events.append(record.getMessage())
    logging.getLogger("rlaif_ray").addHandler(Events(level=logging.WARNING))

    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 2, "resources": {"stage_node": 2}})
    nodes = {"engine_a": cluster.add_node(num_cpus=1, resources={"accel": 1}),
             "engine_b": cluster.add_node(num_cpus=1, resources={"accel": 1}),
             "learner": cluster.add_node(num_cpus=1, resources={"learner_node": 1})}
    cluster.wait_for_nodes()
    ids: dict[str, str] = {}
    lost: list[str] = []   # node ids, in the order they were lost

    def lose(name: str) -> None:
        node = nodes.pop(name)
        lost.append(node.node_id)
        cluster.remove_node(node)

    def add(name: str, **resources) -> None:
        nodes[name] = cluster.add_node(num_cpus=resources.pop("num_cpus", 1), resources=resources)
        ids[name] = nodes[name].node_id

    def engine_node_of(orch, i: int) -> str:
        node_id = orch.placement["rollout"][i]
        return next(name for name, node in nodes.items() if node.node_id == node_id)

    def back_up(orch) -> None:
        add("engine_c", accel=1)
        ray.wait([orch.pools["rollout"].absent[0]], timeout=300)  # the replacement placed there and up

    def lose_learner(orch) -> None:
        lose("learner")
        add("learner_2", learner_node=1)  # (from the driver's thread: Ray adds nodes from the main thread only)

    hooks = {3: lambda orch: lose(engine_node_of(orch, 0)), 6: back_up,
             9: lambda orch: [lose(engine_node_of(orch, i)) for i in (0, 1)],
             12: lose_learner}
    original, done, t0 = Orchestrator.launch, set(), time.monotonic()

    def launch(self, step, indices=None):
        if step in hooks and step not in done and indices is None:
            done.add(step)
            print(f"NODELOSS-STEP {step} at {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
            hooks[step](self)
        return original(self, step, indices)
    Orchestrator.launch = launch

    cfg = RunConfig.model_validate({
        "data": {"prompts_per_step": 4},
        "rollout": {"num_workers": 2, "samples_per_prompt": 2, "max_new_tokens": 4, "resources": {"accel": 1},
                    "placement": "SPREAD"},
        "critic": {"num_workers": 1, "resources": {"stage_node": 1}, "backend": "transformers"},
        "reward": {"resources": {"stage_node": 1}},
        "learner": {"num_learners": 1, "resources": {"learner_node": 1}},
        "loop": {"num_steps": 16, "eval_samples": 0},
        "checkpoint": {"every": 2},
        "fault": {"recovery_timeout_s": 15},
        "ray": {"address": cluster.address},
        "output": {"run_dir": run_dir, "progress": False, "save_checkpoint": False, "tensorboard": False},
    })
    out: dict = {}
    try:
        try:
            train(cfg)
            out["first_run"] = "finished"
        except RunStopped as err:
            out["first_run"] = str(err)
        latest = checkpoint.latest(cfg.output.run_dir)
        out["checkpoint_after_stop"] = latest.name if latest else None
        out["events_first_run"], events[:] = list(events), []
        add("engine_d", num_cpus=2, accel=2)
        summary = train(cfg, resume=True)
        out.update(events=events, ids=ids, lost=lost, summary={key: summary[key] for key in (
            "faults", "resumed_from", "final_version", "generated", "trained", "dropped_stale", "skipped")})
        print("NODELOSS " + json.dumps(out), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":  # vLLM on CPU spawns processes: keep the guard
    sys.exit(main(sys.argv[1]))

"""Bringing the stages back after actor faults, elastically (the Orchestrator's part that handles lost actors).

`recover` (after a fault): every actor present is probed; one Ray restarted is brought up to date (an engine gets
the current weights, the scorer the current reward model); one gone for good (killed, its node lost) is replaced at
once in its own placement bundle and is absent from its pool until the replacement is up. The stages go on with the
actors present meanwhile. `take_back` (after a fault, and before every launch) lets the replacements that came up
rejoin; with `wait`, a stage with no actor left waits for one at most `fault.recovery_timeout_s` (NoActorLeft).
What happened goes into the run's fault events: `node 1a2b3c4d lost: rollout 2, 3; going on with 6 of 8; waiting for
2 × {CPU: 1, accel: 1}`, then `rollout 2 back (a replacement, on node 5e6f7a8b): 7 of 8`.
"""
from __future__ import annotations

import logging

import ray

from rlaif_ray.runtime.faults import recover_pool, take_back, trainer_result
from rlaif_ray.runtime.placement import shape_text, stage_shape, where

log = logging.getLogger(__name__)


class StageRecovery:
    """Mixed into the Orchestrator: uses its `cfg`, `pools`, `factories`, `faults`, `weights`, `groups`,
    `placement`, versions and reward-model state."""

    def recover(self) -> None:
        """Every stage actor up (restarted by Ray) or replaced: the stages go on with the actors present, and a
        replacement joins its pool when it comes up (`take_back`). Engines on the current weights, the scorer on the
        current reward model."""
        timeout = self.cfg.fault.recovery_timeout_s
        for stage, pool in self.pools.items():
            bundle = stage_shape(self.cfg, stage).bundle()
            live, lost = recover_pool(pool, self.factories[stage], timeout, bundle)
            for i, answer in live:
                self._up_to_date(stage, i, answer, "restarted")
            if lost:
                self.faults["replaced_actors"] += len(lost)
                self._event(self._lost_text(stage, lost, bundle))
        self.take_back()

    def take_back(self, wait: bool = False) -> None:
        """Replacements that came up rejoin their pools, brought up to date. `wait`: a pool with no actor left waits
        for one, at most `fault.recovery_timeout_s` (NoActorLeft, naming the resources no live node has)."""
        for stage, pool in self.pools.items():
            if not pool.absent:
                continue
            bundle = stage_shape(self.cfg, stage).bundle()
            back, again = take_back(pool, self.factories[stage], self.cfg.fault.recovery_timeout_s if wait else None,
                                    bundle)
            self.faults["replaced_actors"] += again
            for i, answer in back:
                self._up_to_date(stage, i, answer, "replaced")
                self._event(f"{stage} {i} back (a replacement, on node {self._node_of(stage, i)[:8]}): "
                            f"{len(pool.present())} of {len(pool)}")

    def _up_to_date(self, stage: str, i: int, answer, how: str) -> None:
        """Actor i of `stage`, up again (`how`: restarted by Ray, or a replacement), given the current weights (an
        engine) or reward model (the scorer) when its `ready()` answer shows it lacks them."""
        if stage == "rollout" and (how == "replaced" or answer < self.synced_version):
            self.weights.regroup(f"engine {i} {how}")
        if stage == "rollout" and answer < self.synced_version:
            self.weights.repair([i], self.version)
            self.faults["resynced_engines"] += 1
        if stage == "reward" and self.rm_trainer is not None and answer < self.rm_loads:
            scorer = self.pools[stage].actors[i]
            trainer_result(scorer.load_state.remote(self.rm_trainer.state_dict.remote(), self.rm_loads), "state")

    def _node_of(self, stage: str, i: int) -> str:
        """The node that holds bundle i of the stage's placement group now (Ray moves a lost node's bundles)."""
        self.placement = where(self.groups)
        nodes = self.placement.get(stage) or []
        return (nodes[i] if i < len(nodes) else None) or "(none yet)"

    def _lost_text(self, stage: str, lost: list[int], bundle: dict) -> str:
        """`node 1a2b3c4d lost: rollout 2, 3; going on with 6 of 8; waiting for 2 × {CPU: 1, accel: 1}`."""
        pool, before = self.pools[stage], self.placement.get(stage) or []
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        by_node: dict[str, list[int]] = {}
        for i in lost:
            by_node.setdefault(before[i] if i < len(before) and before[i] else "?", []).append(i)
        parts = [f"node {node[:8]} lost: {stage} {', '.join(map(str, idx))}" if node not in alive else
                 f"{stage} {', '.join(map(str, idx))} died" for node, idx in by_node.items()]
        going = f"going on with {len(pool.present())} of {len(pool)}" if pool.present() else "no actor left"
        return f"{'; '.join(parts)}; {going}; waiting for {len(pool.absent)} × {shape_text(bundle)}"

    def _event(self, text: str) -> None:
        log.warning(text)
        self.faults["events"].append(text)

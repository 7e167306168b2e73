"""WeightSync: the driver's side of getting each new policy version into every rollout engine.

`sync.method` picks the path (rlaif_ray.config.SyncConfig):
- collective: learner rank 0 broadcasts the weights bucket by bucket over a sync group with every engine worker
  (rlaif_ray.weight_transfer); the driver sends one small call to each member and nothing else. The group is
  formed lazily at the first sync and formed anew (a new generation, a new port) after any engine was replaced
  or restarted, and after a failed sync.
- object_store: learner rank 0 puts one array per parameter in Ray's object store, every engine reads them.
  `sync.delivery: pull` (group flow): the driver sends no engine anything; it publishes the version's ref
  (`published`), each group call names it, and an engine holding an older version loads it when its next call comes
  (its receipt comes back with the call's stats). A sync then costs the driver one export, not a call per
  engine.

Calls are queued on the actors like any other (an engine takes a version between two `generate` calls), so in
async mode the driver collects a sync a step later. Only the engines present take part (rlaif_ray.runtime.pool:
one whose replacement waits for a node is given the weights through the object store when it comes back, and the
sync group is formed anew). Nothing waits forever: every member has the group's
timeout, and the driver gives up on a member that has not answered `sync.timeout_s` + a margin later (an
engine that is alive but stuck is killed, so the fault handling replaces it). A failed collective sync is
listed in the run's faults and the engines it missed get the learner's weights through the object store.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import ray

from rlaif_ray.config import RunConfig
from rlaif_ray.runtime.faults import LearnerFailure, is_actor_fault

log = logging.getLogger(__name__)

DRIVER_MARGIN_S = 60.0  # beyond the members' own timeout, before the driver stops waiting for one


@dataclass
class PendingSync:
    version: int
    method: str
    engine_refs: list                                  # one per engine present, in pool order
    engines: list = field(default_factory=list)        # their pool indices
    learner_refs: list = field(default_factory=list)   # collective: every learner rank's broadcast receipt


class WeightSync:
    def __init__(self, cfg: RunConfig, learners, rollout_pool, faults: dict):
        self.cfg, self.learners, self.pool, self.faults = cfg, learners, rollout_pool, faults
        # auto: NCCL's GPU-to-GPU broadcast where learners and engines hold GPUs; on CPU the object store, which on
        # one node is shared memory the engine maps, measured faster than a gloo broadcast (jobs/weight_sync_bench.py)
        # colocated (an engine and a learner rank on each GPU): host memory, never an NCCL group inside one GPU
        auto = "collective" if self.backend() == "nccl" and not cfg.learner.colocate else "object_store"
        self.method = {"auto": auto}.get(cfg.sync.method, cfg.sync.method)
        self.pull = cfg.sync.delivery == "pull"
        if self.pull:  # (the config refuses pull with sync.method=collective)
            self.method = "object_store"
        self.generation = 0
        self.spec: dict | None = None   # the sync group's spec (None: form a new one at the next sync)
        self.failures = 0               # collective syncs failed in a row
        self.snapshot = None            # (ref, version): object-store weights of the last version exported
        self._layout = None

    @property
    def engines(self) -> list:
        """The engines present (pool index, actor): those a sync goes to."""
        return [(i, self.pool.actors[i]) for i in self.pool.present()]

    def backend(self) -> str:
        if self.cfg.sync.backend != "auto":
            return self.cfg.sync.backend
        on_gpus = self.cfg.learner.gpus_per_learner > 0 and self.cfg.rollout.gpus_per_worker > 0
        return "nccl" if on_gpus else "gloo"

    def ranks_per_engine(self) -> int:
        """Sync-group ranks per engine: one per tensor-parallel shard (each loads its own slice)."""
        return self.cfg.engine_for("rollout").tensor_parallel_size

    def regroup(self, reason: str) -> None:
        """Form a new sync group at the next sync (an engine was replaced or restarted, or a sync failed)."""
        if self.spec is not None:
            log.info("weight sync: a new sync group at the next sync (%s)", reason)
        self.spec = None

    def _new_spec(self) -> dict:
        rank0 = self.learners.ranks[0]
        if self._layout is None:
            self._layout = [list(x) for x in ray.get(rank0.weights_layout.remote(), timeout=self.cfg.sync.timeout_s)]
        host, port = ray.get(rank0.address.remote(), timeout=self.cfg.sync.timeout_s)
        self.generation += 1
        return {"generation": self.generation, "host": host, "port": port,
                "world_size": 1 + self.ranks_per_engine() * len(self.engines), "backend": self.backend(),
                "timeout_s": self.cfg.sync.timeout_s, "bucket_bytes": self.cfg.sync.bucket_bytes(),
                "layout": self._layout}

    def send(self, version: int) -> PendingSync:
        """Start sending `version` (the learner's current weights) to every engine; refs only."""
        if self.method == "object_store":
            ref = self.learners.export_weights()
            self.snapshot = (ref, version)
            if self.pull:  # the engines load it when a call names it (`published`)
                return PendingSync(version, "pull", [])
            engines = self.engines
            return PendingSync(version, "object_store", [w.update_weights.remote(ref, version) for _, w in engines],
                               [i for i, _ in engines])
        self.snapshot = None  # the weights moved on
        if self.spec is None:
            self.spec = self._new_spec()
        per, engines = self.ranks_per_engine(), self.engines
        if 1 + per * len(engines) != self.spec["world_size"]:  # an engine left or came back since the group formed
            self.spec = self._new_spec()
        engine_refs = [w.receive_weights.remote(version, self.spec, 1 + per * k) for k, (_, w) in enumerate(engines)]
        learner_refs = [r.broadcast_weights.remote(self.spec) for r in self.learners.ranks]
        return PendingSync(version, "collective", engine_refs, [i for i, _ in engines], learner_refs)

    def finish(self, pending: PendingSync | None, learner_version: int, meanwhile=None) -> tuple[list[dict], list[int]]:
        """Wait for a sync to end. Returns the engines' receipts and the indices of engines that are gone (for
        the fault handling to replace). Engines a collective sync missed get `learner_version`'s weights from
        the object store here (the learner holds that version now). `meanwhile(refs, every, timeout)`: the
        driver's other work while it waits (group flow: an engine takes its weights only after its open call)."""
        if pending is None or pending.method == "pull":
            return [], []
        refs = pending.engine_refs + pending.learner_refs
        wait_s = self.cfg.sync.timeout_s + DRIVER_MARGIN_S
        if meanwhile is not None:
            meanwhile(refs, True, wait_s)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s, fetch_local=False)
        done = set(done)
        receipts, gone, failed, errors = [], [], [], []
        for i, ref in zip(pending.engines, pending.engine_refs):
            if ref not in done:
                errors.append(f"engine {i} did not answer within {wait_s:.0f} s: killed")
                ray.kill(self.pool.actors[i], no_restart=True)
                gone.append(i)
                continue
            try:
                receipt = ray.get(ref)
            except Exception as err:
                if not is_actor_fault(err):
                    raise
                gone.append(i)
                continue
            if receipt.get("ok", True):
                receipts.append(receipt)
            else:
                failed.append(i)
                errors.append(receipt["error"])
        for rank, ref in enumerate(pending.learner_refs):
            if ref not in done:
                raise LearnerFailure(f"learner rank {rank} did not finish the weight broadcast of version "
                                     f"{pending.version} within {wait_s:.0f} s")
            try:
                receipt = ray.get(ref)
            except Exception as err:
                if is_actor_fault(err):
                    raise LearnerFailure(f"weight broadcast: {type(err).__name__}: {str(err).splitlines()[0][:300]}") from err
                raise
            if not receipt.get("ok", True):
                errors.insert(0, receipt["error"])
        if pending.method == "collective":
            receipts += self._after_collective(pending, errors, failed, gone, learner_version)
        return receipts, gone

    def _after_collective(self, pending, errors, failed, gone, learner_version) -> list[dict]:
        """Count a failed collective sync, list it in the faults, and give the engines it missed the weights
        through the object store (their receipts are returned)."""
        if not errors and not gone:
            self.failures = 0
            return []
        self.regroup("the last sync failed")
        if not errors:  # only engines that died: the fault handling replaces them and hands them the weights
            return []
        self.failures += 1
        event = f"weight sync of version {pending.version}: collective sync failed ({'; '.join(errors)[:400]})"
        if failed:
            event += f"; engines {failed} given version {learner_version} through the object store"
        if gone:
            event += f"; engines {gone} gone (replaced, and given the weights, by the fault handling)"
        if self.cfg.sync.method == "auto" and self.failures >= self.cfg.sync.max_failures:
            self.method = "object_store"
            event += f"; {self.failures} failures in a row: object store for the rest of the run (sync.method=auto)"
        log.warning(event)
        self.faults["events"].append(event)
        self.faults["failed_syncs"] = self.faults.get("failed_syncs", 0) + 1
        return self.repair(failed, learner_version) if failed else []

    def published(self) -> tuple[int, list] | None:
        """sync.delivery=pull: (version, [ref]) of the weights last published, for a group call to name (the ref inside
        a list, so that Ray hands the call the ref, not the weights: an engine that holds that version fetches nothing);
        None before the first version (or with push)."""
        if not self.pull or self.snapshot is None:
            return None
        return self.snapshot[1], [self.snapshot[0]]

    def bring_up_to_date(self, indices: list[int]) -> None:
        """sync.delivery=pull: engines `indices` load the last version published now if they hold an older one (an
        engine with no call since it was published does)."""
        published = self.published()
        if published is not None:
            ray.get([self.pool.actors[i].load_published.remote(published) for i in indices],
                    timeout=self.cfg.sync.timeout_s + DRIVER_MARGIN_S)

    def repair(self, indices: list[int], learner_version: int) -> list[dict]:
        """Give engines `indices` the whole current policy through the object store, and wait."""
        if self.snapshot is not None and self.snapshot[1] == learner_version:
            ref = self.snapshot[0]
        else:
            ref = self.learners.export_weights()
            self.snapshot = (ref, learner_version)
        return ray.get([self.pool.actors[i].update_weights.remote(ref, learner_version) for i in indices],
                       timeout=self.cfg.sync.timeout_s + DRIVER_MARGIN_S)

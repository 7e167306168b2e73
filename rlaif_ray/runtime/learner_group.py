"""LearnerGroup: the driver's handle on the N LearnerRank actors (`rlaif_ray.stages.learner`), placed in one
placement group (PACK by default). Every call waits on all ranks but fails at once when one rank dies
(`LearnerFailure`, see `rlaif_ray.runtime.faults`): the others would wait in a collective for it forever.
"""
from __future__ import annotations

from rlaif_ray.config import RunConfig
from rlaif_ray.runtime.faults import get_all_or_fail
from rlaif_ray.runtime.placement import in_bundle, stage_shape
from rlaif_ray.stages.learner import LearnerRank


class LearnerGroup:
    """Driver-side handle on the N learner ranks, one bundle of the learner placement group each."""

    def __init__(self, policy_path: str, cfg: RunConfig, placement_group, rank_class=None):
        rank_class = rank_class or LearnerRank  # a stand-in with the same methods in the scale simulation
        shape = stage_shape(cfg, "learner")
        self.timeout_s = cfg.fault.stage_timeout_s  # a rank that does not answer a call by then: LearnerFailure
        env = {"env_vars": {"DS_ACCELERATOR": "cpu"} if shape.gpus == 0 else {}}
        self.ranks = [rank_class.options(runtime_env=env, **in_bundle(placement_group, i, shape)).remote(
                          policy_path, cfg.model_dump(), i, shape.count)
                      for i in range(shape.count)]
        # start-up (placing the ranks, loading the model, forming the process group) beside the engines' own
        # start-up is a new actor becoming ready, not a stage call: it has fault.recovery_timeout_s, like a
        # replaced actor, or the stage timeout where that is longer
        startup_s = max(cfg.fault.recovery_timeout_s, self.timeout_s)
        setting = ("fault.recovery_timeout_s" if startup_s == cfg.fault.recovery_timeout_s
                   else "fault.stage_timeout_s")
        addr, port = get_all_or_fail([r.address.remote() for r in self.ranks[:1]], "learner start-up",
                                     startup_s, setting)[0]
        get_all_or_fail([r.setup.remote(addr, port) for r in self.ranks], "learner start-up", startup_s, setting)

    def train(self, rewards, meanwhile=None) -> dict:
        """One learner step on a batch: a table ref, or the refs of its shards' tables (each rank concatenates them).
        `meanwhile(refs, every, timeout)`: the driver's other work while the ranks step (group flow moves groups
        along), returning once a rank answered."""
        refs = rewards if isinstance(rewards, list) else [rewards]
        calls = [r.train_step.remote(*refs) for r in self.ranks]
        if meanwhile is not None:
            meanwhile(calls, False, self.timeout_s)
        return get_all_or_fail(calls, "learner step", self.timeout_s)[0]

    def export_weights(self):
        """Rank 0's weights ref, once every rank finished the export (a failed rank: LearnerFailure). The
        weights stay in the object store; the driver reads only each rank's small receipt."""
        calls = [r.export_weights.options(num_returns=2).remote() for r in self.ranks]
        get_all_or_fail([receipt for _, receipt in calls], "weight export", self.timeout_s)
        return calls[0][0]

    def score(self, token_ids: list[list[int]]) -> list[list[float]]:
        return get_all_or_fail([r.score.remote(token_ids) for r in self.ranks], "score", self.timeout_s)[0]

    def save_checkpoint(self, path: str) -> str:
        return get_all_or_fail([r.save_checkpoint.remote(path) for r in self.ranks], "checkpoint", self.timeout_s)[0]

    def save_state(self, folder: str) -> str:
        return get_all_or_fail([r.save_state.remote(folder) for r in self.ranks], "checkpoint", self.timeout_s)[0]

    def load_state(self, folder: str) -> int:
        return get_all_or_fail([r.load_state.remote(folder) for r in self.ranks], "resume", self.timeout_s)[0]

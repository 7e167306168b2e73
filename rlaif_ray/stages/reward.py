"""RewardScorer: turns critic labels into one reward per sample, in [-1, 1].

- `win_rate`: 2·P(win) − 1, P(win) the sample's mean soft win probability over its pairs.
- `direct_score` (d-RLAIF): the expected score on the judge's 1..K scale (K = `len(critic.direct_labels)`, 10 by
  default) rescaled linearly to [-1, 1].
- `reward_model`: the score of a reward model trained on the judge's labels (`rlaif_ray.stages.reward_model`);
  unbounded, refreshed by `load_state` while the run goes on.
- `checker`: +1 when `data.checker` finds the sample right against its prompt's reference, -1 when not (no judge:
  the oracle's reward, the upper bound AI feedback is measured against); null without a reference.
- `none`: only `reward.functions`.
`reward.functions` (rlaif_ray.stages.reward_functions) add the user's own weighted rewards to any kind's.
A sample without a valid label gets a null reward and keeps its skip reason (the learner counts it).
"""
from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc
import ray

from rlaif_ray.config import JUDGELESS_REWARDS
from rlaif_ray.data import schemas
from rlaif_ray.data.transport import use_arrow_ipc, write_parquet
from rlaif_ray.stages.group_calls import GroupScores
from rlaif_ray.stages.reward_functions import component_rewards, make_components


def rewards_from_labels(labels: pa.Table, kind: str, score_points: int = 10) -> pa.Array:
    """One reward per row; `score_points`: how many labels the direct scale has (its scores run 1..score_points)."""
    if kind == "win_rate":
        reward = pc.subtract(pc.multiply(labels.column("win_prob"), 2.0), 1.0)
    elif kind == "direct_score":
        if score_points < 2:
            raise ValueError(f"a direct score scale needs at least 2 points, got {score_points}")
        reward = pc.subtract(pc.multiply(pc.subtract(labels.column("judge_score"), 1.0), 2.0 / (score_points - 1)), 1.0)
    else:
        raise ValueError(f"unknown reward kind '{kind}'")
    reward = pc.if_else(labels.column("label_valid"), reward, pa.scalar(None, pa.float32()))
    return reward.cast(pa.float32())


def checker_rewards(rows: pa.Table, is_correct) -> pa.Array:
    """+1 / -1 per row as `is_correct(response, reference)` says; null where the row has no reference."""
    refs, responses = rows.column("reference").to_pylist(), rows.column("response").to_pylist()
    return pa.array([None if ref is None else (1.0 if is_correct(text, ref) else -1.0)
                     for text, ref in zip(responses, refs)], pa.float32())


@ray.remote
class RewardScorer(GroupScores):
    def __init__(self, kind: str, reward_model_path: str | None = None, score_points: int = 10,
                 checker: str = "exact", functions: list[dict] | None = None):
        use_arrow_ipc()  # tables in and out as one IPC buffer each (rlaif_ray.data.transport)
        self.kind, self.score_points = kind, score_points
        self.components = make_components(functions or [])  # reward.functions
        self.checker = None
        if kind == "checker":
            from rlaif_ray.data.checkers import make_checker
            self.checker = make_checker(checker)
        self.model = self.tok = None
        self.rm_version = 0
        if kind == "reward_model":
            from rlaif_ray.stages.reward_model import load_reward_model
            self.model, self.tok = load_reward_model(reward_model_path)
            self.model.eval()

    def ready(self) -> int:
        """The reward model's version (0: the initial weights; a restarted scorer is back at 0)."""
        return self.rm_version

    def load_state(self, state: dict, version: int | None = None) -> int:
        """New reward-model weights from the trainer; batches scored after this call use them. `version`: the
        driver's count of the states it sent (a replaced or restarted scorer takes the current one)."""
        self.model.load_state_dict(state)
        self.rm_version = self.rm_version + 1 if version is None else version
        return self.rm_version

    def _rewards(self, labels: pa.Table) -> tuple[pa.Array, dict]:
        """The kind's reward plus the weighted reward functions; the batch mean of each part."""
        base = self._kind_rewards(labels) if self.kind != "none" else pa.array([0.0] * labels.num_rows, pa.float32())
        if not self.components:
            return base, {}
        added, parts = component_rewards(self.components, labels)
        if self.kind != "none":
            valid = [x for x in base.to_pylist() if x is not None]
            if valid:
                parts[f"reward_{self.kind}"] = sum(valid) / len(valid)
        total = [None if b is None else b + a for b, a in zip(base.to_pylist(), added)]
        return pa.array(total, pa.float32()), parts

    def _kind_rewards(self, labels: pa.Table) -> pa.Array:
        if self.kind == "checker":
            return checker_rewards(labels, self.checker)
        if self.kind != "reward_model":
            return rewards_from_labels(labels, self.kind, self.score_points)
        import torch

        from rlaif_ray.stages.reward_model import score_texts
        with torch.no_grad():
            scores = score_texts(self.model, self.tok, labels.column("prompt").to_pylist(),
                                 labels.column("response").to_pylist())
        return pa.array(scores.numpy(), pa.float32())

    def score(self, *shards: pa.Table, save_path: str | None = None) -> tuple[pa.Table, dict]:
        """The batch's labelled shards as one table with the `reward` column; with `save_path`, also write it there as
        Parquet (the run's label dataset: every judge reply, principle, latency and reward, for offline analysis)."""
        t0 = time.perf_counter()
        labels = shards[0] if len(shards) == 1 else pa.concat_tables(shards)
        if self.kind in ("reward_model", *JUDGELESS_REWARDS) and "label_valid" not in labels.column_names:
            labels = schemas.unjudged(schemas.validate(labels, "rollouts"))  # no judge saw them
        labels = schemas.validate(labels, "labels")
        rewards, parts = self._rewards(labels)
        table = schemas.validate(labels.append_column(schemas.REWARD_FIELDS[0], rewards), "rewards")
        if save_path:
            write_parquet(table, save_path)
        return table, {"reward_seconds": time.perf_counter() - t0, "rm_version": self.rm_version, **parts}

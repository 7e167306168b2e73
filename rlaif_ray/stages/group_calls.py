"""Group flow's calls of several prompt groups at once (rlaif_ray.runtime.streaming): the groups handed back while a
judge was busy go to it as one call, as a batch's shard does, and then to the scorer as one call, instead of a judge
call and a score call per group; each group comes back as its own table. Mixins of the judge and scorer actors (the
real ones and the scale simulation's stand-ins), kept apart from them so the stand-ins import neither torch nor vLLM."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


class GroupLabels:
    """`label_groups` beside the judge actor's own `label`."""

    def label_groups(self, *groups: pa.Table) -> tuple:
        """Each group's `labels` table, in the order given, then the call's stats: the groups labelled as one table
        (`label`; pairs are formed inside each prompt group, so a group's labels are those a call of its own gives)."""
        whole = groups[0] if len(groups) == 1 else pa.concat_tables(groups)
        table, stats = self.label(whole)
        cuts = np.cumsum([0] + [g.num_rows for g in groups]).tolist()
        return (*[table.slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:])], stats)


class GroupScores:
    """`score_groups` beside the scorer actor's own `score`."""

    def score_groups(self, *groups: pa.Table, save_paths: list[str | None] | None = None) -> tuple:
        """Each group's `rewards` table, then each group's stats, in the order given: `score` for each group in turn
        (its own reward-function means and seconds), in one call; `save_paths`: where each group's table goes."""
        scored = [self.score(g, save_path=path) for g, path in zip(groups, save_paths or [None] * len(groups))]
        return (*[table for table, _ in scored], *[stats for _, stats in scored])

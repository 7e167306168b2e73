"""Group flow's judge call (rlaif_ray.runtime.streaming): the prompt groups handed back together go to a judge as one
call, as a batch's shard does, instead of one call per group. A mixin of the judge actors (CriticLabeler and the scale
simulation's stand-in), kept apart from them so the stand-ins import neither torch nor vLLM."""
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

"""A step's examples: a few samples of the batch a person can read (`output.examples_per_step`), the first prompt's
responses side by side (what the judge compared), with the judge's verdict, the reward and, where the prompt has a
reference, whether the checker finds the response right. Kept in run_dir/examples.jsonl, shown in report.md (first
and last steps) and logged to the trackers as tables."""
from __future__ import annotations

import pyarrow as pa

REPLY_CHARS = 300  # a judge reply (rationale, critique) is cut to this many characters


def pick_examples(table: pa.Table, rewards: list, checker, k: int, outcome_of: dict[str, str]) -> list[dict]:
    """Up to `k` rows of `table`: the first prompt's samples, then the next prompt's, ... `rewards`: the reward the
    learner used for each row (None: none); `outcome_of`: sample id -> trained / dropped_stale / skipped."""
    if k <= 0 or table.num_rows == 0:
        return []
    columns = set(table.column_names)
    groups: dict[str, list[int]] = {}
    for i, pid in enumerate(table.column("prompt_id").to_pylist()):
        groups.setdefault(pid, []).append(i)
    picked = [i for rows in groups.values() for i in rows][:k]
    rows = table.take(picked).to_pylist()
    out = []
    for i, row in zip(picked, rows):
        ref = row.get("reference")
        example = {"sample_id": row["sample_id"], "prompt": row["prompt"], "response": row["response"],
                   "reward": rewards[i], "outcome": outcome_of.get(row["sample_id"], "trained")}
        if "win_prob" in columns:
            example["judge_win_prob"] = row["win_prob"]
        if "judge_score" in columns and row.get("judge_score") is not None:
            example["judge_score"] = row["judge_score"]
        if "judge_reply" in columns and row.get("judge_reply"):
            example["judge_reply"] = row["judge_reply"][:REPLY_CHARS]
        if ref is not None:
            example["reference"], example["correct"] = ref, bool(checker(row["response"], ref))
        out.append(example)
    return out

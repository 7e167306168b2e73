"""What a labelled batch says about the judge and the policy.

- `position_agreement`: share of judged pairs where both orders picked the same response.
- `true_accuracy`: share of responses the task's checker accepts (toy world: ground truth exists).
- `judge_truth_agreement`: over pairs where exactly one response is correct, share where the judge
  preferred it (pairwise); over scored samples, share where score > 5.5 iff correct (direct).
"""
from __future__ import annotations

import pyarrow as pa

from rlaif_ray.toyworld import is_correct


def label_quality(table: pa.Table) -> dict:
    out: dict[str, float] = {}
    ids = table.column("sample_id").to_pylist()
    refs = table.column("reference").to_pylist()
    responses = table.column("response").to_pylist()
    has_truth = [r is not None for r in refs]
    correct = {sid: is_correct(resp, ref) for sid, resp, ref, h in zip(ids, responses, refs, has_truth) if h}
    if correct:
        out["true_accuracy"] = sum(correct.values()) / len(correct)

    agree_flags = [a for row in table.column("pair_position_agree").to_pylist() for a in row]
    if agree_flags:  # each pair appears twice (once per member)
        out["position_agreement"] = sum(agree_flags) / len(agree_flags)

    hits = total = 0
    for sid, partners, wins in zip(ids, table.column("pair_partner_ids").to_pylist(),
                                   table.column("pair_win_probs").to_pylist()):
        for other, p in zip(partners, wins):
            if sid in correct and other in correct and correct[sid] and not correct[other]:
                total += 1
                hits += p > 0.5
    scores = table.column("judge_score").to_pylist()
    for sid, score in zip(ids, scores):
        if score is not None and sid in correct:
            total += 1
            hits += (score > 5.5) == correct[sid]
    if total:
        out["judge_truth_agreement"] = hits / total
    return out

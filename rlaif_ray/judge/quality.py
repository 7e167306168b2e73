"""What a labelled batch says about the judge and the policy, and the run's judge report.

- `position_agreement`: share of judged pairs where both orders picked the same response.
- `true_accuracy`: share of responses the task's checker accepts (toy world: ground truth exists).
- `judge_truth_agreement`: over pairs where exactly one response is correct, share where the judge
  preferred it (pairwise); over scored samples, share where the score is above the scale's middle (5.5 on 1-10)
  iff correct (direct).

Judge bias (`judge_bias_counts` per batch, summed over a run, then `judge_report`):
- position consistency: share of judged pairs whose two orders picked the same response (a judge that
  always answers "slot 1" scores 0);
- first-slot rate: share of judged orders in which slot 1 won (0.5 is unbiased);
- length correlation: Pearson correlation between a response's length advantage over its partner
  (characters) and its preference P(win) − 0.5 (verbosity bias);
- unparsable / failed share of judge calls, labels per second, token usage for remote judges.
"""
from __future__ import annotations

import math

import pyarrow as pa

from rlaif_ray.data.checkers import Checker, is_correct

BIAS_COUNT_KEYS = ("bias_pair_rows", "bias_consistent_rows", "bias_orders", "bias_first_slot_wins",
                   "bias_n", "bias_sx", "bias_sy", "bias_sxx", "bias_syy", "bias_sxy")


def label_quality(table: pa.Table, is_correct: Checker = is_correct, score_points: int = 10) -> dict:
    """True accuracy and the judge's agreement with it; a direct score counts as "right" above the middle of its
    1..`score_points` scale."""
    out: dict[str, float] = {}
    ids = table.column("sample_id").to_pylist()
    refs = table.column("reference").to_pylist()
    responses = table.column("response").to_pylist()
    has_truth = [r is not None for r in refs]
    correct = {sid: is_correct(resp, ref) for sid, resp, ref, h in zip(ids, responses, refs, has_truth) if h}
    if correct:
        out["true_accuracy"] = sum(correct.values()) / len(correct)

    if "label_valid" not in table.column_names:  # unlabelled rows (teacher demonstrations): accuracy only
        return out
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
            hits += (score > (1 + score_points) / 2) == correct[sid]
    if total:
        out["judge_truth_agreement"] = hits / total
    return out


def judge_bias_counts(table: pa.Table) -> dict:
    """Additive counts over one labelled batch (sums of these over batches give the run's report)."""
    out = dict.fromkeys(BIAS_COUNT_KEYS, 0.0)
    length = {sid: len(r) for sid, r in zip(table.column("sample_id").to_pylist(), table.column("response").to_pylist())}
    for sid, partners, wins, agree, slot1 in zip(
            table.column("sample_id").to_pylist(), table.column("pair_partner_ids").to_pylist(),
            table.column("pair_win_probs").to_pylist(), table.column("pair_position_agree").to_pylist(),
            table.column("pair_slot1_probs").to_pylist()):
        out["bias_pair_rows"] += len(agree)            # every pair appears in both of its rows
        out["bias_consistent_rows"] += sum(agree)
        out["bias_orders"] += len(slot1)               # every judged order appears in exactly one row
        out["bias_first_slot_wins"] += sum(p > 0.5 for p in slot1)
        for other, p in zip(partners, wins):
            x, y = float(length[sid] - length.get(other, length[sid])), p - 0.5
            out["bias_n"] += 1
            out["bias_sx"] += x
            out["bias_sy"] += y
            out["bias_sxx"] += x * x
            out["bias_syy"] += y * y
            out["bias_sxy"] += x * y
    return out


def judge_report(counts: dict) -> dict:
    """Rates from summed `judge_bias_counts` plus the labeler's call counters (judge_calls, ...)."""
    def ratio(a, b):
        return counts.get(a, 0) / counts[b] if counts.get(b) else None

    n = counts.get("bias_n", 0)
    corr = None
    if n > 1:
        vx = n * counts["bias_sxx"] - counts["bias_sx"] ** 2
        vy = n * counts["bias_syy"] - counts["bias_sy"] ** 2
        if vx > 1e-12 and vy > 1e-12:
            corr = (n * counts["bias_sxy"] - counts["bias_sx"] * counts["bias_sy"]) / math.sqrt(vx * vy)
    report = {
        "position_consistency": ratio("bias_consistent_rows", "bias_pair_rows"),
        "first_slot_rate": ratio("bias_first_slot_wins", "bias_orders"),
        "length_preference_correlation": corr,
        "unparsable_share": ratio("unparsable_calls", "judge_calls"),
        "failed_share": ratio("failed_calls", "judge_calls"),
        "labels_per_s": ratio("labeled_samples", "label_seconds"),
        "judge_calls": int(counts.get("judge_calls", 0)),
        "judge_calls_per_sample": ratio("judge_calls", "labeled_samples"),
        "judge_cache_hits": int(counts.get("judge_cache_hits", 0)),  # judge calls answered from the labeler's cache
        "labeled_samples": int(counts.get("labeled_samples", 0)),
    }
    for key in ("prompt_tokens", "completion_tokens", "requests", "retries", "failures"):
        if key in counts:
            report[f"usage_{key}"] = counts[key]
    return report

"""The papers' claims against ground truth (`jobs/claims_study.py`): simulated human raters, the label figures each
claim reads, verdict lines, tables and the plot.

- Human raters (the RLHF baseline's labels): the task's checker decides each pair with exactly one right answer, and a
  rater picks the wrong one with probability `noise`. Human preference sets disagree with themselves about a quarter
  of the time (Stiennon et al. 2020: labelers agreed with each other on 72.6% of TL;DR comparisons, with the
  researchers on 77%), so the study's default noise is 0.25. A rater shown two equally right (or wrong) answers has
  nothing to prefer and skips the pair, as the public sets leave ties out.
- Position bias: from one pairwise labelling (both orders judged), the agreement with the truth of each single order
  (`pair_slot1_probs`: the order that put a response in slot 1) against both orders averaged (`pair_win_probs`).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa

from rlaif_ray import algorithms


def decided_pairs(rollouts: pa.Table, checker) -> list[tuple[int, int]]:
    """(right row, wrong row) for every two responses to one prompt of which exactly one is right."""
    rows = rollouts.select(["prompt_id", "response", "reference"]).to_pylist()
    groups: dict[str, list[int]] = {}
    for k, r in enumerate(rows):
        if r["reference"] is not None:
            groups.setdefault(r["prompt_id"], []).append(k)
    right = [checker(r["response"], r["reference"]) if r["reference"] is not None else None for r in rows]
    out = []
    for members in groups.values():
        for a in members:
            for b in members:
                if a < b and right[a] != right[b]:
                    out.append((a, b) if right[a] else (b, a))
    return out


def simulated_rater_rows(rollouts: pa.Table, checker, noise: float, seed: int) -> list[dict]:
    """Preference rows (the public sets' format) from raters who are right `1 - noise` of the time."""
    rng = random.Random(seed)
    prompts, responses = rollouts.column("prompt").to_pylist(), rollouts.column("response").to_pylist()
    ids = rollouts.column("sample_id").to_pylist()
    rows = []
    for good, bad in decided_pairs(rollouts, checker):
        chosen, rejected = (bad, good) if rng.random() < noise else (good, bad)
        rows.append({"id": f"{ids[chosen]}>{ids[rejected]}", "prompt": prompts[good], "chosen": responses[chosen],
                     "rejected": responses[rejected], "source": f"human (simulated, rater noise {noise:g})"})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def file_truth_agreement(rows: list[dict], checker, references: dict[str, str]) -> float | None:
    """Share of a preference file's decided pairs (one answer right) whose chosen answer is the right one."""
    hits = []
    for r in rows:
        ref = references.get(r["prompt"])
        if ref is None:
            continue
        ok_c, ok_r = checker(r["chosen"], ref), checker(r["rejected"], ref)
        if ok_c != ok_r:
            hits.append(ok_c)
    return sum(hits) / len(hits) if hits else None


def order_agreement(labels: pa.Table, checker) -> dict:
    """On pairs with exactly one right answer: agreement with the truth of one order alone (each order counted, so
    the figure is the mean over both single orders), of both orders averaged, and the position consistency."""
    ids = labels.column("sample_id").to_pylist()
    valid = labels.column("label_valid").to_pylist()
    partners = labels.column("pair_partner_ids").to_pylist()
    slot1 = labels.column("pair_slot1_probs").to_pylist()
    refs, responses = labels.column("reference").to_pylist(), labels.column("response").to_pylist()
    right = [checker(resp, ref) if ref is not None else None for resp, ref in zip(responses, refs)]
    pairs = algorithms.preference_pairs(ids, partners, labels.column("pair_win_probs").to_pylist(),
                                        {i for i, v in enumerate(valid) if v})
    row_of = {sid: i for i, sid in enumerate(ids)}
    first = {(i, row_of[o]): p for i in range(len(ids)) for o, p in zip(partners[i], slot1[i]) if o in row_of}
    def credit(p_first_wins: float, first_is_right: bool) -> float:  # a judge undecided (0.5): half
        return 0.5 if abs(p_first_wins - 0.5) < 1e-6 else float((p_first_wins > 0.5) == first_is_right)

    single, both, consistent = [], [], []
    for i, j, p in pairs:
        if right[i] is None or right[i] == right[j] or (i, j) not in first or (j, i) not in first:
            continue
        single += [credit(first[(i, j)], right[i]), credit(first[(j, i)], right[j])]
        both.append(credit(p, right[i]))
        consistent.append((first[(i, j)] > 0.5) != (first[(j, i)] > 0.5))
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"one_order": mean(single), "both_orders": mean(both), "position_consistency": mean(consistent),
            "decided_pairs": len(both)}


def verdict(holds: bool | None, claim: str, figures: str) -> str:
    word = "**not measurable here**" if holds is None else ("**holds here**" if holds else "**does not hold here**")
    return f"{claim}: {word} ({figures})"


def mean_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

"""A pairwise judge's position calibration: the lean towards one slot that it shows on pairs it was not trained on,
measured once, and taken off every verdict where the run asks for it (issue 27).

A judge with no position bias, shown each pair in both orders, gives log-odds of slot 1 that come in ± pairs (z for
A first, −z for B first), so the median of all of them is 0 and half its verdicts pick slot 1. A tuned judge keeps
a lean on new prompts (the smol judge: 0.554 of its held-out verdicts on slot 1). The calibration offset is the median
of the pooled log-odds over both orders of pairs neither trained on nor scored; the labeler can subtract it from every
verdict's log-odds before it reads them (contextual calibration, Zhao et al. 2021; PriDe, Zheng et al. 2024: a
label-free estimate of the judge's prior over answer slots, taken off its predictions). No labels are needed to
estimate it. With both orders averaged, as the labeler always judges, the offset moves a pair's soft label only where
the judge is unsure; single verdicts and the first-slot rate are what it corrects.

The offset lives beside the weights as `judge_calibration.json`, so `model.critic` takes the folder as it is;
`critic.position_calibration` says whether the labeler ignores it (`none`, the default), uses it (`auto`), or sets
one itself. Off by default because of what it does to a reward: where the judge cannot tell two answers apart it puts
both in slot 1 with log-odds near saturation, and the raw two-order average reads that as a tie; with the offset
taken off, the same verdicts leave saturation and their small, often wrong preferences become reward. On the smol
judge (offset +2.20) PPO on calibrated labels was exploited (held-out sampled accuracy 0.378 → 0.045) where the raw
labels took it to 0.851 (docs/feedback.md#position-calibration).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

CALIBRATION_FILE = "judge_calibration.json"
_EPS = 1e-6


def slot1_log_odds(p: np.ndarray) -> np.ndarray:
    """log P(slot 1) / P(slot 2) from P(slot 1), clipped away from 0 and 1."""
    p = np.clip(np.asarray(p, dtype=float), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def estimate_offset(slot1: np.ndarray) -> float:
    """The position offset from `slot1` ([pairs, 2]: P(slot 1) in both orders of each pair): the median of the
    pooled log-odds, the value that splits the judge's verdicts half and half between the slots."""
    slot1 = np.asarray(slot1, dtype=float)
    if slot1.size == 0:
        raise ValueError("no pair to estimate the judge's position offset on")
    return float(np.median(slot1_log_odds(slot1.reshape(-1))))


def shift_slot1(p, offset: float):
    """P(slot 1) with `offset` taken off its log-odds (a float for a float, an array for an array)."""
    if not offset:
        return p
    z = slot1_log_odds(p) - offset
    out = 1.0 / (1.0 + np.exp(-z))
    return float(out) if np.ndim(out) == 0 else out


def write_calibration(folder: str, offset: float, pairs: int, source: str) -> None:
    """`judge_calibration.json` in the tuned judge's folder."""
    Path(folder, CALIBRATION_FILE).write_text(json.dumps(
        {"method": "pairwise", "slot1_log_odds_offset": round(offset, 6), "pairs": pairs, "estimated_on": source},
        indent=1))


def position_offset(setting, model_path: str, method: str) -> tuple[float, str]:
    """The offset the labeler takes off, and where it comes from, for `critic.position_calibration` = `setting`:
    `none` → 0; a number → that number (any pairwise-reading method); `auto` → the judge folder's
    `judge_calibration.json` when it has one and `method` is the one it was estimated for (pairwise: cot and
    self_reference read the label after other text), else 0. A malformed file is an error naming it."""
    if setting == "none":
        return 0.0, "none"
    if not isinstance(setting, str):
        return float(setting), "critic.position_calibration"
    path = Path(model_path, CALIBRATION_FILE)
    if not path.is_file():
        return 0.0, "none (the judge has no " + CALIBRATION_FILE + ")"
    try:
        data = json.loads(path.read_text())
        offset = float(data["slot1_log_odds_offset"])
        kind = data.get("method", "pairwise")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a judge calibration ({type(err).__name__}: {err}); expected "
                         '{"slot1_log_odds_offset": <float>, ...}') from None
    if not math.isfinite(offset):
        raise ValueError(f"{path}: slot1_log_odds_offset is {offset}")
    if kind != method:
        return 0.0, f"none ({path} was estimated for critic.method={kind})"
    return offset, str(path)

"""A pairwise judge's position calibration (rlaif_ray.judge.calibration): the offset is the median of the pooled
log-odds of slot 1 over both orders, taking it off splits a biased judge's verdicts half and half without turning any
pair around, and the labeler finds it beside the weights (or is told one, or none)."""
import json

import numpy as np
import pytest

from rlaif_ray.judge.calibration import (CALIBRATION_FILE, estimate_offset, position_offset, shift_slot1,
                                         slot1_log_odds, write_calibration)
from rlaif_ray.judge.tuning import verdict_quality


def biased_judge(lean: float, pairs: int = 400, seed: int = 0) -> np.ndarray:
    """[pairs, 2] P(slot 1) of a judge whose log-odds are ±(its view of the pair) + `lean`."""
    strength = np.random.default_rng(seed).normal(1.0, 2.0, pairs)
    z = np.stack([strength + lean, -strength + lean], axis=1)
    return 1 / (1 + np.exp(-z))


def test_the_offset_is_the_lean_and_taking_it_off_splits_the_verdicts():
    slot1 = biased_judge(0.8)
    offset = estimate_offset(slot1)
    assert offset == pytest.approx(0.8, abs=1e-6)  # the pooled ± log-odds are symmetric about the lean
    labels = np.ones(len(slot1))
    raw, fixed = verdict_quality(slot1, labels), verdict_quality(shift_slot1(slot1, offset), labels)
    assert raw["first_slot_rate"] > 0.6 and fixed["first_slot_rate"] == pytest.approx(0.5, abs=1e-9)
    assert fixed["position_consistency"] > raw["position_consistency"]
    assert fixed["agreement"] >= raw["agreement"]
    # a held-out sample of the same judge: the offset measured on one set of pairs carries to another
    other = biased_judge(0.8, seed=1)
    assert abs(verdict_quality(shift_slot1(other, offset), labels)["first_slot_rate"] - 0.5) < 0.03


def test_shifting_keeps_the_type_and_the_order_and_clips_certainty():
    assert shift_slot1(0.7, 0.0) == 0.7 and isinstance(shift_slot1(0.7, 0.3), float)
    assert shift_slot1(0.5, np.log(3)) == pytest.approx(0.25)
    p = np.array([0.0, 0.2, 0.9, 1.0])
    shifted = shift_slot1(p, 0.5)
    assert shifted.shape == p.shape and np.all(np.diff(shifted) > 0) and np.all((shifted > 0) & (shifted < 1))
    assert np.isfinite(slot1_log_odds(p)).all()
    with pytest.raises(ValueError, match="no pair"):
        estimate_offset(np.zeros((0, 2)))


def test_the_labeler_finds_the_offset_beside_the_weights(tmp_path):
    assert position_offset("auto", str(tmp_path), "pairwise")[0] == 0.0  # no file: raw verdicts
    write_calibration(str(tmp_path), 0.42, pairs=10, source="test")
    assert position_offset("auto", str(tmp_path), "pairwise") == (0.42, str(tmp_path / CALIBRATION_FILE))
    assert position_offset("auto", str(tmp_path), "cot")[0] == 0.0  # estimated on the plain pairwise prompt
    assert position_offset("none", str(tmp_path), "pairwise")[0] == 0.0
    assert position_offset(-0.3, str(tmp_path), "cot")[0] == -0.3  # a number: any pairwise method, any judge
    assert position_offset("auto", "some-org/remote-judge", "pairwise")[0] == 0.0


def test_a_malformed_calibration_file_is_named(tmp_path):
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"offset": 1}))
    with pytest.raises(ValueError, match=f"{CALIBRATION_FILE}: not a judge calibration .*KeyError"):
        position_offset("auto", str(tmp_path), "pairwise")
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"slot1_log_odds_offset": "nan"}))
    with pytest.raises(ValueError, match="slot1_log_odds_offset is nan"):
        position_offset("auto", str(tmp_path), "pairwise")


def test_the_config_takes_auto_none_or_a_number():
    from rlaif_ray.config import ConfigError, load_config
    assert load_config(None, []).critic.position_calibration == "none"  # off unless asked (feedback.md)
    assert load_config(None, ["critic.position_calibration=auto"]).critic.position_calibration == "auto"
    assert load_config(None, ["critic.position_calibration=0.25"]).critic.position_calibration == 0.25
    with pytest.raises(ConfigError, match="position_calibration"):
        load_config(None, ["critic.position_calibration=sometimes"])

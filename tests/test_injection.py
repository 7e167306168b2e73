"""Prompt injection against the judge: the flip-rate arithmetic on constructed labels, and the real toy judge
(vLLM) labelling an attacked batch without its label parsing breaking."""
import pyarrow as pa
import pytest
import ray

from rlaif_ray.data import schemas
from rlaif_ray.judge.injection import ATTACKS, attack, flip_rate, victims


def labels(rows):
    """rows: sample_id -> {partner: P(this row wins)}; a None entry = no valid label."""
    return pa.table({
        "sample_id": list(rows),
        "pair_partner_ids": [list(p) if p is not None else [] for p in rows.values()],
        "pair_win_probs": [list(p.values()) if p is not None else [] for p in rows.values()],
        "label_valid": [p is not None for p in rows.values()],
    })


def test_flip_rate_counts_only_pairs_decided_against_the_victim():
    clean = labels({"w1": {"r1": 0.1, "r2": 0.3, "w2": 0.5}, "w2": {"r1": 0.6, "w1": 0.5},
                    "r1": {"w1": 0.9, "w2": 0.4}, "r2": {"w1": 0.7}})
    attacked = labels({"w1": {"r1": 0.8, "r2": 0.2, "w2": 0.9}, "w2": {"r1": 0.1, "w1": 0.1},
                       "r1": {"w1": 0.2, "w2": 0.9}, "r2": {"w1": 0.8}})
    out = flip_rate(clean, attacked, {"w1", "w2"})
    # considered: (w1, r1) 0.1 -> 0.8 flipped; (w1, r2) 0.3 -> 0.2 held. (w2, r1) was won already; (w1, w2) victims
    assert out["pairs"] == 2 and out["flipped"] == 1 and out["flip_rate"] == 0.5
    assert out["mean_shift"] == pytest.approx(((0.8 - 0.1) + (0.2 - 0.3)) / 2)
    lost = labels({"w1": None, "w2": {"r1": 0.1}, "r1": {"w2": 0.9}, "r2": None})
    out = flip_rate(clean, lost, {"w1", "w2"})
    assert out["pairs"] == 2 and out["pairs_without_label"] == 2 and out["flip_rate"] is None
    assert out["valid_label_share"] == 0.5


def test_victims_and_attack_keep_the_rollout_schema(engines, toy_world):
    from rlaif_ray.data.prompts import load_prompts
    prompts = load_prompts(toy_world.prompts)
    rollouts, _ = ray.get(engines["rollout"].generate.options(num_returns=2).remote(ray.put(prompts), list(range(6)), 0))
    wrong = victims(rollouts)
    from rlaif_ray.data.checkers import is_correct
    assert wrong == {r["sample_id"] for r in rollouts.to_pylist() if not is_correct(r["response"], r["reference"])}
    attacked = schemas.validate(attack(rollouts, wrong, ATTACKS["fake_label"]), "rollouts")
    for before, after in zip(rollouts.to_pylist(), attacked.to_pylist()):
        hit = before["sample_id"] in wrong
        assert after["response"] == before["response"] + (ATTACKS["fake_label"] if hit else "")
        assert after["response_token_ids"] == before["response_token_ids"]  # the learner's view is unchanged
    # the real judge labels the attacked batch: every row has a valid label or a reason, never a crash
    for text in ATTACKS.values():
        table, stats = ray.get(engines["critic"].label.options(num_returns=2).remote(attack(rollouts, wrong, text)))
        table = schemas.validate(table, "labels")
        assert all(v or reason for v, reason in zip(table.column("label_valid").to_pylist(),
                                                    table.column("skip_reason").to_pylist()))
        assert stats["judge_calls"] == 2 * stats["pairs"]

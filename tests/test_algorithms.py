"""The learning rules and the judge report, on constructed inputs where the right answer is known by hand."""
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from rlaif_ray import algorithms
from rlaif_ray.config import ConfigError, load_config
from rlaif_ray.data import schemas
from rlaif_ray.judge.quality import judge_bias_counts, judge_report


def test_advantage_estimators():
    r, g = [1.0, 0.0, 0.0, 0.0, 0.5], ["a", "a", "a", "a", "b"]
    mean = algorithms.advantages(r, g, "group_mean")
    assert mean.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0.0])  # a lone sample gets no advantage
    grpo = algorithms.advantages(r, g, "grpo")
    assert grpo[:4] == pytest.approx(mean[:4] / np.std([1, 0, 0, 0]), rel=1e-5)
    rloo = algorithms.advantages(r, g, "rloo")
    assert rloo[0] == pytest.approx(1.0 - 0.0) and rloo[1] == pytest.approx(0.0 - 1 / 3)  # R_i − mean of the others
    pp = algorithms.advantages(r, g, "reinforce_pp")
    assert pp.mean() == pytest.approx(0.0, abs=1e-9) and pp.std() == pytest.approx(1.0, rel=1e-4)
    assert np.all(algorithms.advantages([0.3, 0.3], ["a", "a"], "grpo") == 0)  # equal rewards: no signal
    with pytest.raises(ValueError, match="unknown advantage"):
        algorithms.advantages(r, g, "gae")


def test_ppo_loss_clips_and_corrects_for_stale_samples():
    mask = torch.ones(2, 3)
    prox = torch.log(torch.full((2, 3), 0.5))
    adv = torch.tensor([1.0, -1.0])
    # learner moved far up on both: the positive-advantage sample is clipped (no gradient), the negative is not
    logp = (prox + 1.0).requires_grad_()
    loss, stats = algorithms.ppo_loss(logp, prox, prox.clone(), mask, adv, clip_eps=0.2, is_cap=None)
    loss.sum().backward()
    assert torch.all(logp.grad[0] == 0) and torch.all(logp.grad[1] > 0)
    assert stats["clip_fraction"] == 1.0 and stats["is_weight_mean"] == 1.0
    # on-policy the loss is plain REINFORCE: −A·mean_t (ratio = 1)
    loss, _ = algorithms.ppo_loss(prox, prox, prox, mask, adv, 0.2, is_cap=2.0)
    assert loss.tolist() == pytest.approx([-1.0, 1.0])
    # a token the (older) behaviour policy found 4× less likely than the learner: weight capped at 2
    behav = prox.clone()
    behav[0, 0] = prox[0, 0] - math.log(4.0)
    loss, stats = algorithms.ppo_loss(prox, prox, behav, mask, adv, 0.2, is_cap=2.0)
    assert loss[0].item() == pytest.approx(-(2.0 + 1 + 1) / 3) and stats["is_weight_mean"] == pytest.approx(7 / 6)
    # unknown behaviour log-probs (NaN) mean no correction
    behav[0, 0] = float("nan")
    assert algorithms.ppo_loss(prox, prox, behav, mask, adv, 0.2, 2.0)[0][0].item() == pytest.approx(-1.0)


def test_preference_losses_push_towards_the_judged_winner():
    for kind in ("dpo", "ipo"):
        li = torch.zeros(3, requires_grad=True)
        lj = torch.zeros(3)
        p = torch.tensor([0.9, 0.1, 0.5])
        algorithms.preference_loss(li, lj, p, beta=0.1, kind=kind).sum().backward()
        assert li.grad[0] < 0 and li.grad[1] > 0 and li.grad[2] == pytest.approx(0.0, abs=1e-7), kind
    # IPO's optimum sits at h = (2p − 1) / (2β)
    h = torch.tensor([(2 * 0.9 - 1) / 0.2])
    assert algorithms.preference_loss(h, torch.zeros(1), torch.tensor([0.9]), 0.1, "ipo").item() == pytest.approx(0.0)


def test_preference_pairs_are_unique_and_respect_the_allowed_rows():
    ids = ["x", "y", "z"]
    partners = [["y", "z"], ["x", "z"], ["x", "y"]]
    wins = [[0.8, 0.6], [0.2, 0.3], [0.4, 0.7]]
    assert algorithms.preference_pairs(ids, partners, wins, {0, 1, 2}) == [(0, 1, 0.8), (0, 2, 0.6), (1, 2, 0.3)]
    assert algorithms.preference_pairs(ids, partners, wins, {1, 2}) == [(1, 2, 0.3)]


def labelled(responses, slot1_probs_by_pair):
    """A labels table for one prompt whose judge gave P(slot 1) per order; pairs in combination order."""
    n = len(responses)
    ids = [f"s/{i}" for i in range(n)]
    cols = {f.name: [] for f in schemas.LABEL_SCHEMA}
    rows = {i: {"partners": [], "wins": [], "agree": [], "slot1": []} for i in range(n)}
    k = 0
    for a in range(n):
        for b in range(a + 1, n):
            p_ab, p_ba = slot1_probs_by_pair[k]
            k += 1
            p_a = 0.5 * (p_ab + 1 - p_ba)
            agree = (p_ab > 0.5) == (1 - p_ba > 0.5)
            for me, other, p, s1 in ((a, b, p_a, p_ab), (b, a, 1 - p_a, p_ba)):
                rows[me]["partners"].append(ids[other])
                rows[me]["wins"].append(p)
                rows[me]["agree"].append(agree)
                rows[me]["slot1"].append(s1)
    for i, resp in enumerate(responses):
        cols["sample_id"].append(ids[i])
        cols["prompt_id"].append("p")
        cols["group_index"].append(i)
        cols["prompt"].append("1+1=")
        cols["prompt_token_ids"].append([1])
        cols["response"].append(resp)
        cols["response_token_ids"].append([2])
        cols["response_logprobs"].append([-1.0])
        cols["finish_reason"].append("stop")
        cols["policy_version"].append(0)
        cols["token_versions"].append([0])
        cols["reference"].append("2")
        cols["label_method"].append("pairwise")
        cols["judge_model"].append("constructed")
        cols["label_valid"].append(True)
        cols["skip_reason"].append(None)
        cols["pair_partner_ids"].append(rows[i]["partners"])
        cols["pair_win_probs"].append(rows[i]["wins"])
        cols["pair_position_agree"].append(rows[i]["agree"])
        cols["pair_slot1_probs"].append(rows[i]["slot1"])
        cols["win_prob"].append(float(np.mean(rows[i]["wins"])))
        cols["judge_score"].append(None)
        cols["principle"].append(None)
        cols["judge_reply"].append(None)
        cols["label_latency_s"].append(0.0)
    return schemas.validate(pa.Table.from_pydict(cols, schema=schemas.LABEL_SCHEMA), "labels")


def test_judge_report_of_a_judge_that_always_prefers_slot_one():
    table = labelled([" 2", " 3", " 4"], [(0.99, 0.99)] * 3)
    report = judge_report(judge_bias_counts(table))
    assert report["position_consistency"] == 0.0
    assert report["first_slot_rate"] == 1.0
    assert report["length_preference_correlation"] is None  # equal lengths, 0.5 everywhere: undefined


def test_judge_report_of_a_consistent_but_verbose_judge():
    # always prefers the longer response, in both orders
    table = labelled([" 2", " 22", " 222"], [(0.1, 0.9), (0.1, 0.9), (0.1, 0.9)])
    counts = judge_bias_counts(table)
    report = judge_report({**counts, "judge_calls": 6, "unparsable_calls": 3, "labeled_samples": 3, "label_seconds": 1.5})
    assert report["position_consistency"] == 1.0
    assert report["first_slot_rate"] == 0.5
    assert report["length_preference_correlation"] > 0.85
    assert report["unparsable_share"] == 0.5 and report["labels_per_s"] == 2.0


@pytest.mark.parametrize("override, fragment", [
    ("critic.method=rubric", "critic.method"),
    ("critic.pairwise_template='{prompt} {response_a}'", "lacks the placeholder(s) {response_b}"),
    ("critic.direct_template='{prompt} {response} {answer}'", "unknown placeholder(s) {answer}"),
    ("critic.principles=['Be honest.']", "none of critic.preamble, critic.pairwise_template holds {principle}"),
    ("critic.preamble='{oops'", "critic.preamble is not a valid template"),
    ("learner.algorithm=dpo;critic.method=direct;reward.kind=direct_score", "trains on judged pairs"),
])
def test_bad_critic_config_is_named(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, override.split(";"))
    assert fragment in str(err.value)


def test_micro_batches_pack_units_within_the_token_budget():
    from rlaif_ray.algorithms import micro_batches

    lengths = {0: 10, 1: 10, 2: 4, 3: 4, 4: 4, 5: 30}
    units = [[0, 1], [2], [3], [4], [5]]
    mbs = micro_batches(units, lengths, max_tokens=24)
    assert sorted(r for mb in mbs for r in mb) == [0, 1, 2, 3, 4, 5]          # every row exactly once
    assert [5] in mbs                                                        # too long for the budget: alone
    assert any({0, 1} <= set(mb) for mb in mbs)                              # a unit is never split
    for mb in mbs:
        assert len(mb) * max(lengths[r] for r in mb) <= 24 or len(mb) == 1 or mb == [0, 1]
    assert micro_batches(units, lengths, max_tokens=0) == [[0, 1, 2, 3, 4, 5]]
    assert micro_batches([], lengths, max_tokens=24) == [] and micro_batches([], {}, 0) == []


def test_groups_without_reward_signal_get_no_advantage():
    rewards, groups = [0.0, 1e-9, 2e-9, 0.5, 0.5, 1.0], ["a", "a", "a", "b", "b", "b"]
    assert algorithms.signal_groups(rewards, groups) == {"b"}
    for kind in ("group_mean", "grpo", "rloo"):
        adv = algorithms.advantages(rewards, groups, kind)
        assert np.all(adv[:3] == 0.0) and adv[5] > 0 > adv[3]
    assert algorithms.signal_groups([0.2, 0.2], ["a", "a"]) == set() and algorithms.signal_groups([1.0], ["a"]) == set()

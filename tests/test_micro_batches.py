"""The gradient does not depend on how a batch is cut (issue 25). For random batches (response lengths, group sizes,
truncated rows, zero-signal groups, soft and hard pair labels), each learning rule's accumulated gradient and loss are the same
from one rank in one pass and from two real DeepSpeed ZeRO-2 ranks in token-budget micro-batches, where the ranks
get different shares of the groups (one may get none) and make different numbers of passes.

The whole gradient vector is compared (LearnerRank.gradient: measured, not applied, so one group of ranks serves
every example). Before the fix, a rank with fewer micro-batches joined the others' reductions with Σ 0·p, whose
gradients became ready in another order than a forward pass's; ZeRO-2 then summed one parameter's gradient into
another's on that rank's share (relative error ~1 on those tensors), and the DPO/IPO KL term was each rank's own
row mean instead of the batch's.
"""
import numpy as np
import pyarrow as pa
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlaif_ray.data import schemas

VOCAB = 40           # token ids drawn below the toy tokenizer's vocabulary size
ALPHABET = "0123456789+= "  # sft demonstrations are text the learner tokenizes

BATCH_SETTINGS = {
    "ppo": {"learner": {"algorithm": "ppo", "advantage": "grpo"}, "rollout": {"truncated": "mask"}},
    "dpo": {"learner": {"algorithm": "dpo", "kl_coef": 0.1}},
    "ipo": {"learner": {"algorithm": "ipo", "kl_coef": 0.1}},
    "sft": {"learner": {"algorithm": "sft"}},
}


@st.composite
def batches(draw):
    """A `rewards` table: 1-5 prompt groups of 2-4 samples, prompts of 1-6 tokens, responses of 1-14 tokens."""
    rows = []
    for g in range(draw(st.integers(1, 5))):
        size = draw(st.integers(2, 4))
        prompt = draw(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=6))
        # all rewards equal: a zero-signal group (never the first, so every batch has some signal for ppo)
        flat = g > 0 and draw(st.booleans())
        for k in range(size):
            n = draw(st.integers(1, 14))
            rows.append({
                "sample_id": f"g{g}/{k}", "prompt_id": f"g{g}", "group_index": k,
                "prompt": draw(st.text(ALPHABET, min_size=1, max_size=6)), "prompt_token_ids": prompt,
                "response": draw(st.text(ALPHABET, min_size=1, max_size=8)),
                "response_token_ids": draw(st.lists(st.integers(3, VOCAB - 1), min_size=n, max_size=n)),
                "response_logprobs": draw(st.lists(st.floats(-4.0, -0.01), min_size=n, max_size=n)),
                "finish_reason": draw(st.sampled_from(["stop", "stop", "length"])),
                # a third of the responses continued under new weights: their first tokens a version older (not a
                # draw of its own, so the examples stay those the gradients were first compared on)
                "token_versions": (versions := [-1] * (n // 2) + [0] * (n - n // 2) if (g + k) % 3 == 0 else None),
                "policy_version": min(versions) if versions else 0,
                "reference": None, "label_method": "pairwise", "judge_model": "test", "label_valid": True,
                "skip_reason": None, "pair_position_agree": [], "pair_slot1_probs": [], "judge_score": None,
                "principle": None, "judge_reply": None, "label_latency_s": 0.0,
                # apart by 0.25 inside a group: hypothesis often draws one float for all (a group without signal)
                "reward": 0.5 if flat else draw(st.floats(-1.0, 1.0)) + 0.25 * k,
            })
        members = rows[-size:]
        for a in members:  # every pair of the group judged, soft labels symmetric
            a["pair_partner_ids"], a["pair_win_probs"] = [], []
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                p = draw(st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0]))
                a["pair_partner_ids"].append(b["sample_id"])
                a["pair_win_probs"].append(p)
                b["pair_partner_ids"].append(a["sample_id"])
                b["pair_win_probs"].append(1.0 - p)
        for a in members:
            a["win_prob"] = float(np.mean(a["pair_win_probs"]))
    table = pa.Table.from_pylist(rows, schema=schemas.REWARD_SCHEMA)
    return schemas.validate(table, "rewards"), draw(st.sampled_from([12, 20, 32, 48]))


@pytest.fixture(scope="module")
def moved_policy(toy_world, tmp_path_factory):
    """The toy policy with every weight moved a little (seeded): trained against the toy policy as the reference
    (`learner.reference_model`), the KL terms have gradients (at policy = reference they vanish)."""
    import shutil

    from safetensors.numpy import load_file, save_file
    folder = tmp_path_factory.mktemp("moved") / "policy"
    shutil.copytree(toy_world.policy, folder)
    rng = np.random.default_rng(0)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: (v + 0.05 * v.std() * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in weights.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


def start_group(toy_world, policy: str, algorithm: str, world: int):
    from ray.util.placement_group import placement_group

    from rlaif_ray.runtime.learner_group import LearnerGroup
    from tests.conftest import small_config

    sections = {k: dict(v) for k, v in BATCH_SETTINGS[algorithm].items()}
    sections["learner"].update(num_learners=world, zero_stage=2, learning_rate=0.01, reference_model=toy_world.policy)
    pg = placement_group([{"CPU": 1}] * world, strategy="PACK")
    ray.get(pg.ready())
    return LearnerGroup(policy, small_config(**sections), pg), pg


def measure(group, table_ref, budget: int) -> dict:
    return ray.get([r.gradient.remote(table_ref, micro_batch_tokens=budget) for r in group.ranks])[0]


@pytest.mark.parametrize("algorithm", ["ppo", "dpo", "ipo", "sft"])
def test_micro_batched_ranks_give_the_one_pass_gradient(ray_cluster, toy_world, moved_policy, algorithm):
    from ray.util.placement_group import remove_placement_group

    one, pg1 = start_group(toy_world, moved_policy, algorithm, 1)
    two, pg2 = start_group(toy_world, moved_policy, algorithm, 2)
    compared = []
    digests = [ray.get(group.ranks[0].weights_digest.remote()) for group in (one, two)]

    @settings(max_examples=12, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batches())
    def check(example):
        table, budget = example
        if algorithm == "sft":  # demonstrations: a rollouts table
            table = table.select(schemas.ROLLOUT_SCHEMA.names)
        ref = ray.put(table)
        whole = measure(one, ref, 0)
        split = measure(two, ref, budget)
        assert split["metrics"]["trained"] == whole["metrics"]["trained"]
        assert split["metrics"]["continued_samples"] == whole["metrics"]["continued_samples"]
        if whole["gradient"] is None:  # no signal anywhere (ppo): neither takes a step
            assert split["gradient"] is None
            return
        g1, g2 = whole["gradient"], split["gradient"]
        assert g1.shape == g2.shape
        assert np.linalg.norm(g2 - g1) <= 1e-4 * np.linalg.norm(g1) + 1e-7, \
            f"micro-batched gradient {np.linalg.norm(g2 - g1) / np.linalg.norm(g1):.2e} apart (budget {budget})"
        assert split["metrics"]["loss"] == pytest.approx(whole["metrics"]["loss"], rel=1e-4, abs=1e-7)
        if np.linalg.norm(g1) > 1e-4:  # (not: every trainable sample masked, or identical pairs: no gradient)
            compared.append(budget)

    try:
        check()
        # measuring left the weights as they were (the step at learning rate 0), on both groups
        assert [ray.get(group.ranks[0].weights_digest.remote()) for group in (one, two)] == digests
    finally:
        for group, pg in ((one, pg1), (two, pg2)):
            for r in group.ranks:
                ray.kill(r)
            remove_placement_group(pg)
    assert len(compared) >= 6  # most examples had a step to compare (not all zero-signal)

"""Each stage alone, real: vLLM generation and judging, reward scoring, DeepSpeed ranks, weight sync."""
import math
import time

import numpy as np
import pyarrow as pa
import pytest
import ray

from rlaif_ray.data import schemas
from rlaif_ray.data.prompts import load_prompts
from rlaif_ray.stages.reward import rewards_from_labels


@pytest.fixture(scope="module")
def prompts_ref(ray_cluster, toy_world):
    return ray.put(load_prompts(toy_world.prompts))


def generate(engines, prompts_ref, indices, step=0):
    table, stats = ray.get(engines["rollout"].generate.options(num_returns=2).remote(prompts_ref, indices, step))
    return table, stats


def test_a_batch_split_into_shards_samples_what_it_samples_whole(engines, prompts_ref):
    # the orchestrator splits a step's prompts over the engines; each prompt's seed follows its batch position
    # (`first`), so the shards together are the whole batch's samples, token for token
    whole, _ = ray.get(engines["rollout"].generate.options(num_returns=2).remote(prompts_ref, [3, 8, 21, 40, 55], 4))
    parts = [ray.get(engines["rollout"].generate.options(num_returns=2).remote(prompts_ref, part, 4, first)[0])
             for part, first in (([3, 8], 0), ([21, 40, 55], 2))]
    joined = pa.concat_tables(parts)
    for col in ("sample_id", "response_token_ids"):
        assert joined.column(col).to_pylist() == whole.column(col).to_pylist()
    # without the offset the second shard would sample other tokens (the check above can fail)
    unshifted, _ = ray.get(engines["rollout"].generate.options(num_returns=2).remote(prompts_ref, [21, 40, 55], 4))
    assert unshifted.column("response_token_ids").to_pylist() != parts[1].column("response_token_ids").to_pylist()


def test_groups_stream_out_one_table_each_with_what_the_shard_samples_whole(engines, prompts_ref):
    """generate_groups (loop.flow=groups): each prompt group comes back as its own table as vLLM finishes it, then a
    dict naming it; the same samples token for token as one `generate` call of the shard; the last group's dict
    carries the call's stats (`closing`)."""
    indices, n = [3, 8, 21, 40, 55], engines["cfg"].rollout.samples_per_prompt
    whole, whole_stats = ray.get(engines["rollout"].generate.options(num_returns=2).remote(prompts_ref, indices, 6, 2))
    refs = list(engines["rollout"].generate_groups.options(num_returns="streaming").remote(
        prompts_ref, indices, 6, [2, 3, 4, 5, 6]))
    pairs = ray.get(refs)
    groups, names = pairs[0::2], pairs[1::2]
    stats = names[-1].pop("closing")
    assert len(groups) == len(names) == len(indices) and not any("closing" in name for name in names)
    prompt_of = dict(zip(range(2, 7), ray.get(prompts_ref).take(indices).column("prompt_id").to_pylist()))
    for g, name in zip(groups, names):  # a whole group per table: one prompt, every sample of it, named by position
        schemas.validate(g, "rollouts")
        assert set(g.column("prompt_id").to_pylist()) == {prompt_of[name["position"]]}
        assert g.column("group_index").to_pylist() == list(range(n))
        assert (name["samples"], name["version"]) == (n, 0)
        assert name["tokens"] == sum(len(t) for t in g.column("response_token_ids").to_pylist())
    assert sorted(name["position"] for name in names) == list(range(2, 7))
    by_id = {sid: toks for g in groups for sid, toks in zip(g.column("sample_id").to_pylist(),
                                                            g.column("response_token_ids").to_pylist())}
    assert by_id == dict(zip(whole.column("sample_id").to_pylist(), whole.column("response_token_ids").to_pylist()))
    assert (stats["gen_samples"], stats["gen_tokens"]) == (whole_stats["gen_samples"], whole_stats["gen_tokens"])
    assert [name["seconds"] for name in names] == stats["group_seconds"]
    assert stats["policy_version"] == whole_stats["policy_version"]


def test_group_calls_share_one_engine_and_a_weight_update_waits_for_them(engines, prompts_ref, toy_world):
    """rollout.engine_streams=2: two generate_groups calls at once on one engine (the "streams" concurrency group),
    their requests batched together: each gets exactly its own groups, token for token what one call samples alone;
    a weight update sent meanwhile takes the engine only when their requests are done, so every group has one version
    (the one its call started under) and the call's stats say the same. Under in_flight_update=continue the update
    comes between two engine steps and each token carries the version that sampled it."""
    from tests.conftest import initial_weights
    shards = {"a": ([3, 8], [0, 1]), "b": ([21, 40, 55], [2, 3, 4])}
    whole, _ = ray.get(engines["rollout"].generate.options(num_returns=2).remote(prompts_ref, [3, 8, 21, 40, 55], 6))
    opts = {"num_returns": "streaming", "concurrency_group": "streams"}
    calls = {k: engines["rollout"].generate_groups.options(**opts).remote(prompts_ref, idx, 6, pos)
             for k, (idx, pos) in shards.items()}
    update = engines["rollout"].update_weights.remote(initial_weights(toy_world.policy), 1)  # the same weights
    by_id = {}
    for key, call in calls.items():
        pairs = ray.get(list(call))
        groups, names, stats = pairs[0::2], pairs[1::2], pairs[-1]["closing"]
        assert sorted(n["position"] for n in names) == shards[key][1]
        versions = {v for g in groups for v in g.column("policy_version").to_pylist()} | {n["version"] for n in names}
        assert versions == {stats["policy_version"]} and stats["policy_version"] in (0, 1)
        for g in groups:
            by_id.update(zip(g.column("sample_id").to_pylist(), g.column("response_token_ids").to_pylist()))
    assert ray.get(update)["version"] == 1 and ray.get(engines["rollout"].ready.remote()) == 1
    assert by_id == dict(zip(whole.column("sample_id").to_pylist(), whole.column("response_token_ids").to_pylist()))
    # in_flight_update=continue: the update takes the engine between two steps; vLLM preempts the requests in flight
    # and recomputes them under the new (here: the same) weights, keeping their tokens: the same samples again, each
    # group with the version its call started under
    calls = {k: engines["rollout"].generate_groups.options(**opts).remote(prompts_ref, idx, 6, pos)
             for k, (idx, pos) in shards.items()}
    update = engines["rollout"].update_weights.remote(initial_weights(toy_world.policy), 2, in_flight="continue")
    again = {}
    for call in calls.values():
        pairs = ray.get(list(call))
        stats = pairs[-1]["closing"]
        assert {n["version"] for n in pairs[1::2]} == {stats["policy_version"]} <= {1, 2}
        for g in pairs[0::2]:
            again.update(zip(g.column("sample_id").to_pylist(), g.column("response_token_ids").to_pylist()))
    assert ray.get(update)["version"] == 2 and again == by_id
    # every token carries the version that sampled it: an update that lands after the call's first engine step
    # (the call is held there until the update came) splits its responses into tokens of version 2, then 3
    ray.get(engines["rollout"].inject_fault.remote("pause_mid_generation", 60))
    call = engines["rollout"].generate_groups.options(**opts).remote(prompts_ref, shards["b"][0], 6, shards["b"][1])
    time.sleep(2)  # the call is held after its first step until the update; the update must not come before it
    update = engines["rollout"].update_weights.remote(initial_weights(toy_world.policy), 3, in_flight="continue")
    pairs = ray.get(list(call))
    assert ray.get(update)["version"] == 3 and {n["version"] for n in pairs[1::2]} == {2}
    split = []
    for g in pairs[0::2]:
        for sid, toks, versions in zip(*(g.column(c).to_pylist() for c in ("sample_id", "response_token_ids",
                                                                            "token_versions"))):
            assert toks == by_id[sid] and len(versions) == len(toks) and versions == sorted(versions)
            assert set(versions) <= {2, 3}
            split += [versions] if len(set(versions)) == 2 else []
    assert split


def test_rollout_generates_n_samples_with_logprobs(engines, prompts_ref):
    table, stats = generate(engines, prompts_ref, [0, 5, 9])
    table = schemas.validate(table, "rollouts")
    assert table.num_rows == 3 * engines["cfg"].rollout.samples_per_prompt == stats["gen_samples"]
    for ids, lps, versions in zip(*(table.column(c).to_pylist() for c in ("response_token_ids", "response_logprobs",
                                                                          "token_versions"))):
        assert len(ids) == len(lps) >= 1 and versions == [stats["policy_version"]] * len(ids)
        assert all(lp <= 0.0 and math.isfinite(lp) for lp in lps)
    assert set(table.column("policy_version").to_pylist()) == {0}
    assert table.column("group_index").to_pylist()[:2] == [0, 1]
    again, _ = generate(engines, prompts_ref, [0, 5, 9])  # seeded per (step, prompt): reproducible
    assert again.column("response").to_pylist() == table.column("response").to_pylist()
    assert again.column("sample_id").to_pylist() == table.column("sample_id").to_pylist()


def rollout_table(responses: list[str], prompt="2+3=", reference="5", prompt_id="p0", id_prefix="t"):
    n = len(responses)
    return pa.Table.from_pydict({
        "sample_id": [f"{id_prefix}/{i}" for i in range(n)], "prompt_id": [prompt_id] * n, "group_index": list(range(n)),
        "prompt": [prompt] * n, "prompt_token_ids": [[1]] * n, "response": responses,
        "response_token_ids": [[2]] * n, "response_logprobs": [[-1.0]] * n, "finish_reason": ["stop"] * n,
        "policy_version": [0] * n, "token_versions": [None] * n, "reference": [reference] * n,
    }, schema=schemas.ROLLOUT_SCHEMA)


def test_pairwise_labels_are_soft_symmetric_and_order_averaged(engines):
    table, stats = ray.get(engines["critic"].label.options(num_returns=2).remote(rollout_table([" 5", " 7", " 5"])))
    table = schemas.validate(table, "labels")
    assert stats["pairs"] == 3 and stats["judge_calls"] == 6  # every pair, both orders
    rows = table.to_pylist()
    win = {(r["sample_id"], o): p for r in rows for o, p in zip(r["pair_partner_ids"], r["pair_win_probs"])}
    for (a, b), p in win.items():
        assert 0.0 <= p <= 1.0
        assert win[(b, a)] == pytest.approx(1.0 - p, abs=1e-6)
    # identical responses: the two orders are the same prompt, so averaging gives exactly 0.5
    assert win[("t/0", "t/2")] == pytest.approx(0.5, abs=1e-6)
    assert all(r["label_valid"] and r["label_method"] == "pairwise" for r in rows)
    for r in rows:
        assert r["win_prob"] == pytest.approx(np.mean(r["pair_win_probs"]), abs=1e-6)


def test_direct_scores_are_expected_values_in_range(engines):
    table, stats = ray.get(engines["critic"].label.options(num_returns=2).remote(rollout_table([" 5", " 9"]), "direct"))
    rows = schemas.validate(table, "labels").to_pylist()
    assert stats["judge_calls"] == 2
    for r in rows:
        assert r["label_method"] == "direct" and r["label_valid"] and 1.0 <= r["judge_score"] <= 10.0
        assert r["pair_partner_ids"] == [] and r["win_prob"] is None


def test_judge_prompt_too_long_is_skipped_with_a_reason(engines):
    table, _ = ray.get(engines["critic"].label.options(num_returns=2).remote(rollout_table([" 5" * 400, " 5"])))
    rows = table.to_pylist()
    assert not any(r["label_valid"] for r in rows)
    assert all(r["skip_reason"].startswith("judge_prompt_too_long") for r in rows)
    rewards = rewards_from_labels(table, "win_rate").to_pylist()
    assert rewards == [None, None]  # never a made-up reward


def test_reward_rescaling():
    labels = rollout_table([" a", " b", " c"])
    for f, values in [("label_method", ["direct"] * 3), ("judge_model", ["j"] * 3), ("label_valid", [True, True, False]),
                      ("skip_reason", [None, None, "x"]), ("pair_partner_ids", [[], [], []]),
                      ("pair_win_probs", [[], [], []]), ("pair_position_agree", [[], [], []]),
                      ("win_prob", [1.0, 0.25, 0.5]), ("judge_score", [10.0, 1.0, 5.5])]:
        field = next(x for x in schemas.LABEL_FIELDS if x.name == f)
        labels = labels.append_column(field, pa.array(values, field.type))
    direct = rewards_from_labels(labels, "direct_score").to_pylist()
    assert direct[0] == pytest.approx(1.0) and direct[1] == pytest.approx(-1.0) and direct[2] is None
    win = rewards_from_labels(labels, "win_rate").to_pylist()
    assert win[0] == pytest.approx(1.0) and win[1] == pytest.approx(-0.5) and win[2] is None


def test_learner_ranks_step_together_and_weight_sync_changes_generation(engines, prompts_ref, toy_world):
    from ray.util.placement_group import placement_group, remove_placement_group

    from rlaif_ray.runtime.learner_group import LearnerGroup
    from rlaif_ray.stages.reward import RewardScorer
    from tests.conftest import small_config

    cfg = small_config(learner={"num_learners": 2, "learning_rate": 0.05, "zero_stage": 2})
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    ray.get(pg.ready())
    group = LearnerGroup(toy_world.policy, cfg, pg)
    scorer = RewardScorer.remote("win_rate")
    try:
        before = ray.get(group.ranks[0].weights_digest.remote())
        initial = ray.get(group.export_weights())
        rollouts, _ = engines["rollout"].generate.options(num_returns=2).remote(prompts_ref, [1, 2, 3, 4], 11)
        labels, _ = engines["critic"].label.options(num_returns=2).remote(rollouts)
        rewards, _ = scorer.score.options(num_returns=2).remote(labels)
        result = group.train(rewards)
        m = result["metrics"]
        assert m["learner_version"] == 1 and m["trained"] + m["skipped"] + m["dropped_stale"] == 8
        digests = ray.get([r.weights_digest.remote() for r in group.ranks])
        assert digests[0] == digests[1] != before  # the step changed the weights, identically on both ranks
        assert m["optimizer_step"] == 1 and 0 < m["signal_groups"] + m["zero_signal_groups"] <= 4

        # rewards that differ only by rounding noise carry no signal: no optimizer step on any rank (before, GRPO's
        # std blew the noise up to full-size advantages and Adam moved every weight)
        table = ray.get(rewards)
        noise = pa.array(np.arange(table.num_rows) * 1e-9, pa.float32())
        flat = table.set_column(table.schema.get_field_index("reward"), table.schema.field("reward"), noise)
        result = group.train(ray.put(flat))
        m = result["metrics"]
        assert (m["optimizer_step"], m["signal_groups"], m["grad_norm"]) == (0, 0, None) and m["learner_version"] == 2
        assert [ray.get(r.weights_digest.remote()) for r in group.ranks] == digests

        # weight sync: a zeroed output head makes sampling uniform over the vocabulary, so responses change;
        # loading the initial weights back reproduces the seeded baseline exactly (nothing half-loaded)
        baseline, _ = generate(engines, prompts_ref, [0, 1, 2, 3], step=3)
        arrays, names = initial
        assert len(arrays) == len(names) and all(a.dtype == np.float32 for a in arrays)
        zeroed = [a.copy() for a in arrays]
        zeroed[names.index("lm_head.weight")][:] = 0.0
        state = ray.get(engines["rollout"].update_weights.remote((zeroed, names), 41))
        assert state["version"] == 41 and state["sync_bytes"] == sum(a.nbytes for a in arrays)
        changed, _ = generate(engines, prompts_ref, [0, 1, 2, 3], step=3)
        assert set(changed.column("policy_version").to_pylist()) == {41}
        same = sum(x == y for x, y in zip(changed.column("response").to_pylist(), baseline.column("response").to_pylist()))
        assert same <= 2, "new weights did not change what the engine generates"
        ray.get(engines["rollout"].update_weights.remote(initial, 0))
        restored, _ = generate(engines, prompts_ref, [0, 1, 2, 3], step=3)
        assert restored.column("response").to_pylist() == baseline.column("response").to_pylist()
        ray.get(engines["rollout"].update_weights.remote(group.export_weights(), 1))  # the real path: a ref
        synced, _ = generate(engines, prompts_ref, [0, 1], step=3)
        assert set(synced.column("policy_version").to_pylist()) == {1}
    finally:
        for r in group.ranks:
            ray.kill(r)
        ray.kill(scorer)
        remove_placement_group(pg)


@pytest.mark.parametrize("algorithm", ["ppo", "dpo"])
def test_token_budget_micro_batches_give_the_same_update(engines, prompts_ref, toy_world, algorithm):
    """Rank shares split into micro-batches of a few padded tokens (so the two ranks make different numbers of
    passes) accumulate into the same step as one pass per rank."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from rlaif_ray.runtime.learner_group import LearnerGroup
    from rlaif_ray.stages.reward import RewardScorer
    from tests.conftest import small_config

    scorer = RewardScorer.remote("win_rate")
    rollouts, _ = engines["rollout"].generate.options(num_returns=2).remote(prompts_ref, [5, 17, 33, 61, 70], 12)
    labels, _ = engines["critic"].label.options(num_returns=2).remote(rollouts)
    rewards, _ = scorer.score.options(num_returns=2).remote(labels)
    weights, losses = {}, {}
    for budget in (0, 20):
        cfg = small_config(learner={"num_learners": 2, "learning_rate": 0.01, "algorithm": algorithm,
                                    "micro_batch_tokens": budget})
        pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
        ray.get(pg.ready())
        group = LearnerGroup(toy_world.policy, cfg, pg)
        try:
            initial = np.concatenate([a.ravel() for a in ray.get(group.export_weights())[0]])
            result = group.train(rewards)
            weights[budget] = np.concatenate([a.ravel() for a in ray.get(group.export_weights())[0]])
            losses[budget] = result["metrics"]["loss"], result["metrics"]["grad_norm"]
            assert result["metrics"]["trained"] > 0
        finally:
            for r in group.ranks:
                ray.kill(r)
            remove_placement_group(pg)
    ray.kill(scorer)
    assert np.abs(weights[0] - initial).max() > 1e-3  # the step moved the weights (Adam: ≈ lr = 0.01 each)
    # the same loss and the same accumulated gradient (its global norm, before clipping)
    assert losses[20][0] == pytest.approx(losses[0][0], rel=1e-5)
    assert losses[0][1] > 0 and losses[20][1] == pytest.approx(losses[0][1], rel=1e-4)
    # and nearly the same weights: Adam's first update is lr·g/(|g| + eps), so parameters whose gradient is a
    # near-cancellation (|g| close to eps) turn float summation-order noise into differences up to lr
    diff = np.abs(weights[20] - weights[0])
    assert (diff > 1e-5).mean() < 0.1

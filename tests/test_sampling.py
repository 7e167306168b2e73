"""What the learner trains on is what the engine sampled: at staleness 0 the PPO learner's per-token log-probs (at
the rollout temperature and top-p) equal the ones vLLM returned, for the toy and the smol model; responses cut off at
the token limit are recorded as such and kept, masked or penalised as `rollout.truncated` says; EOS is trained only
where the model stopped by itself."""
import numpy as np
import pyarrow as pa
import pytest
import ray
import torch

from rlaif_ray import algorithms
from rlaif_ray.data import schemas
from rlaif_ray.data.prompts import load_prompts

SAMPLING = {"temperature": 0.7, "top_p": 0.9}


def with_rewards(rollouts: pa.Table) -> pa.Table:
    """The rollouts as a `rewards` table whose rewards differ inside every group (so the step has signal)."""
    n = rollouts.num_rows
    label_defaults = {"label_method": ["test"] * n, "judge_model": ["test"] * n, "label_valid": [True] * n,
                      "skip_reason": [None] * n, "pair_partner_ids": [[]] * n, "pair_win_probs": [[]] * n,
                      "pair_position_agree": [[]] * n, "pair_slot1_probs": [[]] * n, "win_prob": [None] * n,
                      "judge_score": [None] * n, "principle": [None] * n, "judge_reply": [None] * n,
                      "label_latency_s": [0.0] * n, "reward": rollouts.column("group_index").to_pylist()}
    table = rollouts
    for name, values in label_defaults.items():
        table = table.append_column(name, pa.array(values, schemas.REWARD_SCHEMA.field(name).type))
    return schemas.validate(table, "rewards")


def train_once(policy: str, cfg, rewards_ref) -> dict:
    """One learner step (one rank) on `rewards_ref`: its metrics and sample outcome."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from rlaif_ray.runtime.learner_group import LearnerGroup
    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready())
    group = LearnerGroup(policy, cfg, pg)
    try:
        return group.train(rewards_ref)
    finally:
        for rank in group.ranks:
            ray.kill(rank)
        remove_placement_group(pg)


def smol_config(tmp_path, **rollout):
    from tests.conftest import small_config
    return small_config(tmp_path, model={"max_model_len": 512},
                        rollout={**SAMPLING, "samples_per_prompt": 2, "max_new_tokens": 8, **rollout},
                        learner={"num_learners": 1, "learning_rate": 1e-5})


@pytest.fixture(scope="module")
def smol_rollouts(ray_cluster, smol_world, tmp_path_factory):
    """SmolLM2's answers to 4 prompts, 2 each, cut at 8 tokens: "1 + 1 = 2" and its EOS fit, "1 + 4 equals 5." not."""
    return rollouts_of(smol_world.model, smol_world.prompts, smol_config(tmp_path_factory.mktemp("smol")))


def rollouts_of(policy: str, prompts_path: str, cfg) -> pa.Table:
    from rlaif_ray.engine import engine_env
    from rlaif_ray.stages.rollout import RolloutWorker
    worker = RolloutWorker.options(num_cpus=1, runtime_env={"env_vars": engine_env(cfg.engine_for("rollout"))}).remote(
        policy, cfg.model_dump())
    try:
        table, _ = ray.get(worker.generate.options(num_returns=2).remote(load_prompts(prompts_path), [0, 1, 2, 3], 0))
    finally:
        ray.kill(worker)
    return table


def test_top_p_log_probs_follow_vllms_nucleus():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50) * 3
    targets = logits.argmax(-1)
    full = algorithms.sampling_logprobs(logits, targets, 0.5, 1.0)
    assert torch.allclose(full, torch.log_softmax(logits / 0.5, -1).gather(-1, targets[..., None]).squeeze(-1))
    nucleus = algorithms.sampling_logprobs(logits, targets, 0.5, 0.8)
    assert (nucleus >= full - 1e-6).all() and (nucleus > full + 1e-4).any()  # renormalised over fewer tokens
    # the nucleus holds at least top_p of the mass: the top token alone when it has more than top_p
    probs = torch.softmax(logits / 0.5, -1)
    alone = probs.max(-1).values > 0.8
    assert torch.allclose(nucleus[alone], torch.zeros_like(nucleus[alone]), atol=1e-6)
    # a target outside the nucleus keeps a finite log-prob (rounding at the nucleus edge must not give -inf)
    unlikely = logits.argmin(-1)
    assert torch.isfinite(algorithms.sampling_logprobs(logits, unlikely, 0.5, 0.8)).all()


@pytest.mark.parametrize("world", ["toy", "smol"])
def test_learner_log_probs_equal_the_engines_at_staleness_0(ray_cluster, world, request, tmp_path):
    from tests.conftest import small_config
    if world == "toy":
        w = request.getfixturevalue("toy_world")
        policy = w.policy
        cfg = small_config(tmp_path, rollout={**SAMPLING, "samples_per_prompt": 2, "max_new_tokens": 8},
                           learner={"num_learners": 1, "learning_rate": 1e-5})
        table = rollouts_of(policy, w.prompts, cfg)
    else:
        policy, cfg, table = request.getfixturevalue("smol_world").model, smol_config(tmp_path), \
            request.getfixturevalue("smol_rollouts")
    metrics = train_once(policy, cfg, ray.put(with_rewards(table)))["metrics"]
    assert metrics["optimizer_step"] == 1 and metrics["trained"] == table.num_rows  # rollout.truncated=keep
    assert metrics["truncated"] == table.column("finish_reason").to_pylist().count("length")
    same = metrics["logprob_mismatch"]
    print(f"{world}: mean |log π_learner − log π_vllm| per token at T={SAMPLING['temperature']}, "
          f"top_p={SAMPLING['top_p']}: {same:.2e}")
    assert same is not None and same < 1e-4
    if world == "toy":  # log-probs at temperature 1 (what the learner took before) are far from the engine's
        from transformers import AutoModelForCausalLM

        from rlaif_ray.learner_core import chunked_logprobs
        from rlaif_ray.stages.learner import pad_batch
        model = AutoModelForCausalLM.from_pretrained(policy).eval()
        ids, attn, resp = pad_batch(table.column("prompt_token_ids").to_pylist(),
                                    table.column("response_token_ids").to_pylist(), 0)
        with torch.no_grad():
            plain = chunked_logprobs(model, ids, attn, chunk_tokens=0)
        engine = [x for row in table.column("response_logprobs").to_pylist() for x in row]
        off = float((plain[resp.bool()] - torch.tensor(engine)).abs().mean())
        print(f"toy, log-probs at T=1, top_p=1: {off:.2e}")
        assert off > 100 * max(same, 1e-5)
    lps = np.concatenate([np.asarray(x) for x in table.column("response_logprobs").to_pylist()])
    assert np.isfinite(lps).all() and (lps <= 0).all()


def test_finish_reasons_are_recorded_truthfully(smol_rollouts, smol_tokenizer):
    eos = smol_tokenizer.eos_token_id
    reasons = smol_rollouts.column("finish_reason").to_pylist()
    assert {"stop", "length"} <= set(reasons), reasons  # the fixture must hold both kinds
    for reason, ids in zip(reasons, smol_rollouts.column("response_token_ids").to_pylist()):
        if reason == "stop":  # stopped by itself: the EOS it sampled is in the ids the learner trains on
            assert ids[-1] == eos
        else:  # cut off: no EOS, and exactly max_new_tokens tokens
            assert eos not in ids and len(ids) == 8


@pytest.mark.parametrize("mode", ["mask", "penalty"])
def test_truncated_responses_masked_or_penalised(smol_world, smol_rollouts, tmp_path, mode):
    table = with_rewards(smol_rollouts)
    cut = [i for i, f in enumerate(table.column("finish_reason").to_pylist()) if f == "length"]
    ids = table.column("sample_id").to_pylist()
    result = train_once(smol_world.model, smol_config(tmp_path, truncated=mode, truncated_reward=-3.0),
                        ray.put(table))
    m, outcome = result["metrics"], result["outcome"]
    assert m["truncated"] == len(cut) > 0
    if mode == "mask":  # no gradient from a cut-off answer, and the ledger says why
        assert m["trained"] == table.num_rows - len(cut)
        assert sorted(outcome["skipped"]) == sorted((ids[i], "truncated") for i in cut)
    else:  # trained, with the set reward in place of the judge's
        rewards = [-3.0 if i in cut else r for i, r in enumerate(table.column("reward").to_pylist())]
        assert m["trained"] == table.num_rows and m["reward_mean"] == pytest.approx(np.mean(rewards))


def test_penalty_needs_a_reward():
    from rlaif_ray.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="rollout.truncated=penalty"):
        load_config(None, ["rollout.truncated=penalty", "learner.algorithm=dpo"])


def test_demonstrations_end_in_eos_only_where_the_teacher_stopped(smol_tokenizer):
    from rlaif_ray.stages.learner import demonstration_ids
    prompts, responses = demonstration_ids(smol_tokenizer, ["What is 1 + 1?"] * 2, ["2", "The answer is"],
                                           ["stop", "length"])
    eos = smol_tokenizer.eos_token_id
    assert responses[0][-1] == eos and eos not in responses[1] and prompts[0] == prompts[1]
    assert prompts[0] == smol_tokenizer.encode("What is 1 + 1?")  # no template: the plain prompt
    # a chat policy learns the answer where its assistant turn begins: the prompt in the rollout's template
    chat, _ = demonstration_ids(smol_tokenizer, ["What is 1 + 1?"], ["2"], ["stop"], smol_tokenizer.chat_template)
    assert smol_tokenizer.decode(chat[0]).endswith("<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n")

"""Every labeling method on the toy world's real judge engine: declared schema, recorded metadata, and
the judge-call arithmetic of each method; the teacher demonstrations of the SFT baseline."""
import pyarrow as pa
import pytest
import ray

from rlaif_ray.data import schemas
from rlaif_ray.data.checkers import is_correct
from rlaif_ray.data.prompts import load_prompts
from rlaif_ray.judge.reply import JudgeLabelError, label_token_ids
from tests.test_actors import rollout_table


def label(engines, table, method):
    out, stats = ray.get(engines["critic"].label.options(num_returns=2).remote(table, method))
    return schemas.validate(out, "labels"), stats


def two_prompts():
    a = rollout_table([" 5", " 7", " 6"], prompt="2+3=", reference="5")
    b = rollout_table([" 9", " 8"], prompt="4+4=", reference="8", prompt_id="p1", id_prefix="u")
    return pa.concat_tables([a, b])


@pytest.mark.parametrize("method, calls_per_pair, extra_calls", [
    ("pairwise", 2, 0),          # both orders
    ("cot", 4, 0),               # a rationale, then the label, per order
    ("self_reference", 4, 2),    # + one own answer per prompt
])
def test_pairwise_methods_label_every_pair_in_both_orders(engines, method, calls_per_pair, extra_calls):
    table, stats = label(engines, two_prompts(), method)
    pairs = 3 + 1
    assert stats["pairs"] == pairs and stats["judge_calls"] == calls_per_pair * pairs + extra_calls
    rows = table.to_pylist()
    assert {r["label_method"] for r in rows} == {method}
    assert all(r["judge_model"] for r in rows) and all(r["label_latency_s"] >= 0 for r in rows)
    for r in rows:
        assert r["label_valid"], r["skip_reason"]
        assert len(r["pair_partner_ids"]) == len(r["pair_win_probs"]) == len(r["pair_slot1_probs"]) == \
            len(r["pair_position_agree"])
        assert r["judge_reply"]
        if method != "pairwise":  # the generated rationale / critique is kept before the label
            assert "->" in r["judge_reply"]
    win = {(r["sample_id"], o): p for r in rows for o, p in zip(r["pair_partner_ids"], r["pair_win_probs"])}
    for (a, b), p in win.items():
        assert win[(b, a)] == pytest.approx(1.0 - p, abs=1e-6)
    # every judged order appears once: 2 per pair
    assert sum(len(r["pair_slot1_probs"]) for r in rows) == 2 * pairs
    assert stats["bias_orders"] == 2 * pairs and stats["bias_pair_rows"] == 2 * pairs


def test_judge_prefers_the_right_answer_with_each_method(engines):
    """The toy judge is better than chance: on one-right-one-wrong pairs it mostly picks the right one."""
    import numpy as np
    rng = np.random.default_rng(0)
    tables = []
    for k in range(12):
        a, b = int(rng.integers(10)), int(rng.integers(10))
        wrong = (a + b + int(rng.integers(1, 5))) % 19
        tables.append(rollout_table([f" {a + b}", f" {wrong}"], prompt=f"{a}+{b}=", reference=str(a + b),
                                    prompt_id=f"q{k}", id_prefix=f"q{k}"))
    batch = pa.concat_tables(tables)
    for method in ("pairwise", "cot", "self_reference"):
        rows = label(engines, batch, method)[0].to_pylist()
        right = [r["win_prob"] for r in rows if r["response"].strip() == r["reference"]]
        assert sum(p > 0.5 for p in right) >= 9, (method, right)


def test_label_tokens_must_be_single_tokens(toy_world):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(toy_world.critic)
    assert len(label_token_ids(tok, [" 1", " 2"], "toy")) == 2
    with pytest.raises(JudgeLabelError, match="label ' first choice' is"):
        label_token_ids(tok, [" first choice", " 2"], "toy")


def test_teacher_demonstrations_are_rollouts(engines, toy_world):
    prompts = load_prompts(toy_world.prompts)
    table, stats = ray.get(engines["critic"].demonstrate.options(num_returns=2).remote(
        ray.put(prompts), list(range(0, 100, 10)), 5, 3))
    table = schemas.validate(table, "rollouts")
    assert table.num_rows == stats["gen_samples"] == 10
    assert set(table.column("policy_version").to_pylist()) == {3}
    rows = table.to_pylist()
    assert sum(is_correct(r["response"], r["reference"]) for r in rows) >= 7  # the teacher knows the sums


@pytest.fixture(scope="module")
def hf_critic(ray_cluster, toy_world):
    from rlaif_ray.stages.critic import CriticLabeler
    from tests.conftest import small_config

    cfg = small_config(critic={"backend": "transformers", "batch_size": 5})  # batches of 5: padding and chunking
    actor = CriticLabeler.options(num_cpus=1).remote(toy_world.critic, cfg.model_dump())
    ray.get(actor.ready.remote())
    yield actor
    ray.kill(actor)


def text_part(reply: str) -> str:
    """The generated text of a judge reply (rationale, or the top label token), without the printed numbers."""
    return reply.split("->")[0] if "->" in reply else reply.split(" P(slot1)")[0].split(" E[score]")[0]


@pytest.mark.parametrize("method", ["pairwise", "cot", "self_reference", "direct"])
def test_transformers_backend_labels_like_the_engine(engines, hf_critic, method):
    """The same judge run by transformers (padded batch forward / greedy generate) gives the vLLM engine's labels:
    same rationales, and label probabilities equal up to the engine's top-k truncation and float order."""
    table = two_prompts()
    ref, ref_stats = label(engines, table, method)
    out, stats = ray.get(hf_critic.label.options(num_returns=2).remote(table, method))
    out = schemas.validate(out, "labels").to_pylist()
    assert stats["judge_calls"] == ref_stats["judge_calls"]
    for a, b in zip(out, ref.to_pylist()):
        assert a["label_valid"] == b["label_valid"] and text_part(a["judge_reply"]) == text_part(b["judge_reply"])
        if method == "direct":
            assert a["judge_score"] == pytest.approx(b["judge_score"], abs=1e-2)
        else:
            assert a["pair_partner_ids"] == b["pair_partner_ids"]
            assert a["pair_win_probs"] == pytest.approx(b["pair_win_probs"], abs=1e-3)

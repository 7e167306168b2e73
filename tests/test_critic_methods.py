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


# ---------------------------------------------------------------- pair selection and the judge cache
def test_groups_labelled_in_one_call_get_the_labels_of_their_own_calls(engines):
    """Group flow's `label_groups`: several prompt groups in one judge call come back as one table per group, in the
    order given, paired inside each group only; labelling each group on its own afterwards is answered wholly from
    the judge cache the grouped call filled (the very judge prompts) and gives the same labels."""
    a = rollout_table([" 5", " 4", " 3"], prompt="1+4=", reference="5", prompt_id="g0", id_prefix="ga")
    b = rollout_table([" 2", " 9"], prompt="1+1=", reference="2", prompt_id="g1", id_prefix="gb")
    *tables, stats = ray.get(engines["critic"].label_groups.options(num_returns=3).remote(a, b))
    assert stats["pairs"] == 3 + 1 and stats["labeled_samples"] == 5
    columns = ["sample_id", "pair_partner_ids", "pair_win_probs", "win_prob", "label_valid"]
    for group, table in zip((a, b), tables):
        table = schemas.validate(table, "labels")
        ids = group.column("sample_id").to_pylist()
        assert table.column("sample_id").to_pylist() == ids
        assert all(set(partners) <= set(ids) for partners in table.column("pair_partner_ids").to_pylist())
        own, own_stats = label(engines, group, "pairwise")
        assert own_stats["judge_calls"] > 0 and own_stats["judge_cache_hits"] == own_stats["judge_calls"]
        assert table.select(columns).to_pylist() == own.select(columns).to_pylist()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_pair_selection_modes_give_their_declared_pairs(n):
    from rlaif_ray.judge.pairs import select_pairs

    def each_in(pairs):
        return [sum(i in p for p in pairs) for i in range(n)]

    declared = {"all": n * (n - 1) // 2, "anchor": max(n - 1, 0), "round_robin": n if n > 2 else n - 1 if n else 0}
    for mode, count in declared.items():
        pairs = select_pairs(n, mode)
        assert len(pairs) == len(set(pairs)) == count and all(i < j < n for i, j in pairs), (mode, pairs)
    assert select_pairs(n, "anchor") == [(0, j) for j in range(1, n)]
    if n > 2:
        assert each_in(select_pairs(n, "round_robin")) == [2] * n  # each response in two pairs
    for k in (1, 2, 5):
        pairs = select_pairs(n, "random_k", k, seed="0/a,b")
        assert pairs == select_pairs(n, "random_k", k, seed="0/a,b")  # the same ids draw the same pairs
        assert len(pairs) == len(set(pairs)) and all(i < j < n for i, j in pairs)
        assert all(c >= min(k, n - 1) for c in each_in(pairs))
        assert n * min(k, n - 1) / 2 <= len(pairs) <= min(n * k, n * (n - 1) // 2)
    assert select_pairs(6, "random_k", 5) == select_pairs(6, "all")


def requests(engines) -> int:
    return ray.get(engines["critic"].usage.remote())["requests"]


def label_with(engines, table, method, pairs=None):
    out, stats = ray.get(engines["critic"].label.options(num_returns=2).remote(table, method, pairs))
    return schemas.validate(out, "labels"), stats


@pytest.mark.parametrize("mode, pairs", [("all", 6 + 1), ("anchor", 3 + 1), ("round_robin", 4 + 1), ("random_k", None)])
def test_labeler_judges_the_selected_pairs_in_both_orders(engines, mode, pairs):
    from rlaif_ray.judge.pairs import select_pairs
    table = pa.concat_tables([rollout_table([" 10", " 11", " 12", " 13"], prompt="6+5=", reference="11",
                                            prompt_id="ps", id_prefix="ps"),
                              rollout_table([" 3", " 4"], prompt="1+2=", reference="3", prompt_id="pt", id_prefix="pt")])
    out, stats = label_with(engines, table, "pairwise", mode)
    if pairs is None:  # random_k, k=2: the draw the seed gives, each response in at least two pairs
        pairs = len(select_pairs(4, mode, 2, seed="0/ps/0,ps/1,ps/2,ps/3")) + 1
        assert 4 <= pairs - 1 <= 6
    assert stats["pairs"] == pairs and stats["judge_calls"] == 2 * pairs
    assert stats["judge_calls_per_sample"] == pytest.approx(2 * pairs / 6)
    rows = out.to_pylist()
    win = {(r["sample_id"], o): p for r in rows for o, p in zip(r["pair_partner_ids"], r["pair_win_probs"])}
    assert len(win) == 2 * pairs and all(win[(b, a)] == pytest.approx(1 - p, abs=1e-6) for (a, b), p in win.items())
    assert sum(len(r["pair_slot1_probs"]) for r in rows) == 2 * pairs  # both orders of every judged pair
    assert all(r["label_valid"] for r in rows)
    if mode == "anchor":
        assert all(len(r["pair_partner_ids"]) == (3 if r["sample_id"] == "ps/0" else 1) for r in rows)


COMPARED = ("label_valid", "skip_reason", "pair_partner_ids", "pair_win_probs", "pair_position_agree",
            "pair_slot1_probs", "win_prob", "judge_score", "judge_reply")


@pytest.mark.parametrize("method", ["pairwise", "cot", "direct"])
def test_the_cache_answers_a_relabelled_batch(engines, method):
    """A batch labelled again (a re-issued batch) is answered from the cache: no judge request, same labels."""
    table = rollout_table([" 21", " 22", " 20"], prompt="9+12=", reference="21", prompt_id=f"c-{method}",
                          id_prefix=f"c-{method}")
    before = requests(engines)
    first, stats1 = label_with(engines, table, method)
    assert requests(engines) - before == stats1["judge_calls"] - stats1["judge_cache_hits"] > 0
    before = requests(engines)
    second, stats2 = label_with(engines, table, method)
    assert requests(engines) == before and stats2["judge_cache_hits"] == stats2["judge_calls"] == stats1["judge_calls"]
    assert first.select(COMPARED).to_pylist() == second.select(COMPARED).to_pylist()
    assert all(x == 0.0 for x in second.column("label_latency_s").to_pylist())


def test_identical_responses_are_judged_once(engines):
    table = rollout_table([" 17", " 17", " 17", " 3"], prompt="8+9=", reference="17", prompt_id="dup", id_prefix="dup")
    before = requests(engines)
    out, stats = label_with(engines, table, "pairwise")
    assert stats["judge_calls"] == 12 and stats["judge_cache_hits"] == 12 - 3  # texts: (17,17), (17,3), (3,17)
    assert requests(engines) - before == 3
    rows = out.to_pylist()
    assert all(r["label_valid"] for r in rows)
    assert rows[0]["pair_win_probs"][:2] == pytest.approx([0.5, 0.5], abs=1e-6)  # vs its two twins


def test_failed_judge_replies_are_not_cached(engines):
    """A judge prompt the engine rejects (too long) fails again on the next pass instead of being remembered."""
    table = rollout_table([" 5", " 5" * 4000], prompt="1+4=", reference="5", prompt_id="long", id_prefix="long")
    for _ in range(2):
        out, stats = label_with(engines, table, "pairwise")
        assert stats["failed_calls"] == 2 and stats["judge_cache_hits"] == 0
        assert not any(out.column("label_valid").to_pylist())


def test_cache_is_a_bounded_lru_that_keeps_only_usable_replies():
    from rlaif_ray.judge.cache import CachedJudge
    from rlaif_ray.judge.reply import JudgeReply

    class Backend:  # answers "good*" prompts with a label, "low*" with too little label mass
        def __init__(self):
            self.asked: list[str] = []

        def distribution(self, prompts, labels):
            self.asked += prompts
            return [JudgeReply(probs=[0.6, 0.4], mass=0.9 if p.startswith("good") else 0.01) for p in prompts]

    backend = Backend()
    judge = CachedJudge(backend, "j", size=2, min_label_mass=0.05)
    judge.distribution(["good1", "good2", "good1", "low"], ["1", "2"])
    assert backend.asked == ["good1", "good2", "low"] and judge.hits == 1
    judge.distribution(["good1", "low", "good3"], ["1", "2"])  # good1 from the cache; low asked again
    assert backend.asked[3:] == ["low", "good3"] and judge.hits == 2
    assert list(judge.replies) == [("j", "good1", ("labels", ("1", "2"))), ("j", "good3", ("labels", ("1", "2")))]
    judge.distribution(["good1"], [" 1", " 2"])  # another label set: another key
    assert backend.asked[-1] == "good1"

"""OpenAIJudge against a real OpenAI-compatible server backed by the toy critic (tests/openai_judge_server.py):
label distributions and greedy text must match transformers run directly on the same model; faults
(429/500/timeouts/garbage/no log-probs) are injected by the server and must never raise."""
from __future__ import annotations

import math
import time

import pytest

from rlaif_ray.config import RemoteJudgeConfig
from rlaif_ray.judge.remote import OpenAIJudge, RemoteJudgeError, label_probs
from rlaif_ray.judge.reply import JudgeReply, label_choices
from tests.openai_judge_server import JudgeServer

PAIRWISE = ["3+4=\nA1: 7\nA2: 5\nBetter:", "3+4=\nA1: 5\nA2: 7\nBetter:", "2+6=\nA1: 8\nA2: 9\nBetter:"]
DIRECT = ["3+4=\nA: 7\nScore:", "3+4=\nA: 2\nScore:"]
LABELS = [" 1", " 2"]
KEY = "sk-test-Zq8w1Secret"


@pytest.fixture(scope="module")
def server(toy_world):
    with JudgeServer(toy_world.critic) as srv:
        yield srv


@pytest.fixture(autouse=True)
def clean(request):
    yield
    if "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        srv.wait_idle()
        srv.reset()
        srv.api_key = None


@pytest.fixture(scope="module")
def reference(toy_world):
    """transformers, run directly on the critic: next-token probabilities and greedy continuations."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_world.critic)
    model = AutoModelForCausalLM.from_pretrained(toy_world.critic, dtype=torch.float32).eval()

    def label_dist(prompt: str, labels: list[str], top_k: int = 20) -> tuple[list[float], float]:
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([tok.encode(prompt)])).logits[0, -1], -1)
        assert all(len(tok.encode(label, add_special_tokens=False)) == 1 for label in labels)
        # the documented rule: every top-k token whose text is a label, or equals one label once whitespace is
        # stripped (" 1" and "1" both count for label " 1"), adds its probability to that label
        p = [0.0] * len(labels)
        for i in torch.topk(probs, top_k).indices.tolist():
            text = tok.decode([i])
            match = [k for k, label in enumerate(labels) if text == label or text.strip() == label.strip()]
            if match:
                p[match[0]] += float(probs[i])
        return [x / sum(p) for x in p], sum(p)

    def greedy(prompt: str, n: int) -> str:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return {"label_dist": label_dist, "greedy": greedy, "tokenizer": tok}


def judge(server, **kw) -> OpenAIJudge:
    cfg = dict(base_url=server.base_url, model="toy-critic", timeout_s=5.0, max_retries=3, backoff_s=0.01)
    return OpenAIJudge(RemoteJudgeConfig(**(cfg | kw)))


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_label_distribution_matches_transformers(server, reference, api):
    j = judge(server, api=api)
    for prompts, labels in ((PAIRWISE, LABELS), (DIRECT, label_choices("direct")[0])):
        for prompt, reply in zip(prompts, j.next_token_distribution(prompts, labels)):
            want, want_mass = reference["label_dist"](prompt, labels)
            assert reply.error is None and not reply.from_text and reply.attempts == 1
            assert reply.probs == pytest.approx(want, abs=1e-4)
            assert reply.mass == pytest.approx(want_mass, abs=1e-4)
            assert reply.prompt_tokens == len(reference["tokenizer"].encode(prompt)) and reply.completion_tokens == 1
    # the toy critic judges better than chance: it prefers the slot holding the right sum
    first, second = j.next_token_distribution(PAIRWISE[:2], LABELS)
    assert first.probs[0] > second.probs[0]
    assert j.usage()["requests"] == len(PAIRWISE) + len(DIRECT) + 2 and j.usage()["failures"] == 0
    j.close()


def test_label_probs_strip_and_no_double_count():
    # chat endpoints: "1" (no space) matches " 1"; both tokens count once each, for one label only
    probs, mass = label_probs({" 1": math.log(0.2), "1": math.log(0.3), " 2": math.log(0.1), "x": math.log(0.4)}, LABELS)
    assert mass == pytest.approx(0.6) and probs == pytest.approx([5 / 6, 1 / 6])
    # list form (chat): exact repeats are one entry; an ambiguous stripped match counts for no label
    top = [{"token": "2", "logprob": math.log(0.5)}, {"token": "2", "logprob": math.log(0.5)},
           {"token": " 1", "logprob": math.log(0.25)}]
    assert label_probs(top, LABELS)[1] == pytest.approx(0.75)
    assert label_probs(top, [" 2", "2 "])[1] == pytest.approx(0.0)
    assert label_probs({" 1": math.log(0.5)}, [" 1", " 10"])[0] == pytest.approx([1.0, 0.0])
    assert label_probs({"7": -0.1}, LABELS) == (None, 0.0)


def test_retry_on_429_then_success(server):
    j = judge(server)
    want = j.next_token_distribution(PAIRWISE[:1], LABELS)[0]
    server.faults = {"status": 429, "times": 2, "retry_after": 0}
    got = j.next_token_distribution(PAIRWISE[:1], LABELS)[0]
    assert got.error is None and got.attempts == 3 and got.probs == pytest.approx(want.probs)
    server.faults = {"status": 503, "times": 1, "retry_after": 0.3}  # a numeric Retry-After is honoured
    got = j.next_token_distribution(PAIRWISE[:1], LABELS)[0]
    assert got.error is None and got.attempts == 2 and got.latency_s >= 0.3
    assert j.usage()["retries"] == 3 and j.usage()["failures"] == 0


def test_permanent_500_fails_only_that_prompt(server):
    j = judge(server, max_retries=2, max_concurrency=2)
    server.faults = {"status": 500, "match": "POISON"}
    prompts = [PAIRWISE[0], "POISON" + PAIRWISE[1], PAIRWISE[2]]
    replies = j.next_token_distribution(prompts, LABELS)
    assert replies[1].error == "http_500" and replies[1].attempts == 3 and replies[1].probs is None
    assert all(r.error is None and r.attempts == 1 and r.mass > 0.5 for r in (replies[0], replies[2]))
    assert j.complete(["POISON"], 2)[0].error == "http_500"
    assert j.usage()["failures"] == 2 and j.usage()["retries"] == 4


def test_client_errors_are_not_retried(server):
    reply = judge(server, model="no-such-model").next_token_distribution(PAIRWISE[:1], LABELS)[0]
    assert reply.error == "http_404" and reply.attempts == 1 and "does not exist" in reply.detail


def test_timeout(server):
    server.faults = {"delay": 0.8}
    j = judge(server, timeout_s=0.2, max_retries=1)
    t0 = time.perf_counter()
    reply = j.next_token_distribution(PAIRWISE[:1], LABELS)[0]
    assert reply.error == "timeout" and reply.attempts == 2 and reply.probs is None
    assert time.perf_counter() - t0 < 0.75


def test_garbage_body(server):
    server.faults = {"garbage": True}
    j = judge(server)
    reply = j.next_token_distribution(PAIRWISE[:1], LABELS)[0]
    assert reply.error.startswith("bad_response") and reply.attempts == 1 and reply.mass == 0
    assert j.complete(["3+4="], 2)[0].error.startswith("bad_response")


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_no_logprobs_falls_back_to_text(server, api):
    j = judge(server, api=api)
    with_logprobs = j.next_token_distribution(PAIRWISE[:2], LABELS)
    server.faults = {"no_logprobs": True}
    replies = j.next_token_distribution(PAIRWISE[:2], LABELS)
    for lp, reply in zip(with_logprobs, replies):
        assert reply.error is None and reply.from_text and reply.mass == 1.0
        greedy = max(range(2), key=lambda k: lp.probs[k])  # the token the server sampled
        assert reply.text == LABELS[greedy] and reply.probs == [float(k == greedy) for k in range(2)]
    unmatched = j.next_token_distribution(PAIRWISE[:1], [" yes", " no"])[0]
    assert unmatched.error is None and unmatched.mass == 0 and unmatched.probs is None and not unmatched.from_text
    assert j.check()["logprobs"] is False


def test_api_key_sent_and_never_leaked(server, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    server.api_key = KEY
    j = judge(server, api_key_env="JUDGE_TEST_KEY", max_retries=0)
    assert j.check()["logprobs"] is True
    reply = j.next_token_distribution(PAIRWISE[:1], LABELS)[0]
    assert reply.error is None and server.headers_seen[-1]["Authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(j) and KEY not in str(j) and KEY not in repr(reply)
    # a wrong key: the server echoes what it got in its 401 body; the client must not pass it on
    server.api_key = "sk-the-right-one"
    bad = j.next_token_distribution(PAIRWISE[:1], LABELS)[0]
    assert bad.error == "http_401" and bad.attempts == 1 and KEY not in repr(bad) and "***" in bad.detail
    with pytest.raises(RemoteJudgeError) as exc:
        j.check()
    assert server.base_url in str(exc.value) and "http_401" in str(exc.value) and KEY not in str(exc.value)
    monkeypatch.delenv("JUDGE_TEST_KEY")
    with pytest.raises(RemoteJudgeError, match="JUDGE_TEST_KEY"):
        judge(server, api_key_env="JUDGE_TEST_KEY")


def test_check_unreachable_names_url():
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    j = OpenAIJudge(RemoteJudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, backoff_s=0.01))
    with pytest.raises(RemoteJudgeError, match=f"127.0.0.1:{port}.*connect_error"):
        j.check()
    assert isinstance(j.next_token_distribution(["x"], LABELS)[0], JudgeReply)  # never raises


def test_concurrency_is_bounded(server):
    server.delay_s = 0.05
    j = judge(server, max_concurrency=3)
    prompts = [f"{a}+{b}=\nA1: {a + b}\nA2: {a}\nBetter:" for a in range(4) for b in range(4)]
    replies = j.next_token_distribution(prompts, LABELS)
    assert all(r.error is None for r in replies) and len(replies) == 16
    assert 1 < server.max_in_flight <= 3


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_complete_is_greedy(server, reference, api):
    j = judge(server, api=api)
    prompts = ["3+4=", "2+6=\nA1: 8\nA2: 9\nThink:", PAIRWISE[0]]
    for prompt, reply in zip(prompts, j.complete(prompts, max_tokens=4)):
        assert reply.error is None and reply.text == reference["greedy"](prompt, 4)
    assert reference["greedy"]("3+4=", 4) == " 7"
    assert j.complete(["3+4="], max_tokens=4, stop=["7"])[0].text == " "  # `stop` reaches the server


# ---------------------------------------------------------------- the labeler with a remote judge, in a Ray actor
def remote_labeler(server, **remote):
    from rlaif_ray.stages.critic import CriticLabeler
    from tests.conftest import small_config
    cfg = small_config(critic={"remote": {"base_url": server.base_url, "model": "toy-critic", "max_retries": 1,
                                          "backoff_s": 0.01, "timeout_s": 5, **remote}})
    return CriticLabeler.options(num_cpus=0.5).remote("unused-local-path", cfg.model_dump())


def test_labeler_with_remote_judge_labels_and_counts_failures(server, ray_cluster):
    import ray

    from rlaif_ray.data import schemas
    from tests.test_actors import rollout_table
    labeler = remote_labeler(server)
    try:
        assert ray.get(labeler.ready.remote()) == "toy-critic"
        table, stats = ray.get(labeler.label.options(num_returns=2).remote(rollout_table([" 5", " 7", " 3"])))
        rows = schemas.validate(table, "labels").to_pylist()
        assert all(r["label_valid"] and r["judge_model"] == "toy-critic" for r in rows)
        assert stats["judge_calls"] == 6 and stats["failed_calls"] == 0
        # the endpoint fails every call: no label is made up, every row says why, the calls are counted (responses
        # not judged before: the labeler's cache would answer a pair it has seen)
        server.faults = {"status": 500, "times": 100}
        table, stats = ray.get(labeler.label.options(num_returns=2).remote(rollout_table([" 6", " 8"])))
        rows = table.to_pylist()
        assert not any(r["label_valid"] for r in rows) and {r["skip_reason"] for r in rows} == {"http_500"}
        assert stats["failed_calls"] == 2
        usage = ray.get(labeler.usage.remote())
        assert usage["failures"] >= 2 and usage["retries"] >= 2
    finally:
        ray.kill(labeler)


def test_api_key_reaches_the_labeler_but_not_the_clusters_actor_records(server, ray_cluster, monkeypatch):
    """The dashboard and `ray list actors --detail` show each actor's GCS record, runtime_env and its env_vars
    included: the key must travel another way (a `Secret` constructor argument, which the record does not hold)."""
    import ray
    from ray._private.state import state

    from rlaif_ray.stages.critic import new_labeler
    from tests.conftest import small_config
    from tests.test_actors import rollout_table

    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    server.api_key = KEY
    cfg = small_config(critic={"remote": {"base_url": server.base_url, "model": "toy-critic", "max_retries": 0,
                                          "timeout_s": 5, "api_key_env": "JUDGE_TEST_KEY"}})
    labeler = new_labeler("unused-local-path", cfg, num_cpus=0.5)
    try:
        table, stats = ray.get(labeler.label.options(num_returns=2).remote(rollout_table([" 5", " 7"])))
        assert stats["failed_calls"] == 0 and server.headers_seen[-1]["Authorization"] == f"Bearer {KEY}"
        accessor = state._connect_and_get_accessor()
        assert KEY.encode() not in accessor.get_actor_info(labeler._actor_id)
        # the control: what runtime_env carries is in the record (the way the key went before)
        holder = ray.remote(num_cpus=0)(type("Holder", (), {"ping": lambda self: 1})).options(
            runtime_env={"env_vars": {"JUDGE_TEST_KEY": KEY}}).remote()
        ray.get(holder.ping.remote())
        assert KEY.encode() in accessor.get_actor_info(holder._actor_id)
        ray.kill(holder)
    finally:
        ray.kill(labeler)


def test_unreachable_remote_judge_fails_at_start(ray_cluster, toy_world):
    import ray

    from rlaif_ray.stages.critic import CriticLabeler
    from tests.conftest import small_config
    cfg = small_config(critic={"remote": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "max_retries": 0,
                                          "timeout_s": 2}})
    labeler = CriticLabeler.options(num_cpus=0.5).remote("unused", cfg.model_dump())
    with pytest.raises(ray.exceptions.RayActorError, match="127.0.0.1:9"):
        ray.get(labeler.ready.remote())


def test_training_runs_through_judge_failures_and_stops_past_the_limit(server, ray_cluster, tmp_path):
    """The endpoint fails some judge calls: the run goes on, those samples are skipped with the HTTP reason.
    It fails every call: the run stops after the first step with a message naming the limit."""
    import json

    from rlaif_ray.runtime.driver import train
    from rlaif_ray.runtime.faults import RunStopped
    from tests.conftest import small_config

    def config(run, limit=0.5):
        return small_config(run, critic={"remote": {"base_url": server.base_url, "model": "toy-critic",
                                                    "max_retries": 0, "backoff_s": 0.01, "timeout_s": 5}},
                            fault={"judge_failure_limit": limit, "judge_failure_min_calls": 8},
                            loop={"num_steps": 3, "eval_samples": 0}, output={"save_checkpoint": False})

    server.faults = {"status": 503, "times": 3, "match": "Better:"}  # judge prompts only, not the start-up probe
    # 3 failed requests can answer up to 6 of the first batch's 8 judge prompts (identical prompts are asked once):
    # a limit of 75% lets this run go on whichever requests fail (at 50% it stopped when they hit repeated prompts)
    summary = train(config(tmp_path / "some", limit=0.75))
    ledger = [json.loads(line) for line in open(tmp_path / "some" / "run" / "samples.jsonl")]
    assert len(ledger) == len({r["sample_id"] for r in ledger}) == summary["generated"] == 3 * 8
    skipped = [r for r in ledger if r["outcome"] == "skipped"]
    assert 2 <= len(skipped) <= 6 and {r["reason"] for r in skipped} == {"http_503"}
    # 3 failed requests; identical judge prompts of a batch are asked once (critic.cache_size), and a failed reply
    # answers each of them
    assert 3 / 24 <= summary["judge_report"]["failed_share"] <= 6 / 24

    server.faults = {"status": 500, "match": "Better:"}  # every judge call, for good
    with pytest.raises(RunStopped, match=r"judge failed 8 of 8 calls.*fault.judge_failure_limit=50%"):
        train(config(tmp_path / "all"))
    run = tmp_path / "all" / "run"
    assert json.loads((run / "summary.json").read_text())["status"] == "stopped"
    ledger = [json.loads(line) for line in open(run / "samples.jsonl")]
    assert len(ledger) == 8 and all(r["outcome"] == "skipped" and r["reason"] == "http_500" for r in ledger)

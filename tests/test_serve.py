"""The serve section (docs/serving.md), literally: `rlaif-ray serve CHECKPOINT --detach` deploys a toy checkpoint with Ray
Serve on the local cluster (token auth on), the official `openai` client talks to it over HTTP on 127.0.0.1,
invalid requests get their 4xx without taking the replica down, and the same endpoint is the remote judge of
a short training run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from rlaif_ray.config import ConfigError, load_config
from rlaif_ray.serve.app import PLAIN_CHAT_TEMPLATE, resolve_chat_template
from tests.conftest import free_port, small_config

KEY_ENV, KEY = "RLAIF_SERVE_TEST_KEY", "sk-serve-test-0123456789"


@pytest.fixture(scope="module")
def served_judge(ray_cluster, toy_world):
    """The toy critic served as model 'judge' by the CLI, on the test session's cluster."""
    port = free_port()
    address = ray_cluster.get_runtime_context().gcs_address
    cli = Path(sys.executable).parent / "rlaif-ray"
    proc = subprocess.run([str(cli), "serve", "toy:critic", "--detach", f"ray.address={address}",
                           f"serve.port={port}", "serve.model_id=judge", f"serve.api_key_env={KEY_ENV}",
                           "serve.max_tokens=32"],
                          env={**os.environ, KEY_ENV: KEY}, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, f"rlaif-ray serve failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert KEY not in proc.stdout + proc.stderr  # the token is never printed
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "client": openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)}
    from ray import serve
    serve.shutdown()


def test_openai_client_completions_and_chat(served_judge):
    client = served_judge["client"]
    assert [m.id for m in client.models.list().data] == ["judge"]
    # the toy critic was taught plain arithmetic first: greedy answers are right
    for a, b in [(3, 4), (8, 9), (1, 1)]:
        out = client.completions.create(model="judge", prompt=f"{a}+{b}=", max_tokens=4, temperature=0, logprobs=5)
        choice = out.choices[0]
        assert choice.text.strip() == str(a + b), choice.text
        assert len(choice.logprobs.top_logprobs[0]) >= 5 and out.usage.completion_tokens >= 1
        # no chat template in the toy checkpoint: the plain one makes a user message the raw prompt
        chat = client.chat.completions.create(model="judge", messages=[{"role": "user", "content": f"{a}+{b}="}],
                                              max_tokens=4, temperature=0)
        assert chat.choices[0].message.content == choice.text
    health = httpx.get(f"{served_judge['url']}/health", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok", "models": ["judge"]}


def test_invalid_requests_get_4xx_and_the_replica_stays_up(served_judge):
    client, url = served_judge["client"], served_judge["url"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="judge", prompt="3+4=", max_tokens=4, temperature=3.5)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="judge", prompt="3+4=", max_tokens=33)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\].role"):
        client.chat.completions.create(model="judge", messages=[{"role": "wizard", "content": "3+4="}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="3+4=", max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    assert httpx.post(f"{url}/v1/completions", content=b'{"prompt": "3+4=", ', headers=auth).status_code == 400
    big = json.dumps({"model": "judge", "prompt": "1+1=" * 40000})
    assert httpx.post(f"{url}/v1/completions", content=big, headers=auth).status_code == 413
    assert httpx.post(f"{url}/v1/completions", json={"model": "judge", "prompt": "3+4="}).status_code == 401
    # still serving
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    assert client.completions.create(model="judge", prompt="2+2=", max_tokens=4, temperature=0).choices[0].text.strip() == "4"


def test_load_with_hostile_requests_mixed_in(served_judge):
    """A few hundred requests on 127.0.0.1, every 10th hostile: no errors, each hostile one its 4xx."""
    from rlaif_ray.serve.loadtest import run_load
    prompts = [f"{a}+{b}=" for a in range(10) for b in range(10)]
    out = run_load(f"{served_judge['url']}/v1", "judge", prompts, requests=300, concurrency=16, api_key=KEY)
    print("serve load:", json.dumps({k: v for k, v in out.items() if k != "first_errors"}))
    assert out["errors"] == 0, out["first_errors"]
    assert out["valid_ok"] == 270 and out["statuses"]["oversized:413"] > 0 and out["statuses"]["no_token:401"] > 0
    assert 0 < out["p50_ms"] <= out["p95_ms"] <= out["p99_ms"]
    assert httpx.get(f"{served_judge['url']}/health", timeout=30).status_code == 200


def test_served_model_is_the_remote_judge_of_a_training_run(served_judge, tmp_path, monkeypatch):
    from rlaif_ray.runtime.driver import train

    monkeypatch.setenv(KEY_ENV, KEY)  # the driver's start-up check; the labeler actor gets it forwarded
    cfg = small_config(tmp_path, critic={"remote": {"base_url": f"{served_judge['url']}/v1", "model": "judge",
                                                    "api_key_env": KEY_ENV}},
                       loop={"num_steps": 2, "eval_samples": 0}, output={"save_checkpoint": False})
    summary = train(cfg)
    report = summary["judge_report"]
    assert summary["trained"] > 0 and report["failed_share"] == 0 and report["unparsable_share"] == 0
    assert report["usage_requests"] == report["judge_calls"] - report["judge_cache_hits"] > 0  # hits are not sent
    assert report["usage_prompt_tokens"] > 0
    ledger = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert len(ledger) == summary["generated"] == 2 * 4 * 2


def test_chat_template_choice(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    assert resolve_chat_template(str(folder), "auto") == PLAIN_CHAT_TEMPLATE
    with pytest.raises(ConfigError, match="has no chat template"):
        resolve_chat_template(str(folder), "checkpoint")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    assert resolve_chat_template(str(folder), "auto") is None and resolve_chat_template(str(folder), "checkpoint") is None
    assert resolve_chat_template(str(folder), "{{ 'x' }}") == "{{ 'x' }}"
    with pytest.raises(ConfigError, match="no such template file"):
        resolve_chat_template(str(folder), "missing.jinja")


def test_serve_config_errors():
    with pytest.raises(ConfigError, match="min_replicas"):
        load_config(None, ["serve.min_replicas=3", "serve.max_replicas=2"])
    with pytest.raises(ConfigError, match="route_prefix"):
        load_config(None, ["serve.route_prefix=policy"])
    from rlaif_ray.cli import main
    assert main(["serve", "/no/such/checkpoint"]) == 2
    assert main(["serve", "toy:policy", "--detach"]) == 2  # an embedded cluster would end with the command

"""The request guard of `rlaif-ray serve`, over real HTTP requests into a small ASGI app (no Ray, no engine):
what reaches the route is exactly what the client sent, and every bad request gets its 4xx and the field."""
import json

import pytest
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from rlaif_ray.serve.guard import GuardLimits, RequestGuard, check_request, token_digest

LIMITS = GuardLimits(max_request_bytes=2048, max_tokens=64, max_n=4, max_prompts=3, max_messages=4)


def make_client(token: str | None = None, prefix: str = "/") -> TestClient:
    app = FastAPI()

    async def echo(request: Request):
        return {"received": json.loads(await request.body())}

    app.post("/v1/completions")(echo)
    app.post("/v1/chat/completions")(echo)
    app.get("/v1/models")(lambda: {"data": []})
    app.get("/health")(lambda: {"status": "ok"})
    app.add_middleware(RequestGuard, limits=LIMITS, token_sha256=token_digest(token) if token else None,
                       route_prefix=prefix)
    return TestClient(app)


@pytest.fixture(scope="module")
def client():
    return make_client()


def test_valid_requests_pass_through_unchanged(client):
    body = {"model": "policy", "prompt": ["3+4=", "1+1="], "max_tokens": 8, "temperature": 0.7, "logprobs": 5,
            "stop": ["\n"], "n": 2, "seed": 3}
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200 and resp.json()["received"] == body
    chat = {"model": "policy", "messages": [{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": [{"type": "text", "text": "3+4="}]}],
            "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 3, "stream": False}
    resp = client.post("/v1/chat/completions", json=chat)
    assert resp.status_code == 200 and resp.json()["received"] == chat
    assert client.post("/v1/completions", json={"prompt": [5, 7, 9]}).status_code == 200  # token ids


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 65}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 5}, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "model": 3}, "model"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b", "c", "d"]}, "prompt"),
    ("/v1/completions", {"prompt": ["a", 3]}, "prompt[1]"),
    ("/v1/completions", {"prompt": {"text": "a"}}, "prompt"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}] * 5}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "user"}]}, "messages[1].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ("/v1/chat/completions", {"messages": ["hi"]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 50}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": 5}, "logprobs"),
])
def test_bad_parameters_get_400_naming_the_field(client, route, body, param):
    resp = client.post(route, json=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["message"].startswith(param) and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_json_gets_400(client, raw):
    resp = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"


def test_oversized_body_gets_413_declared_or_streamed(client):
    big = {"prompt": "x" * 4096}
    resp = client.post("/v1/completions", json=big)
    assert resp.status_code == 413 and "limit is 2048" in resp.json()["error"]["message"]

    def chunks():  # no Content-Length: the guard counts what arrives and stops past the limit
        for _ in range(10):
            yield b"x" * 512
    resp = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413


def test_bearer_token_required_except_on_health():
    client = make_client(token="s3cret-token")
    assert client.get("/health").status_code == 200
    resp = client.get("/v1/models")
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert resp.json()["error"]["code"] == "missing_api_key"
    resp = client.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert resp.status_code == 401 and "s3cret" not in resp.text
    ok = {"Authorization": "Bearer s3cret-token"}
    assert client.get("/v1/models", headers=ok).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "x"}, headers=ok).status_code == 200
    # auth is checked before the body: an unauthenticated caller learns nothing about validation
    assert client.post("/v1/completions", json={"prompt": "x", "n": 99}).status_code == 401


def test_route_prefix_is_stripped_before_matching():
    client = make_client(prefix="/policy")
    assert client.post("/policy/v1/completions", json={"prompt": "x", "n": 99}).status_code == 400


def test_check_request_is_usable_alone():
    assert check_request("/v1/completions", b'{"prompt": "a"}', LIMITS) == {"prompt": "a"}
    with pytest.raises(Exception, match="temperature"):
        check_request("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "temperature": -1}',
                      LIMITS)

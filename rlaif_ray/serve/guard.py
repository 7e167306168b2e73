"""The request guard in front of the served policy: size, JSON, bearer token and parameter checks.

A plain ASGI middleware, so a bad request is answered before it reaches FastAPI's body parsing or the
vLLM engine: 413 for a body over `max_request_bytes`, 401 for a missing or wrong bearer token (when the
server has one), 400 for a body that is not a JSON object or a field out of range. Every answer is an
OpenAI-style error object (`{"error": {"message", "type", "param", "code"}}`) whose message names the field,
so the official `openai` client raises `BadRequestError` / `AuthenticationError` with a readable message.

The server never holds the token itself: it is given the token's SHA-256 and compares digests
(`hmac.compare_digest`), so the secret does not travel through Ray's object store or deployment config.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import dataclass

GUARDED_ROUTES = ("/v1/completions", "/v1/chat/completions")
OPEN_ROUTES = ("/health", "/-/healthz", "/-/routes")  # answered without a token (load balancers, probes)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class GuardLimits:
    max_request_bytes: int = 65536
    max_tokens: int = 256           # the most tokens one request may ask for
    max_n: int = 8                  # completions per prompt
    max_prompts: int = 32           # prompts in one /v1/completions batch
    max_messages: int = 64          # messages in one chat request


class RequestRejected(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_parameter"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> bytes:
        kind = {401: "authentication_error", 413: "request_too_large"}.get(self.status, "invalid_request_error")
        return json.dumps({"error": {"message": self.message, "type": kind, "param": self.param,
                                     "code": self.code}}).encode()


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ------------------------------------------------------------------------------------------ field checks
def _reject(param: str, message: str) -> RequestRejected:
    return RequestRejected(400, f"{param}: {message}", param)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _int_in(body: dict, key: str, low: int, high: int) -> None:
    if key in body and body[key] is not None:
        value = body[key]
        if not _is_int(value) or not low <= value <= high:
            raise _reject(key, f"must be an integer from {low} to {high}, got {value!r}")


def _number_in(body: dict, key: str, low: float, high: float, low_open: bool = False) -> None:
    if key in body and body[key] is not None:
        value = body[key]
        bad = not _is_number(value) or value > high or (value <= low if low_open else value < low)
        if bad:
            bound = f"above {low}" if low_open else f"from {low}"
            raise _reject(key, f"must be a number {bound} to {high}, got {value!r}")


def _check_sampling(body: dict, limits: GuardLimits) -> None:
    _int_in(body, "max_tokens", 1, limits.max_tokens)
    _int_in(body, "max_completion_tokens", 1, limits.max_tokens)
    _int_in(body, "n", 1, limits.max_n)
    _number_in(body, "temperature", 0.0, 2.0)
    _number_in(body, "top_p", 0.0, 1.0, low_open=True)
    _number_in(body, "presence_penalty", -2.0, 2.0)
    _number_in(body, "frequency_penalty", -2.0, 2.0)
    if "seed" in body and body["seed"] is not None and not _is_int(body["seed"]):
        raise _reject("seed", f"must be an integer, got {body['seed']!r}")
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise _reject("stream", f"must be true or false, got {body['stream']!r}")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise _reject("stop", "must be a non-empty string or a list of at most 4 of them")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _reject("model", f"must be a string, got {model!r}")


def _check_completion(body: dict, limits: GuardLimits) -> None:
    prompt = body.get("prompt")
    if prompt is None:
        raise _reject("prompt", "is required")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        prompts = [prompt]  # one prompt as token ids
    elif isinstance(prompt, list):
        prompts = prompt
    else:
        raise _reject("prompt", f"must be a string or a list of strings, got {type(prompt).__name__}")
    if not 1 <= len(prompts) <= limits.max_prompts:
        raise _reject("prompt", f"must hold 1 to {limits.max_prompts} prompts, got {len(prompts)}")
    for i, p in enumerate(prompts):
        ok = (isinstance(p, str) and p != "") or (isinstance(p, list) and p and all(_is_int(t) and t >= 0 for t in p))
        if not ok:
            raise _reject(f"prompt[{i}]" if len(prompts) > 1 else "prompt",
                          "must be a non-empty string (or a list of token ids)")
    _int_in(body, "logprobs", 0, MAX_LOGPROBS)
    if "echo" in body and body["echo"] is not None and not isinstance(body["echo"], bool):
        raise _reject("echo", f"must be true or false, got {body['echo']!r}")


def _check_chat(body: dict, limits: GuardLimits) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _reject("messages", "is required: a non-empty list of {role, content} objects")
    if len(messages) > limits.max_messages:
        raise _reject("messages", f"holds {len(messages)} messages, at most {limits.max_messages} are allowed")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _reject(where, f"must be an object with role and content, got {type(msg).__name__}")
        if msg.get("role") not in CHAT_ROLES:
            raise _reject(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {msg.get('role')!r}")
        content = msg.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise _reject(f"{where}.content[{j}]", "must be a {\"type\": \"text\", \"text\": ...} part")
        elif not isinstance(content, str) and not (content is None and msg.get("role") == "assistant"):
            raise _reject(f"{where}.content", f"must be a string or a list of text parts, got {content!r}")
    if "logprobs" in body and body["logprobs"] is not None and not isinstance(body["logprobs"], bool):
        raise _reject("logprobs", f"must be true or false in a chat request, got {body['logprobs']!r}")
    _int_in(body, "top_logprobs", 0, MAX_LOGPROBS)


def check_request(path: str, raw: bytes, limits: GuardLimits) -> dict:
    """The parsed body of a request to one of GUARDED_ROUTES, or RequestRejected naming what is wrong."""
    if len(raw) > limits.max_request_bytes:
        raise RequestRejected(413, f"request body is {len(raw)} bytes, the limit is {limits.max_request_bytes}",
                              code="request_too_large")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestRejected(400, f"request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestRejected(400, f"request body must be a JSON object, got {type(body).__name__}",
                              code="invalid_json")
    _check_sampling(body, limits)
    (_check_chat if path.endswith("/chat/completions") else _check_completion)(body, limits)
    return body


# ------------------------------------------------------------------------------------------ the middleware
class RequestGuard:
    """ASGI middleware: `app.add_middleware(RequestGuard, limits=..., token_sha256=...)`."""

    def __init__(self, app, limits: GuardLimits = GuardLimits(), token_sha256: str | None = None,
                 route_prefix: str = "/"):
        self.app, self.limits, self.token_sha256 = app, limits, token_sha256
        self.prefix = route_prefix.rstrip("/")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.prefix and path.startswith(self.prefix):
            path = path[len(self.prefix):] or "/"
        try:
            if self.token_sha256 and path not in OPEN_ROUTES:
                self._authorize(scope)
            if scope["method"] == "POST" and path in GUARDED_ROUTES:
                raw = await self._read_body(scope, receive)
                check_request(path, raw, self.limits)
                receive = _replay(raw, receive)
        except RequestRejected as err:
            return await _answer(send, err)
        return await self.app(scope, receive, send)

    def _authorize(self, scope) -> None:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RequestRejected(401, "missing bearer token: send 'Authorization: Bearer <key>'",
                                  code="missing_api_key")
        if not hmac.compare_digest(token_digest(token.strip()), self.token_sha256):
            raise RequestRejected(401, "invalid API key", code="invalid_api_key")

    async def _read_body(self, scope, receive) -> bytes:
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_request_bytes:
            raise RequestRejected(413, f"request body is {int(declared)} bytes, the limit is "
                                  f"{self.limits.max_request_bytes}", code="request_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_request_bytes:  # chunked upload past the limit: stop reading
                raise RequestRejected(413, f"request body exceeds the limit of {self.limits.max_request_bytes} "
                                      "bytes", code="request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(raw: bytes, receive):
    """The body once, then the client's own messages (a streaming response listens for its disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()
    return replay


async def _answer(send, err: RequestRejected) -> None:
    body = err.body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

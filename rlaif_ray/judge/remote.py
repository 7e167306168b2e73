"""OpenAIJudge: any OpenAI-compatible endpoint (vLLM serve, OpenAI, a gateway) as the AI judge.

`next_token_distribution` asks for one greedy token with its top log-probs and reads the label strings'
probabilities from them (renormalised over the labels, plus their total mass, like `rlaif_ray.judge.reply.label_distribution`);
an endpoint that returns no log-probs has its reply text parsed instead (`from_text=True`). `complete` gives
greedy text (rationales, self-answers, critiques).

Requests run on a thread pool of `max_concurrency` over one shared `httpx.Client`. 429, 5xx, timeouts and
connection errors are retried with exponential backoff (a numeric `Retry-After` is honoured, capped); other
4xx are not. A request that still fails yields a `JudgeReply` with `error` set -- a batch never raises for
one bad reply; the caller counts them. The API key (from the env var named by `api_key_env`) only ever
lives in the client's headers: never in repr(), logs, errors or replies.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from rlaif_ray.config import RemoteJudgeConfig
from rlaif_ray.judge.reply import JudgeReply

log = logging.getLogger(__name__)
RETRY_AFTER_CAP_S = 30.0
RETRY_STATUS = {429} | set(range(500, 600))


class RemoteJudgeError(RuntimeError):
    """The remote judge is misconfigured or unusable (missing key variable, failed start-up check)."""


def _entries(top) -> list[tuple[str, float]]:
    """Top log-probs as (token, logprob): completions give {token: lp}, chat [{token, logprob, bytes}]."""
    if isinstance(top, dict):
        items = list(top.items())
    elif isinstance(top, list):
        items = [(e.get("token"), e.get("logprob")) for e in top if isinstance(e, dict)]
    else:
        raise ValueError(f"top_logprobs is a {type(top).__name__}")
    return [(t, float(lp)) for t, lp in dict.fromkeys(items)  # drop exact repeats, keep order
            if isinstance(t, str) and isinstance(lp, (int, float)) and not math.isnan(lp)]


def label_probs(top, labels: list[str]) -> tuple[list[float] | None, float]:
    """Each returned token counts once, for at most one label: its exact string, else the one label that is
    equal after stripping whitespace (chat replies often lack the label's leading space)."""
    stripped = [label.strip() for label in labels]
    probs = [0.0] * len(labels)
    for token, logprob in _entries(top):
        if token in labels:
            k = labels.index(token)
        elif stripped.count(token.strip()) == 1:
            k = stripped.index(token.strip())
        else:
            continue
        probs[k] += math.exp(logprob)
    mass = sum(probs)
    return ([p / mass for p in probs] if mass > 0 else None), mass


@dataclass
class Posted:
    """What `post_with_retries` got: the 2xx response, or the last attempt's error ("timeout", "connect_error",
    "http_<status>") and its detail (the transport error's class, or the whole body: redact and cut it yourself)."""
    response: httpx.Response | None
    error: str | None
    detail: str | None
    attempts: int


def post_with_retries(client: httpx.Client, url: str, body: dict, max_retries: int, backoff_s: float) -> Posted:
    """POST `body` as JSON; 429, 5xx, timeouts and connection errors are retried up to `max_retries` times, waiting
    `backoff_s` doubled each time (a numeric Retry-After instead, capped); other answers are final. Shared by the remote
    judge and HTTP reward services (rlaif_ray.stages.reward_functions)."""
    error = detail = None
    for attempt in range(max_retries + 1):
        wait = backoff_s * 2 ** attempt
        try:
            resp = client.post(url, json=body)
        except httpx.TimeoutException:
            error = "timeout"
        except httpx.TransportError as e:  # refused, reset, DNS ...
            error, detail = "connect_error", type(e).__name__
        else:
            if 200 <= resp.status_code < 300:
                return Posted(resp, None, None, attempt + 1)
            error, detail = f"http_{resp.status_code}", resp.text
            if resp.status_code not in RETRY_STATUS:
                return Posted(None, error, detail, attempt + 1)
            try:
                wait = min(float(resp.headers.get("retry-after", "")), RETRY_AFTER_CAP_S)
            except ValueError:
                pass  # absent or an HTTP date: keep the exponential backoff
        if attempt < max_retries:
            log.debug("POST %s: %s, retry %d in %.2fs", url, error, attempt + 1, wait)
            time.sleep(max(0.0, wait))
    return Posted(None, error, detail, max_retries + 1)


class Secret:
    """An API key on its way to the actors that use it, as a constructor argument: Ray shows an actor's
    runtime_env (its env_vars included) to anyone who can read the dashboard or `ray list actors --detail`, but not
    its arguments; and this wrapper never prints its value."""
    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self):  # pickled into the actor's creation task only
        return (Secret, (self.value,))


def read_secret(cfg: RemoteJudgeConfig) -> Secret | None:
    """The remote judge's key from the variable `api_key_env` names, where the driver runs; None without one."""
    if cfg.base_url and cfg.api_key_env and os.environ.get(cfg.api_key_env):
        return Secret(os.environ[cfg.api_key_env])
    return None


class OpenAIJudge:
    def __init__(self, cfg: RemoteJudgeConfig, secret: Secret | None = None):
        if not cfg.base_url:
            raise RemoteJudgeError("remote judge: critic.remote.base_url is not set")
        self.cfg = cfg
        self.base_url = cfg.base_url.rstrip("/")
        self.url = self.base_url + ("/chat/completions" if cfg.api == "chat" else "/completions")
        headers = {"Content-Type": "application/json"}
        self._secret: str | None = None
        if cfg.api_key_env:
            secret = secret or read_secret(cfg)  # the driver's (and tools') judge reads it here
            self._secret = secret.value if secret is not None else None
            if self._secret is None:
                raise RemoteJudgeError(f"remote judge: environment variable {cfg.api_key_env} "
                                       "(critic.remote.api_key_env) is not set or empty")
            headers["Authorization"] = f"Bearer {self._secret}"
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(cfg.timeout_s),
                                  limits=httpx.Limits(max_connections=cfg.max_concurrency,
                                                      max_keepalive_connections=cfg.max_concurrency))
        self._pool = ThreadPoolExecutor(cfg.max_concurrency, thread_name_prefix="remote-judge")
        self._lock = threading.Lock()
        self._usage = dict(requests=0, retries=0, failures=0, prompt_tokens=0, completion_tokens=0, seconds=0.0)

    def __repr__(self) -> str:
        key = f", api_key_env={self.cfg.api_key_env!r}" if self.cfg.api_key_env else ""
        return f"OpenAIJudge(url={self.url!r}, model={self.cfg.model!r}, api={self.cfg.api!r}{key})"

    # ---------------------------------------------------------------- public API
    def next_token_distribution(self, prompts: list[str], labels: list[str]) -> list[JudgeReply]:
        """One greedy token per prompt; the labels' probabilities from its top log-probs (or the reply text)."""
        labels = list(labels)
        return self._batch(prompts, lambda p: self._payload(p, 1, None, logprobs=True),
                           lambda reply, data: self._read_labels(reply, data, labels))

    distribution = next_token_distribution  # the name the labeler calls on every judge backend

    def complete(self, prompts: list[str], max_tokens: int, stop: list[str] | None = None) -> list[JudgeReply]:
        """Greedy text continuations."""
        return self._batch(prompts, lambda p: self._payload(p, max_tokens, stop, logprobs=False), None)

    def check(self) -> dict:
        """Start-up probe: one tiny request. Raises RemoteJudgeError naming the URL if it fails; returns
        whether the endpoint sends log-probs (if not, labels will be parsed from the reply text)."""
        seen: dict = {}
        reply = self._one(self._payload("Hi", 1, None, logprobs=True),
                          lambda r, choice: seen.update(logprobs=bool(choice.get("logprobs"))))
        if reply.error:
            detail = f" ({reply.detail})" if reply.detail else ""
            raise RemoteJudgeError(f"remote judge at {self.url} (model {self.cfg.model!r}) failed the start-up "
                                   f"check after {reply.attempts} attempt(s): {reply.error}{detail}")
        return {"url": self.url, "model": self.cfg.model, "latency_s": reply.latency_s, **seen}

    def usage(self) -> dict:
        """Totals: requests (one per prompt), retries (extra attempts), failures (replies with an error),
        prompt/completion tokens, seconds (wall time spent in batch calls)."""
        with self._lock:
            return dict(self._usage)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- internals
    def _payload(self, prompt: str, max_tokens: int, stop, logprobs: bool) -> dict:
        body: dict = {"model": self.cfg.model, "max_tokens": max_tokens, "temperature": 0.0}
        if self.cfg.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
            if logprobs:
                body.update(logprobs=True, top_logprobs=self.cfg.top_logprobs)
        else:
            body["prompt"] = prompt
            if logprobs:
                body["logprobs"] = self.cfg.top_logprobs
        if stop:
            body["stop"] = list(stop)
        return body

    def _batch(self, prompts, payload_fn, read_fn) -> list[JudgeReply]:
        t0 = time.perf_counter()
        replies = list(self._pool.map(lambda p: self._one(payload_fn(p), read_fn), prompts))
        with self._lock:
            u = self._usage
            u["requests"] += len(replies)
            u["retries"] += sum(max(0, r.attempts - 1) for r in replies)
            u["failures"] += sum(r.error is not None for r in replies)
            u["prompt_tokens"] += sum(r.prompt_tokens for r in replies)
            u["completion_tokens"] += sum(r.completion_tokens for r in replies)
            u["seconds"] += time.perf_counter() - t0
        return replies

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _one(self, body: dict, read_fn) -> JudgeReply:
        reply, t0 = JudgeReply(), time.perf_counter()
        posted = post_with_retries(self._http, self.url, body, self.cfg.max_retries, self.cfg.backoff_s)
        reply.attempts = posted.attempts
        if posted.response is not None:
            self._parse(reply, posted.response, read_fn)
        else:
            reply.error, reply.detail = posted.error, self._redact(posted.detail or "")[:200]
        reply.detail = reply.detail or ""
        reply.latency_s = time.perf_counter() - t0
        return reply

    def _parse(self, reply: JudgeReply, resp: httpx.Response, read_fn) -> None:
        try:
            data = resp.json()
            choice = data["choices"][0]
            if self.cfg.api == "chat":
                reply.text = choice["message"].get("content") or ""
            else:
                reply.text = choice["text"] or ""
            reply.finish_reason = choice.get("finish_reason")
            usage = data.get("usage") or {}
            reply.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            reply.completion_tokens = int(usage.get("completion_tokens") or 0)
            if read_fn is not None:
                read_fn(reply, choice)
        except Exception as e:  # non-JSON, wrong shape: a failed reply, not a failed batch
            reply.probs, reply.mass, reply.from_text = None, 0.0, False
            reply.error = f"bad_response: {type(e).__name__}: {self._redact(str(e))[:120]}"

    def _read_labels(self, reply: JudgeReply, choice: dict, labels: list[str]) -> None:
        lp = choice.get("logprobs") or {}
        if self.cfg.api == "chat":
            content = lp.get("content") or []
            top = content[0].get("top_logprobs") if content else None
        else:
            tops = lp.get("top_logprobs") or []
            top = tops[0] if tops else None
        if top:
            reply.probs, reply.mass = label_probs(top, labels)
            return
        stripped = [label.strip() for label in labels]  # no log-probs: parse the text
        if stripped.count(reply.text.strip()) == 1:
            k = stripped.index(reply.text.strip())
            reply.probs, reply.mass, reply.from_text = [float(i == k) for i in range(len(labels))], 1.0, True

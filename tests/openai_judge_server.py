"""A small OpenAI-compatible server for tests, backed by a real Hugging Face causal LM (the toy critic).

Routes: POST /v1/completions, POST /v1/chat/completions (the user message is the raw prompt, no chat
template), GET /v1/models. Log-probs and greedy continuations are computed with transformers, in the
shapes vLLM's OpenAI server uses: completions `top_logprobs` is a list of {token: logprob} per position,
chat `logprobs.content` is a list of {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}.

Only faults are made up, settable at run time:
    server.faults = {"status": 429, "times": 2, "retry_after": 0}   # answer 429 twice, then normally
    server.faults = {"delay": 2.0}          # sleep before answering (client timeouts)
    server.faults = {"garbage": True}       # a 200 with a non-JSON body
    server.faults = {"no_logprobs": True}   # text only, `logprobs: null`
Without "times" a fault lasts until `server.faults = {}`; with "match": "text" it hits only requests whose
body contains that text. `server.delay_s` adds a delay to every request;
`server.max_in_flight` is the most requests seen at once; `server.headers_seen` the request headers.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class JudgeServer:
    def __init__(self, model_path: str, model_name: str = "toy-critic", api_key: str | None = None):
        self.model_name, self.api_key = model_name, api_key
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.faults: dict = {}
        self.delay_s = 0.0
        self.headers_seen: list[dict] = []
        self.in_flight = self.max_in_flight = self.requests = 0
        self._lock, self._model_lock = threading.Lock(), threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "JudgeServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="judge-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait for requests still being served (e.g. delayed ones whose client timed out) to finish."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)

    def reset(self) -> None:
        with self._lock:
            self.faults, self.delay_s, self.headers_seen = {}, 0.0, []
            self.max_in_flight = self.requests = 0

    def _take_fault(self, raw: bytes) -> dict:
        with self._lock:
            fault = dict(self.faults)
            if "match" in fault and fault["match"].encode() not in raw:
                return {}
            if "times" in fault:
                if fault["times"] <= 0:
                    return {}
                self.faults["times"] -= 1
            return fault

    # ---------------------------------------------------------------- the model
    def _top(self, logprobs: torch.Tensor, k: int) -> list[tuple[str, float]]:
        values, ids = torch.topk(logprobs, k)
        return [(self.tokenizer.decode([i]), float(v)) for i, v in zip(ids.tolist(), values.tolist())]

    def generate(self, prompt: str, max_tokens: int, stop: list[str], top_k: int | None):
        """Greedy decode; returns (text, per-step (token, logprob, top list) or None, prompt/completion tokens)."""
        ids = self.tokenizer.encode(prompt)  # with BOS, as vLLM tokenizes a prompt
        n_prompt, steps, out = len(ids), [], []
        with self._model_lock, torch.no_grad():
            for _ in range(max_tokens):
                logits = self.model(torch.tensor([ids])).logits[0, -1].float()
                logprobs = torch.log_softmax(logits, -1)
                tok = int(torch.argmax(logprobs))
                if top_k is not None:
                    steps.append((self.tokenizer.decode([tok]), float(logprobs[tok]), self._top(logprobs, top_k)))
                out.append(tok)
                ids.append(tok)
                if tok == self.tokenizer.eos_token_id:
                    break
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        for s in stop or []:
            if s and s in text:
                text = text[:text.index(s)]
        return text, steps, n_prompt, len(out)

    def answer(self, path: str, body: dict, fault: dict) -> tuple[int, dict]:
        if body.get("model") != self.model_name:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist.", "code": 404}}
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        chat = path.endswith("/chat/completions")
        if chat:
            prompt = body["messages"][-1]["content"]
            top_k = body.get("top_logprobs") or 0 if body.get("logprobs") else None
        else:
            prompt, top_k = body["prompt"], body.get("logprobs")
        if fault.get("no_logprobs"):
            top_k = None
        max_tokens = int(body.get("max_tokens") or 16)
        text, steps, n_prompt, n_out = self.generate(prompt, max_tokens, stop, top_k)
        if top_k is None:
            logprobs = None
        elif chat:
            logprobs = {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                                     "top_logprobs": [{"token": a, "logprob": b, "bytes": list(a.encode())}
                                                      for a, b in top]} for t, lp, top in steps]}
        else:
            logprobs = {"tokens": [t for t, _, _ in steps], "token_logprobs": [lp for _, lp, _ in steps],
                        "top_logprobs": [dict(top) | {t: lp} for t, lp, top in steps], "text_offset": []}
        choice = {"index": 0, "logprobs": logprobs, "finish_reason": "length" if n_out >= max_tokens else "stop"}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return 200, {"id": f"cmpl-{self.requests}", "object": "chat.completion" if chat else "text_completion",
                     "created": int(time.time()), "model": self.model_name, "choices": [choice],
                     "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                               "total_tokens": n_prompt + n_out}}


def _make_handler(server: JudgeServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 10  # idle keep-alive connections close after this

        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, payload, headers: dict | None = None) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, str(v))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                self.close_connection = True

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": server.model_name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with server._lock:
                server.headers_seen.append(dict(self.headers))
                server.requests += 1
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                self._post(raw)
            finally:
                with server._lock:
                    server.in_flight -= 1

        def _post(self, raw: bytes):
            if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                # echoes what it got, like a careless gateway: the client must redact its key
                got = self.headers.get("Authorization")
                return self._send(401, {"error": {"message": f"Incorrect API key: {got}", "code": 401}})
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            fault = server._take_fault(raw)
            time.sleep(server.delay_s + fault.get("delay", 0.0))
            if "status" in fault:
                headers = {"Retry-After": fault["retry_after"]} if "retry_after" in fault else {}
                return self._send(fault["status"], {"error": {"message": "injected fault"}}, headers)
            if fault.get("garbage"):
                return self._send(200, b"<html>502 Bad Gateway</html>")
            try:
                body = json.loads(raw)
            except ValueError:
                return self._send(400, {"error": {"message": "body is not JSON"}})
            self._send(*server.answer(self.path, body, fault))

    return Handler

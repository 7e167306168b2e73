"""A bounded load test of a served endpoint: valid completions mixed with hostile requests, latency percentiles.

`run_load` sends `requests` requests from `concurrency` threads to one base URL (loopback in the tests and
`jobs/serve_load.py`), every `hostile_every`-th one hostile, rotating through an oversized body, malformed
JSON, an out-of-range parameter and a missing token. It counts the answers by status and checks each kind got
what it should: 200 for valid requests, its own 4xx for hostile ones; anything else (a 5xx, a dropped
connection, a 4xx for a valid request) is an error. Latency percentiles are over the valid requests.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np


def _hostile(kind: int, model: str, max_bytes: int) -> tuple[str, bytes, int, bool]:
    """(name, body, expected status, send the token?)"""
    return [
        ("oversized", json.dumps({"model": model, "prompt": "1+1=" * (max_bytes // 4 + 1)}).encode(), 413, True),
        ("malformed_json", b'{"model": "' + model.encode() + b'", "prompt": ', 400, True),
        ("bad_temperature", json.dumps({"model": model, "prompt": "1+1=", "temperature": 9}).encode(), 400, True),
        ("no_token", json.dumps({"model": model, "prompt": "1+1=", "max_tokens": 2}).encode(), 401, False),
    ][kind % 4]


def run_load(base_url: str, model: str, prompts: list[str], requests: int = 300, concurrency: int = 16,
             api_key: str | None = None, hostile_every: int = 10, max_tokens: int = 4,
             max_request_bytes: int = 65536, timeout_s: float = 60.0) -> dict:
    url = base_url.rstrip("/") + "/completions"
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    statuses: Counter = Counter()
    errors: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()
    client = httpx.Client(timeout=timeout_s, limits=httpx.Limits(max_connections=concurrency))

    def one(i: int) -> None:
        if hostile_every and i % hostile_every == hostile_every - 1:
            name, body, expected, with_token = _hostile(i // hostile_every, model, max_request_bytes)
            if not api_key and name == "no_token":
                name, body, expected, with_token = _hostile(0, model, max_request_bytes)
        else:
            name, expected, with_token = "valid", 200, True
            body = json.dumps({"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                               "temperature": 0.0}).encode()
        headers = {"Content-Type": "application/json", **(auth if with_token else {})}
        t0 = time.perf_counter()
        try:
            resp = client.post(url, content=body, headers=headers)
            status = resp.status_code
            ok = status == expected and (status != 200 or resp.json()["choices"][0]["text"] is not None)
        except (httpx.HTTPError, ValueError, KeyError) as err:
            status, ok = type(err).__name__, False
        seconds = time.perf_counter() - t0
        with lock:
            statuses[f"{name}:{status}"] += 1
            if not ok:
                errors.append(f"request {i} ({name}): got {status}, expected {expected}")
            elif name == "valid":
                latencies.append(seconds)

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
    finally:
        client.close()
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000.0
    pct = {f"p{q}_ms": float(np.percentile(lat, q)) for q in (50, 90, 95, 99)} if len(lat) else {}
    return {"requests": requests, "concurrency": concurrency, "wall_s": wall, "requests_per_s": requests / wall,
            "valid_ok": len(latencies), "errors": len(errors), "first_errors": errors[:5],
            "statuses": dict(sorted(statuses.items())), **pct,
            "max_ms": float(lat.max()) if len(lat) else None}

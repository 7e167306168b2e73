"""Rewards of the user's own beside the judge's (`reward.functions`), called on whole batches in the reward actor.

Each entry is a Python function (`function: module:function` or `path/to/file.py:function`, found and shipped as
`rlaif_ray.user_code` says) or an HTTP reward service (`url`), with a `weight`:

    def my_reward(prompts: list[str], responses: list[str], references: list[str | None]) -> list[float | None]

A service gets `POST url` with the JSON `{"prompts": [...], "responses": [...], "references": [...]}` and answers
`{"rewards": [...]}`; 429, 5xx, timeouts and connection errors are retried with exponential backoff up to
`max_retries` times (the remote judge's own retry, Retry-After honoured), then the run stops naming the service. A `None` reward means "no
opinion on this sample": it adds nothing to the total.

The sample's reward is the reward kind's own (the judge's win rate or score, a reward model's score, the checker's
+1/-1; nothing with `reward.kind=none`) plus the weighted sum of the components. A sample whose kind-reward is null (no
valid judge label) stays null: it is skipped, as without functions. Each component's batch mean is logged on its own
(`reward_<name>` in metrics.jsonl, with `reward_<kind>` for the kind's part).

A function that raises, returns the wrong number of values or a value that is not a finite number stops the run with
a `RewardFunctionError` naming the entry and the sample (its id and the start of its prompt).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlparse

import pyarrow as pa


class RewardFunctionError(RuntimeError):
    """A reward function or service failed or answered something that is not one number per sample."""


@dataclass
class RewardComponent:
    name: str
    weight: float
    where: str                      # "reward.functions[i] (name)": how errors name the entry
    call: Callable[[list, list, list], list]


def _sample(ids: list[str], prompts: list[str], i: int) -> str:
    prompt = prompts[i] if len(prompts[i]) <= 60 else prompts[i][:57] + "..."
    return f"sample {ids[i]} (prompt {prompt!r})"


def _number(value, component: RewardComponent, ids, prompts, i) -> float | None:
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if isinstance(value, bool) or not math.isfinite(x):
        raise RewardFunctionError(f"{component.where} gave {value!r} for {_sample(ids, prompts, i)}: a reward must "
                                  "be a finite number (or None: no opinion)")
    return x


class HttpReward:
    """An HTTP reward service: one POST per batch, retried like the remote judge's requests
    (`rlaif_ray.judge.remote.post_with_retries`: 429, 5xx, timeouts and connection errors, Retry-After honoured)."""

    BACKOFF_S = 0.5  # the first retry's wait; doubles each retry

    def __init__(self, url: str, timeout_s: float, max_retries: int, where: str):
        import httpx
        self.url, self.max_retries, self.where = url, max_retries, where
        self.client = httpx.Client(timeout=timeout_s)

    def __call__(self, prompts: list, responses: list, references: list) -> list:
        from rlaif_ray.judge.remote import RETRY_STATUS, post_with_retries
        payload = {"prompts": prompts, "responses": responses, "references": references}
        posted = post_with_retries(self.client, self.url, payload, self.max_retries, self.BACKOFF_S)
        if posted.response is None:
            status = int(posted.error[5:]) if posted.error.startswith("http_") else None
            if status is not None and status not in RETRY_STATUS:
                raise RewardFunctionError(f"{self.where}: {self.url} answered HTTP {status}: {posted.detail[:200]}")
            raise RewardFunctionError(f"{self.where}: {self.url} failed {posted.attempts} times; last: "
                                      f"{posted.error} {(posted.detail or '')[:200]}".rstrip())
        try:
            return posted.response.json()["rewards"]
        except (ValueError, KeyError, TypeError):
            raise RewardFunctionError(f"{self.where}: {self.url} did not answer JSON with a 'rewards' list: "
                                      f"{posted.response.text[:200]!r}") from None


def make_components(entries: list[dict]) -> list[RewardComponent]:
    """The configured entries (`reward.functions`, as dicts), loaded: functions imported, services given a client."""
    from rlaif_ray.user_code import load_callable
    out = []
    for i, e in enumerate(entries):
        if e.get("function"):
            fn = load_callable(e["function"], f"reward.functions[{i}].function")
            name = e.get("name") or getattr(fn, "__name__", f"function_{i}")
            out.append(RewardComponent(name, e["weight"], f"reward.functions[{i}] ({name})", fn))
        else:
            name = e.get("name") or (urlparse(e["url"]).hostname or f"service_{i}").replace(".", "_")
            where = f"reward.functions[{i}] ({name})"
            out.append(RewardComponent(name, e["weight"], where,
                                       HttpReward(e["url"], e["timeout_s"], e["max_retries"], where)))
    return out


def component_rewards(components: list[RewardComponent], table: pa.Table) -> tuple[list[float], dict[str, float]]:
    """Per row, the weighted sum of the components; and each component's mean over the rows it had an opinion on
    (`reward_<name>`)."""
    ids = table.column("sample_id").to_pylist()
    prompts, responses = table.column("prompt").to_pylist(), table.column("response").to_pylist()
    references = table.column("reference").to_pylist()
    total, means = [0.0] * len(ids), {}
    for c in components:
        try:
            values = c.call(prompts, responses, references)
        except RewardFunctionError:
            raise
        except Exception as err:
            failing = _first_failing(c, ids, prompts, responses, references)
            raise RewardFunctionError(f"{c.where} raised {type(err).__name__}: {err} ({failing})") from err
        try:
            values = list(values)
        except TypeError:
            raise RewardFunctionError(f"{c.where} returned {type(values).__name__}, not a list of rewards") from None
        if len(values) != len(ids):
            raise RewardFunctionError(f"{c.where} returned {len(values)} rewards for a batch of {len(ids)} samples "
                                      f"(first: {ids[0]})")
        numbers = [_number(v, c, ids, prompts, i) for i, v in enumerate(values)]
        seen = [x for x in numbers if x is not None]
        means[f"reward_{c.name}"] = sum(seen) / len(seen) if seen else None
        for i, x in enumerate(numbers):
            if x is not None:
                total[i] += c.weight * x
    return total, {k: v for k, v in means.items() if v is not None}


def _first_failing(c: RewardComponent, ids, prompts, responses, references) -> str:
    """The batch failed as a whole: call the function on one sample at a time to name the first that fails."""
    if isinstance(c.call, HttpReward):
        return f"batch of {len(ids)} samples from {ids[0]}"
    for i in range(len(ids)):
        try:
            c.call(prompts[i:i + 1], responses[i:i + 1], references[i:i + 1])
        except Exception:
            return f"on {_sample(ids, prompts, i)}"
    return f"on the batch of {len(ids)} samples from {ids[0]}; each sample alone passes"

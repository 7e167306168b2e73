"""Where the judge runs: a local vLLM engine, or an OpenAI-compatible endpoint (`critic.remote.base_url`).

Both answer the two questions every labeling method asks:
- `distribution(prompts, labels)`: the probabilities of the label strings as the next token (renormalised
  over the labels) and the mass they hold — the label is read from log-probs, never from free text when
  log-probs exist;
- `complete(prompts, max_tokens, stop)`: a greedy continuation (rationales, own answers, critiques).
Replies never raise for one bad prompt: they carry an `error` and the labeler counts it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from rlaif_ray.config import RunConfig


class JudgeLabelError(ValueError):
    """The judge's tokenizer cannot express the configured answer labels as single tokens."""


@dataclass
class JudgeReply:
    probs: list[float] | None = None   # over the labels, renormalised; None when unparsable or failed
    mass: float = 0.0                  # total probability the labels held
    text: str = ""                     # generated text (complete) or the most likely label token
    latency_s: float = 0.0             # remote: all attempts, backoff included; local: the batch time shared out
    error: str | None = None           # "judge_prompt_too_long(..)", "http_429", "timeout", "bad_response: .."
    attempts: int = 0
    from_text: bool = False            # remote endpoints without log-probs: parsed from the reply text
    prompt_tokens: int = 0
    completion_tokens: int = 0
    detail: str = ""                   # start of an error body (key redacted), for diagnostics


def label_token_ids(tokenizer, labels, model: str) -> list[int]:
    ids = []
    for label in labels:
        toks = tokenizer.encode(label, add_special_tokens=False)
        if len(toks) != 1:
            raise JudgeLabelError(f"judge {model}: label {label!r} is {len(toks)} tokens {toks}; every answer "
                                  "label must be exactly one token (change critic.*_labels)")
        ids.append(toks[0])
    return ids


def label_distribution(top_logprobs: dict, token_ids: list[int]) -> tuple[list[float], float]:
    """Probabilities of the label tokens among the judge's top log-probs, renormalised, and their mass."""
    probs = [math.exp(top_logprobs[t].logprob) if t in top_logprobs else 0.0 for t in token_ids]
    mass = sum(probs)
    return ([p / mass for p in probs] if mass > 0 else probs), mass


class LocalJudge:
    """A vLLM engine in this process. Batch calls: latency per reply is the batch time shared out."""

    def __init__(self, model_path: str, cfg: RunConfig, seed: int):
        from rlaif_ray.engine import make_llm

        self.name = model_path
        self.llm = make_llm(model_path, cfg.vllm, cfg.model, seed=seed)
        self.tokenizer = self.llm.get_tokenizer()
        self.top_k = min(cfg.vllm.max_logprobs, len(self.tokenizer))
        self.max_prompt_len = cfg.model.max_model_len - 1
        self.label_ids = {}
        for labels in (cfg.critic.pairwise_labels, cfg.critic.direct_labels):
            self.label_ids[tuple(labels)] = label_token_ids(self.tokenizer, labels, model_path)
        self.calls = 0

    def _encode(self, prompts: list[str], room: int):
        """Token ids of each prompt, or an error reply when prompt + `room` new tokens do not fit."""
        out = []
        for text in prompts:
            ids = self.tokenizer.encode(text)
            if len(ids) + room - 1 > self.max_prompt_len:
                out.append(JudgeReply(error=f"judge_prompt_too_long({len(ids)}>{self.max_prompt_len + 1 - room})"))
            else:
                out.append(ids)
        return out

    def _run(self, prompts: list[str], room: int, params):
        encoded = self._encode(prompts, room)
        todo = [(i, ids) for i, ids in enumerate(encoded) if not isinstance(ids, JudgeReply)]
        outs = []
        t0 = time.perf_counter()
        if todo:
            outs = self.llm.generate([{"prompt_token_ids": ids} for _, ids in todo], params, use_tqdm=False)
        share = (time.perf_counter() - t0) / max(len(todo), 1)
        self.calls += len(todo)
        return encoded, todo, outs, share

    def distribution(self, prompts: list[str], labels) -> list[JudgeReply]:
        from vllm import SamplingParams

        ids = self.label_ids[tuple(labels)]
        encoded, todo, outs, share = self._run(prompts, 1, SamplingParams(max_tokens=1, temperature=0.0,
                                                                          logprobs=self.top_k))
        replies: list = list(encoded)
        for (i, _), out in zip(todo, outs):
            probs, mass = label_distribution(out.outputs[0].logprobs[0], ids)
            replies[i] = JudgeReply(probs=probs, mass=mass, text=out.outputs[0].text, latency_s=share,
                                    completion_tokens=1, prompt_tokens=len(out.prompt_token_ids))
        return replies

    def complete(self, prompts: list[str], max_tokens: int, stop: list[str]) -> list[JudgeReply]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop or None)
        encoded, todo, outs, share = self._run(prompts, max_tokens, params)
        replies: list = list(encoded)
        for (i, _), out in zip(todo, outs):
            replies[i] = JudgeReply(text=out.outputs[0].text, latency_s=share, prompt_tokens=len(out.prompt_token_ids),
                                    completion_tokens=len(out.outputs[0].token_ids))
        return replies

    def usage(self) -> dict:
        return {"requests": self.calls}


def make_judge(model_path: str, cfg: RunConfig, seed: int):
    """The judge the config asks for: remote when `critic.remote.base_url` is set, else a local engine."""
    if cfg.critic.remote.base_url:
        from rlaif_ray.remote_judge import OpenAIJudge
        judge = OpenAIJudge(cfg.critic.remote)
        judge.check()
        return judge
    return LocalJudge(model_path, cfg, seed)

"""What a judge answers, whichever backend runs it (local engine, transformers, OpenAI-compatible endpoint),
and how label strings become token ids and probabilities.

A `JudgeReply` never raises for one bad prompt: it carries an `error` and the labeler counts it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


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

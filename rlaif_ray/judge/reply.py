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
    finish_reason: str | None = None   # complete: "stop" (EOS or a stop string) or "length" (cut off at max_tokens)


AUTO_LABELS = "auto"


def label_choices(kind: str) -> list:
    """The label sets `critic.*_labels=auto` tries, in order: the digits after a space (one token each in
    tokenizers that merge them, like the toy world's), the bare digits (byte-level BPE tokenizers such as
    SmolLM2's, Llama-3's or Qwen2.5's split a space from a digit), and for a direct scale, 1-9 where "10" is two
    tokens (Qwen2.5 splits every digit)."""
    if kind == "pairwise":
        return [(" 1", " 2"), ("1", "2")]
    return [[f" {i}" for i in range(1, 11)], [str(i) for i in range(1, 11)], [str(i) for i in range(1, 10)]]


def concrete_labels(critic, tokenizer=None, choice_without_tokenizer: int = 1):
    """`critic` (a CriticConfig) with `auto` label settings made concrete: the first of `label_choices` whose labels
    are each one token of `tokenizer`. Without a tokenizer, choice `choice_without_tokenizer`: 1, the bare digits,
    for a remote judge (its reply tokens are matched after stripping whitespace); 0, the space-prefixed digits, for
    the toy world, whose tokenizer is trained to keep them whole. A set that fits nothing falls to the last choice,
    which the start-up check then rejects naming the label and the tokenizer."""
    def fits(labels):
        return all(len(tokenizer.encode(label, add_special_tokens=False)) == 1 for label in labels)

    update = {}
    for field, kind in (("pairwise_labels", "pairwise"), ("direct_labels", "direct")):
        if getattr(critic, field) == AUTO_LABELS:
            choices = label_choices(kind)
            update[field] = (choices[choice_without_tokenizer] if tokenizer is None
                             else next((c for c in choices if fits(c)), choices[-1]))
    return critic.model_copy(update=update) if update else critic


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

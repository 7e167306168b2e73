"""Training a generative pairwise judge to give the verdict the labeler reads (issue 27).

The labeler (`rlaif_ray.stages.critic.CriticLabeler`, method `pairwise`) shows the judge
`preamble + few_shot + pairwise_template(prompt, slot 1, slot 2) + pairwise_ending` as one user turn of the judge's
chat template and reads P(slot 1) as the judge's next-token probabilities of the two label tokens, renormalised over
the two, in both orders. Tuning builds exactly those prompts (`JudgePrompts`, `user_turn_ids`, `label_token_ids`)
from preference pairs, in both orders, and minimises the cross-entropy between the judge's next-token distribution at
the answer position and the pair's soft label put on the two label tokens (P(chosen ≻ rejected) in the order chosen
first, its complement in the other). That is the two-way cross-entropy the labeler's reading implies plus
-log(label mass): the labels keep the answer's probability. (With the two-way term alone, SmolLM2's label mass fell
to 0.01, below `critic.min_label_mass`, and the labeler refused every verdict.) What training optimised is therefore
what the labeler reads, token for token.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rlaif_ray.data.chat import user_turn_ids
from rlaif_ray.judge.reply import label_token_ids
from rlaif_ray.judge.templates import JudgePrompts


@dataclass(frozen=True)
class JudgeExample:
    ids: list[int]     # the judge prompt's tokens, as the labeler encodes it
    target: float      # P(slot 1 is better): the pair's label in this order
    pair: int          # index of the pair it comes from
    order: int         # 0: chosen in slot 1, 1: rejected in slot 1


def judge_examples(pairs: list[tuple[str, str, str, float]], critic, tokenizer, template, seed: int = 0,
                   max_tokens: int | None = None) -> tuple[list[JudgeExample], int]:
    """Both orders of every (prompt, chosen, rejected, P(chosen ≻ rejected)) pair as judge prompts of `critic` (a
    CriticConfig with concrete labels); one principle per pair where the config has principles (seeded). Pairs whose
    prompt is longer than `max_tokens` are left out; returns the examples and how many pairs were left out."""
    prompts = JudgePrompts(critic)
    rng = np.random.default_rng(seed)
    out, too_long = [], 0
    for k, (prompt, chosen, rejected, p) in enumerate(pairs):
        principle = critic.principles[int(rng.integers(len(critic.principles)))] if critic.principles else ""
        both = [user_turn_ids(tokenizer, prompts.pairwise(prompt, a, b, principle) + critic.pairwise_ending, template)
                for a, b in ((chosen, rejected), (rejected, chosen))]
        if max_tokens is not None and max(len(ids) for ids in both) > max_tokens:
            too_long += 1
            continue
        out += [JudgeExample(both[0], float(p), k, 0), JudgeExample(both[1], 1.0 - float(p), k, 1)]
    return out, too_long


def pairwise_label_ids(critic, tokenizer, name: str) -> list[int]:
    """The token ids of the slot-1 and slot-2 labels (each exactly one token, or JudgeLabelError)."""
    return label_token_ids(tokenizer, critic.pairwise_labels, name)


def label_logits(model, examples: list[JudgeExample], label_ids: list[int], pad_id: int, device) -> torch.Tensor:
    """The judge's log-probabilities (over its whole vocabulary) of the two label tokens right after each prompt,
    [B, 2]: softmax over the two is P(slot 1) / P(slot 2) as the labeler reads them, exp summed is the label mass.
    Right-padded, so each row's answer position is its own last token; only those positions go through the output
    head."""
    from rlaif_ray.learner_core import causal_lm
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        attn[i, :len(e.ids)] = 1
    ids, attn = ids.to(device), attn.to(device)
    lm = causal_lm(model)
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    last = attn.sum(-1) - 1
    answer = hidden[torch.arange(len(examples), device=device), last]
    return torch.log_softmax(lm.get_output_embeddings()(answer).float(), dim=-1)[:, label_ids]


def tuning_loss(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy between the judge's next-token distribution (`logp`: the two labels' log-probs,
    from `label_logits`) and the soft target P(slot 1) on the slot-1 label, the rest on the slot-2 label: the two-way
    cross-entropy plus -log(label mass)."""
    return -(targets * logp[:, 0] + (1 - targets) * logp[:, 1])


def verdict_quality(slot1: np.ndarray, labels: np.ndarray, mass: np.ndarray | None = None,
                    min_mass: float = 0.0) -> dict:
    """What the labeler's figures would say of a judge on held-out pairs. `slot1`: [pairs, 2] P(slot 1) with the
    chosen response first (order 0) and second (order 1); `labels`: P(chosen ≻ rejected) per pair.
    agreement: the both-orders average prefers the labelled side (pairs with a decided label); position
    consistency: both orders pick the same response; first-slot rate: share of judgements that pick slot 1;
    brier: mean squared error of the averaged P(chosen ≻ rejected) against the label; with `mass` ([pairs, 2], the
    two labels' probability summed): its mean, and the share of judgements the labeler would refuse as unparsable
    (below `min_mass`, critic.min_label_mass)."""
    p_chosen = (slot1[:, 0] + (1 - slot1[:, 1])) / 2
    decided = np.abs(labels - 0.5) > 1e-6
    agree = ((p_chosen > 0.5) == (labels > 0.5))[decided]
    return {"pairs": int(len(labels)),
            "agreement": float(agree.mean()) if agree.size else None,
            "position_consistency": float(((slot1[:, 0] > 0.5) == (slot1[:, 1] < 0.5)).mean()) if len(labels) else None,
            "first_slot_rate": float((slot1 > 0.5).mean()) if len(labels) else None,
            "brier": float(((p_chosen - labels) ** 2).mean()) if len(labels) else None,
            **({"label_mass": float(mass.mean()), "unparsable_share": float((mass < min_mass).mean())}
               if mass is not None and len(labels) else {})}

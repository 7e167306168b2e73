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

With `critic.method=direct` the judge is tuned on graded single answers instead (`direct_examples`): the labeler shows
`preamble + direct_template(prompt, response) + direct_ending` and reads Σ i·P(i) over the K score labels
(renormalised), so the target is a distribution over the K labels whose expected score is 1 + grade·(K − 1)
(`score_targets`), and the loss the same cross-entropy over the whole vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rlaif_ray.data.chat import user_turn_ids
from rlaif_ray.judge.templates import JudgePrompts


@dataclass(frozen=True)
class JudgeExample:
    ids: list[int]     # the judge prompt's tokens, as the labeler encodes it
    target: float      # P(slot 1 is better): the pair's label in this order (direct: the answer's grade in [0, 1])
    pair: int          # index of the pair (direct: of the graded answer) it comes from
    order: int         # 0: chosen in slot 1, 1: rejected in slot 1 (direct: 0)


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


def direct_examples(answers: list[tuple[str, str, float]], critic, tokenizer, template, seed: int = 0,
                    max_tokens: int | None = None) -> tuple[list[JudgeExample], int]:
    """Every (prompt, response, grade) as the direct judge prompt of `critic`; one principle per answer where the
    config has principles (seeded). Answers whose prompt is longer than `max_tokens` are left out (and counted)."""
    prompts = JudgePrompts(critic)
    rng = np.random.default_rng(seed)
    out, too_long = [], 0
    for k, (prompt, response, grade) in enumerate(answers):
        principle = critic.principles[int(rng.integers(len(critic.principles)))] if critic.principles else ""
        ids = user_turn_ids(tokenizer, prompts.direct(prompt, response, principle) + critic.direct_ending, template)
        if max_tokens is not None and len(ids) > max_tokens:
            too_long += 1
            continue
        out.append(JudgeExample(ids, float(grade), k, 0))
    return out, too_long


def score_targets(grades: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n]: for each grade in [0, 1] the distribution over the direct scale's labels 1..n whose expected score
    (what the labeler reads, Σ i·P(i)) is 1 + grade·(n − 1): the mass split between the two nearest labels, so a
    grade of 0 or 1 puts it all on label 1 or label n."""
    pos = grades.clamp(0, 1) * (n - 1)
    low = pos.floor().long().clamp(max=n - 2)
    upper = pos - low
    out = torch.zeros(len(grades), n, dtype=grades.dtype, device=grades.device)
    rows = torch.arange(len(grades), device=grades.device)
    out[rows, low] = 1 - upper
    out[rows, low + 1] = upper
    return out


def label_logits(model, examples: list[JudgeExample], label_ids: list[int], pad_id: int, device) -> torch.Tensor:
    """The judge's log-probabilities (over its whole vocabulary) of the label tokens right after each prompt,
    [B, labels]: softmax over them is P(slot 1) / P(slot 2) (direct: P(score i)) as the labeler reads them, exp
    summed is the label mass.
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


def label_probs(model, examples: list[JudgeExample], label_ids: list[int], pad_id: int, device,
                batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The labels' probabilities the labeler would read for each example ([N, labels], renormalised over the labels)
    and their mass, `label_logits` in batches without gradient."""
    probs, mass = [], []
    with torch.no_grad():
        for k in range(0, len(examples), batch):
            logp = label_logits(model, examples[k:k + batch], label_ids, pad_id, device)
            probs += torch.softmax(logp, -1).cpu().tolist()
            mass += logp.exp().sum(-1).cpu().tolist()
    return np.asarray(probs).reshape(-1, len(label_ids)), np.asarray(mass)


def pair_orders(examples: list[JudgeExample], probs: np.ndarray, mass: np.ndarray) -> tuple[list[int], np.ndarray]:
    """The pairs both of whose orders are in `examples`, and [pairs, order, (P(slot 1), label mass)] from
    `label_probs`' output."""
    by_pair: dict[int, list] = {}  # pair -> [(P(slot 1), label mass) of order 0, of order 1]
    for e, p, m in zip(examples, probs[:, 0], mass):
        by_pair.setdefault(e.pair, [None, None])[e.order] = (p, m)
    pairs = sorted(k for k, v in by_pair.items() if None not in v)
    return pairs, np.asarray([by_pair[k] for k in pairs], dtype=float).reshape(-1, 2, 2)


def tuning_loss(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy between the judge's next-token distribution (`logp`: the labels' log-probs, from
    `label_logits`) and the target put on the labels: [B] a soft P(slot 1) on the slot-1 label, the rest on the
    slot-2 label; or [B, L] a distribution over L labels (`score_targets`). The L-way cross-entropy plus
    -log(label mass)."""
    if targets.dim() == 1:
        targets = torch.stack([targets, 1 - targets], dim=-1)
    return -(targets * logp).sum(-1)


def pair_symmetry(logp: torch.Tensor, examples: list[JudgeExample]) -> torch.Tensor:
    """Mean over the pairs with both orders in `examples` of (z₁ + z₂)², z the judge's log-odds of slot 1 (`logp`
    from `label_logits`) in each order. The two orders' targets are each other's complement, so their log-odds are
    each other's negatives whatever the label: the term is 0 for a judge with no position bias, and it pushes a pair the
    judge puts in slot 1 in both orders (or slot 2 in both) back towards opposite verdicts. 0 when no pair is whole."""
    z = logp[:, 0] - logp[:, 1]
    rows: dict[int, list] = {}
    for i, e in enumerate(examples):
        rows.setdefault(e.pair, [None, None])[e.order] = i
    whole = [v for v in rows.values() if None not in v]
    if not whole:
        return z.sum() * 0.0
    idx = torch.tensor(whole, device=z.device)
    return ((z[idx[:, 0]] + z[idx[:, 1]]) ** 2).mean()


def pair_batches(examples: list[JudgeExample], batch_size: int, rng: np.random.Generator) -> list[list[JudgeExample]]:
    """`examples` in batches of about `batch_size` judge prompts that keep both orders of a pair together (pairs in
    seeded random order; a batch holds max(1, batch_size // 2) pairs), so `pair_symmetry` sees whole pairs."""
    by_pair: dict[int, list[JudgeExample]] = {}
    for e in examples:
        by_pair.setdefault(e.pair, []).append(e)
    pairs = list(by_pair.values())
    per = max(1, batch_size // 2)
    order = rng.permutation(len(pairs))
    return [[e for k in order[s:s + per] for e in pairs[k]] for s in range(0, len(pairs), per)]


def score_quality(expected: np.ndarray, grades: np.ndarray, n: int, mass: np.ndarray | None = None,
                  min_mass: float = 0.0) -> dict:
    """What the labeler's figures would say of a direct judge on held-out graded answers. `expected`: Σ i·P(i) the
    labeler reads (1..n); `grades` in [0, 1]. agreement: the score is above the scale's middle exactly when the grade
    is (answers with a grade other than 0.5, as the run's judge report counts a direct score "right"); pearson:
    correlation of the score with the grade; mae: mean absolute error of the score put on [0, 1] against the grade;
    with `mass`: its mean and the share the labeler would refuse (below `min_mass`)."""
    graded = (expected - 1) / (n - 1)
    decided = np.abs(grades - 0.5) > 1e-6
    agree = ((graded > 0.5) == (grades > 0.5))[decided]
    spread = len(grades) > 1 and np.std(grades) > 0 and np.std(graded) > 0
    return {"answers": int(len(grades)),
            "agreement": float(agree.mean()) if agree.size else None,
            "pearson": float(np.corrcoef(graded, grades)[0, 1]) if spread else None,
            "mae": float(np.abs(graded - grades).mean()) if len(grades) else None,
            "mean_score": float(expected.mean()) if len(grades) else None,
            **({"label_mass": float(mass.mean()), "unparsable_share": float((mass < min_mass).mean())}
               if mass is not None and len(grades) else {})}


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

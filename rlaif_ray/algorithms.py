"""The learning rules, as plain functions of tensors: advantages, the PPO surrogate with an importance
correction for stale samples, the KL penalty, DPO/IPO on AI-labelled pairs, and SFT.

Notation per response token t of sample i: log π (learner, with gradient; for PPO at the rollout temperature and
top-p, the distribution vLLM sampled from, see `sampling_logprobs`), log π_prox (learner before
this update, no gradient), log π_behav (the vLLM engine that sampled it, possibly some versions older),
log π_ref (the frozen initial policy).

PPO, decoupled (the behaviour policy may be older than the learner):
    r_t = π / π_prox,   w_t = min(π_prox / π_behav, is_cap)           (w = 1 without the correction)
    loss_i = -mean_t w_t · min(r_t A_i, clip(r_t, 1 ± ε) A_i)  +  β · mean_t k3(π_ref, π)
Advantages from the sample rewards R, per prompt group g of n samples:
    group_mean    A = R − mean_g R                   (REINFORCE with a group baseline)
    grpo          A = (R − mean_g R) / (std_g R + 1e-6)
    rloo          A = n/(n−1) · (R − mean_g R)        (leave-one-out baseline)
    reinforce_pp  A = R − mean_g R, then normalised over the whole batch
DPO / IPO on the judge's soft preference p = P(i ≻ j), h = (log π − log π_ref)(i) − (same)(j), sums over tokens:
    dpo   loss = −p log σ(βh) − (1−p) log σ(−βh)
    ipo   loss = (h − (2p−1) / (2β))²
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

ADVANTAGES = ("group_mean", "grpo", "rloo", "reinforce_pp")
ZERO_SIGNAL = 1e-6  # a group whose rewards span less than this carries no learning signal (its advantages are 0)
KL_LOG_RATIO_CLAMP = 10.0
KL_TOKEN_CLAMP = 10.0


def _members(groups: list[str]) -> dict[str, list[int]]:
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    return members


def signal_groups(rewards: list[float], groups: list[str]) -> set[str]:
    """The groups whose rewards differ (by at least ZERO_SIGNAL): only they can tell better from worse."""
    r = np.asarray(rewards, dtype=np.float64)
    return {g for g, rows in _members(groups).items() if len(rows) > 1 and np.ptp(r[rows]) >= ZERO_SIGNAL}


def advantages(rewards: list[float], groups: list[str], kind: str) -> np.ndarray:
    """One advantage per sample; a group of one sample, or whose rewards are all equal (within ZERO_SIGNAL), gets
    0: no baseline to compare with, and no signal for GRPO's std normalisation to blow up from rounding noise."""
    r = np.asarray(rewards, dtype=np.float64)
    adv = np.zeros_like(r)
    for rows in _members(groups).values():
        if len(rows) < 2 or np.ptp(r[rows]) < ZERO_SIGNAL:
            continue
        centred = r[rows] - r[rows].mean()
        if kind == "grpo":
            centred = centred / (r[rows].std() + 1e-6)
        elif kind == "rloo":
            centred = centred * len(rows) / (len(rows) - 1)
        elif kind not in ("group_mean", "reinforce_pp"):
            raise ValueError(f"unknown advantage estimator '{kind}' (known: {', '.join(ADVANTAGES)})")
        adv[rows] = centred
    if kind == "reinforce_pp" and len(adv) > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-6)
    return adv


def _nucleus_threshold(probs: torch.Tensor, top_p: float, k: int = 1024) -> torch.Tensor:
    """Per row, the smallest probability inside the top-p nucleus. vLLM drops, in ascending order, the tokens whose
    cumulative mass is at most 1 − top_p; in descending order that keeps every token whose exclusive cumulative
    mass is below top_p. Looked for among the top `k` first (a sort of the whole vocabulary for every position is
    the slow part); rows whose nucleus is wider are sorted whole."""
    flat = probs.reshape(-1, probs.shape[-1])
    threshold = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)

    def fill(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Thresholds of `rows` from their largest probabilities `values` (descending); which rows it closed."""
        kept = ((values.cumsum(-1) - values) < top_p).sum(-1, keepdim=True)  # >= 1: the top token stays
        threshold[rows] = values.gather(-1, kept - 1).squeeze(-1)
        return kept.squeeze(-1) < values.shape[-1]

    rows = torch.arange(flat.shape[0], device=flat.device)
    k = min(k, flat.shape[-1])
    closed = fill(rows, flat.topk(k, dim=-1).values)
    if k < flat.shape[-1] and not closed.all():
        wide = rows[~closed]
        fill(wide, flat[wide].sort(dim=-1, descending=True).values)
    return threshold.reshape(probs.shape[:-1])


def sampling_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                      top_p: float = 1.0) -> torch.Tensor:
    """log-probs of `targets` [B, T] under the distribution the engine samples from: softmax(logits / temperature)
    restricted to the top-p nucleus and renormalised, by vLLM's rule (see `_nucleus_threshold`). A target the
    learner's nucleus misses (rounding at the edge of the nucleus) is kept in it, so its log-prob stays finite."""
    scaled = logits.float() / temperature
    if top_p < 1.0:
        with torch.no_grad():
            probs = scaled.softmax(dim=-1)
            drop = probs < _nucleus_threshold(probs, top_p)[..., None]
            drop.scatter_(-1, targets[..., None], False)
            del probs
        scaled = scaled.masked_fill(drop, float("-inf"))
    return torch.log_softmax(scaled, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over the masked (response) positions, shape [B]."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(π || π_ref) per sequence. Clamped: a token the (older) rollout policy sampled can be
    very unlikely under the learner now, and an unclamped exp() turns one such token into a spike."""
    log_ratio = (ref_logp - logp).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
    return token_mean((torch.exp(log_ratio) - log_ratio - 1).clamp(max=KL_TOKEN_CLAMP), mask)


def ppo_loss(logp, prox_logp, behav_logp, mask, adv, clip_eps: float, is_cap: float | None):
    """Per-sequence clipped surrogate (to minimise) and diagnostics. `is_cap=None` turns the correction off."""
    ratio = torch.exp(logp - prox_logp)
    if is_cap is None:
        weight = torch.ones_like(ratio)
    else:
        behav = torch.where(torch.isfinite(behav_logp), behav_logp, prox_logp)  # unknown → no correction
        weight = torch.exp((prox_logp - behav).clamp(max=20.0)).clamp(max=is_cap).detach()
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    loss = -token_mean(weight * surrogate, mask)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {"clip_fraction": float((((ratio - 1).abs() > clip_eps).float() * mask).sum() / n),
                 "is_weight_mean": float((weight * mask).sum() / n),
                 "behav_log_ratio": float(((prox_logp - torch.where(torch.isfinite(behav_logp), behav_logp, prox_logp))
                                           * mask).sum() / n)}
    return loss, stats


def preference_pairs(sample_ids: list[str], partners: list[list[str]], win_probs: list[list[float]],
                     allowed: set[int]) -> list[tuple[int, int, float]]:
    """Unique judged pairs (i, j, P(i ≻ j)) between allowed rows; each pair once, i the lower row."""
    row_of = {sid: i for i, sid in enumerate(sample_ids)}
    pairs = []
    for i in sorted(allowed):
        for other, p in zip(partners[i], win_probs[i]):
            j = row_of.get(other)
            if j is not None and j in allowed and i < j:
                pairs.append((i, j, float(p)))
    return pairs


def preference_loss(logratio_i: torch.Tensor, logratio_j: torch.Tensor, p: torch.Tensor, beta: float,
                    kind: str) -> torch.Tensor:
    """Per-pair DPO or IPO loss on soft labels; logratio = Σ_t (log π − log π_ref) of each response."""
    h = logratio_i - logratio_j
    if kind == "dpo":
        return -(p * F.logsigmoid(beta * h) + (1 - p) * F.logsigmoid(-beta * h))
    if kind == "ipo":
        return (h - (2 * p - 1) / (2 * beta)) ** 2
    raise ValueError(f"unknown preference loss '{kind}'")


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence negative log-likelihood of the demonstration tokens (token mean)."""
    return -token_mean(logp, mask)


def micro_batches(units: list[list[int]], lengths: dict[int, int], max_tokens: int) -> list[list[int]]:
    """Pack units (lists of row indices that must stay together, e.g. one prompt group) into micro-batches whose
    padded size, rows × longest row, stays within `max_tokens` (0: everything in one micro-batch). Longest
    units first, first fit; a unit larger than the budget is a micro-batch of its own. Returns row lists."""
    units = [u for u in units if u]
    if max_tokens <= 0 or not units:
        return [sorted(r for u in units for r in u)] if units else []
    units = sorted(units, key=lambda u: (-max(lengths[r] for r in u), u[0]))
    batches: list[tuple[list[int], int]] = []  # (rows, longest row)
    for unit in units:
        longest = max(lengths[r] for r in unit)
        for k, (rows, width) in enumerate(batches):
            w = max(width, longest)
            if (len(rows) + len(unit)) * w <= max_tokens:
                batches[k] = (rows + unit, w)
                break
        else:
            batches.append((list(unit), longest))
    return [sorted(rows) for rows, _ in batches]

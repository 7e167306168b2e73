"""CriticLabeler: a Ray actor holding an LLM judge (its own vLLM engine) that labels rollouts.

`pairwise` (canonical RLAIF): for every pair of responses to the same prompt, the judge is asked which is
better in both orders; the preference is read from the log-probs of the answer tokens (softmax over the
two labels -> soft label), the two orders are averaged (position-bias mitigation) and whether they agreed
is recorded. `direct` (d-RLAIF): the judge scores one response; the score is Σ i·P(i) over the score tokens.

A reply whose label tokens carry less than `critic.min_label_mass` of the probability is unparsable: the
sample keeps its row with `label_valid=false` and a `skip_reason`; it never gets a made-up label.
"""
from __future__ import annotations

import itertools
import math
import time
from collections import defaultdict

import pyarrow as pa
import ray

from rlaif_ray import schemas
from rlaif_ray.config import CriticConfig, RunConfig
from rlaif_ray.engine import make_llm


class JudgeLabelError(ValueError):
    """The judge's tokenizer cannot express the configured answer labels as single tokens."""


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


def pair_preference(first_order: float, second_order: float) -> tuple[float, bool]:
    """P(A beats B) from P(slot 1 wins | A in slot 1) and P(slot 1 wins | B in slot 1); both orders averaged."""
    a_first, a_second = first_order, 1.0 - second_order
    return 0.5 * (a_first + a_second), (a_first > 0.5) == (a_second > 0.5)


@ray.remote
class CriticLabeler:
    def __init__(self, model_path: str, cfg: dict, worker_index: int = 0):
        self.cfg = RunConfig.model_validate(cfg)
        self.ccfg: CriticConfig = self.cfg.critic
        self.model_path = model_path
        self.llm = make_llm(model_path, self.cfg.vllm, self.cfg.model, seed=self.cfg.loop.seed + 7919 + worker_index)
        self.tokenizer = self.llm.get_tokenizer()
        self.label_ids = {"pairwise": label_token_ids(self.tokenizer, self.ccfg.pairwise_labels, model_path),
                          "direct": label_token_ids(self.tokenizer, self.ccfg.direct_labels, model_path)}
        self.top_k = min(self.cfg.vllm.max_logprobs, len(self.tokenizer))
        self.max_prompt_len = self.cfg.model.max_model_len - 1

    def ready(self) -> dict[str, list[int]]:
        return self.label_ids

    def _judge(self, prompts: list[str], method: str) -> list[tuple[list[float], float] | str]:
        """One greedy token per prompt; returns (label distribution, label mass) or a skip reason."""
        from vllm import SamplingParams

        results: list = [None] * len(prompts)
        todo = []
        for i, text in enumerate(prompts):
            ids = self.tokenizer.encode(text)
            if len(ids) > self.max_prompt_len:
                results[i] = f"judge_prompt_too_long({len(ids)}>{self.max_prompt_len})"
            else:
                todo.append((i, ids))
        if todo:
            params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.top_k)
            outs = self.llm.generate([{"prompt_token_ids": ids} for _, ids in todo], params, use_tqdm=False)
            for (i, _), out in zip(todo, outs):
                dist, mass = label_distribution(out.outputs[0].logprobs[0], self.label_ids[method])
                results[i] = (dist, mass) if mass >= self.ccfg.min_label_mass else f"unparsable_judge_reply(mass={mass:.3f})"
        return results

    def label(self, rollouts: pa.Table, method: str | None = None) -> tuple[pa.Table, dict]:
        """Add the label columns; `method` defaults to `critic.method`."""
        rollouts = schemas.validate(rollouts, "rollouts")
        method = method or self.ccfg.method
        t0 = time.perf_counter()
        if method == "pairwise":
            cols, stats = self._label_pairwise(rollouts)
        else:
            cols, stats = self._label_direct(rollouts)
        cols["label_method"] = [method] * rollouts.num_rows
        cols["judge_model"] = [self.model_path] * rollouts.num_rows
        table = rollouts
        for field in schemas.LABEL_FIELDS:
            table = table.append_column(field, pa.array(cols[field.name], field.type))
        table = schemas.validate(table, "labels")
        stats.update(label_seconds=time.perf_counter() - t0, labeled_samples=rollouts.num_rows,
                     label_valid=int(sum(cols["label_valid"])))
        return table, stats

    def _label_pairwise(self, rollouts: pa.Table):
        prompts = rollouts.column("prompt").to_pylist()
        responses = rollouts.column("response").to_pylist()
        ids = rollouts.column("sample_id").to_pylist()
        groups: dict[str, list[int]] = defaultdict(list)
        for row, pid in enumerate(rollouts.column("prompt_id").to_pylist()):
            groups[pid].append(row)
        pairs = [pair for rows in groups.values() for pair in itertools.combinations(rows, 2)]
        template = self.ccfg.pairwise_template
        texts = []
        for a, b in pairs:  # both orders of every pair, in one batch
            texts.append(template.format(prompt=prompts[a], response_a=responses[a], response_b=responses[b]))
            texts.append(template.format(prompt=prompts[b], response_a=responses[b], response_b=responses[a]))
        judged = self._judge(texts, "pairwise")
        n = rollouts.num_rows
        partners, wins, agree = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        reasons: list[list[str]] = [[] for _ in range(n)]
        agreements, first_slot, valid_pairs = 0, 0, 0
        for k, (a, b) in enumerate(pairs):
            ab, ba = judged[2 * k], judged[2 * k + 1]
            bad = next((r for r in (ab, ba) if isinstance(r, str)), None)
            if bad is not None:
                reasons[a].append(bad)
                reasons[b].append(bad)
                continue
            p_a, agreed = pair_preference(ab[0][0], ba[0][0])
            valid_pairs += 1
            agreements += agreed
            first_slot += (ab[0][0] > 0.5) + (ba[0][0] > 0.5)
            for me, other, p in ((a, b, p_a), (b, a, 1.0 - p_a)):
                partners[me].append(ids[other])
                wins[me].append(p)
                agree[me].append(agreed)
        valid = [bool(w) for w in wins]
        cols = {
            "label_valid": valid,
            "skip_reason": [None if v else (reasons[i][0] if reasons[i] else "no_valid_pair") for i, v in enumerate(valid)],
            "pair_partner_ids": partners, "pair_win_probs": wins, "pair_position_agree": agree,
            "win_prob": [sum(w) / len(w) if w else None for w in wins],
            "judge_score": [None] * n,
        }
        stats = {"judge_calls": len(texts), "pairs": len(pairs), "valid_pairs": valid_pairs,
                 "position_agreements": agreements, "first_slot_wins": first_slot}
        return cols, stats

    def _label_direct(self, rollouts: pa.Table):
        template = self.ccfg.direct_template
        texts = [template.format(prompt=p, response=r) for p, r in
                 zip(rollouts.column("prompt").to_pylist(), rollouts.column("response").to_pylist())]
        judged = self._judge(texts, "direct")
        n = rollouts.num_rows
        scores = [None if isinstance(j, str) else sum((i + 1) * p for i, p in enumerate(j[0])) for j in judged]
        cols = {
            "label_valid": [s is not None for s in scores],
            "skip_reason": [j if isinstance(j, str) else None for j in judged],
            "pair_partner_ids": [[] for _ in range(n)], "pair_win_probs": [[] for _ in range(n)],
            "pair_position_agree": [[] for _ in range(n)],
            "win_prob": [None] * n, "judge_score": scores,
        }
        return cols, {"judge_calls": len(texts)}

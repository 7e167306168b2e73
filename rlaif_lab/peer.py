"""The peer comparison's arithmetic (jobs/peer_trl.py): the reward TRL's GRPOTrainer gets, built exactly as
rlaif_ray's CriticLabeler + RewardScorer build it, the per-step figures of both systems, and the table.

Reward (`critic.method=pairwise`, `reward.kind=win_rate`): per prompt group, the pairs `critic.pairs` selects (the
same seed and sample ids as the labeler: `s{step:06d}/{prompt_id}/{k}`), each judged in both orders with the
judge prompt `JudgePrompts.pairwise(prompt, a, b, principle) + critic.pairwise_ending`, where `prompt` is the prompt
row's readable text (what the labeler reads from the rollouts' `prompt` column, not the chat-formatted policy
input); a local judge reads it as one user turn of its chat template (`critic.chat_template`,
`rlaif_ray.data.chat.user_turn_ids`). A pair counts when both orders answered with label mass >=
`critic.min_label_mass`; P(A beats B) is the mean of the two orders; a sample's reward is 2·mean P(win) − 1, None
(TRL: excluded from its group's baseline, advantage 0) when none of its pairs counted.
"""
from __future__ import annotations

import time
import zlib
from collections import defaultdict

import numpy as np

from rlaif_ray.data import schemas
from rlaif_ray.judge.pairs import select_pairs
from rlaif_ray.judge.templates import JudgePrompts
from rlaif_ray.stages.critic import _failure, pair_preference

LABELER_SEED_OFFSET = 7919  # CriticLabeler.seed = loop.seed + 7919 + worker index (its principle draws)


def labeler_principle(ccfg, loop_seed: int, key: str, worker_index: int = 0) -> str | None:
    """The principle CriticLabeler draws for a prompt group whose first sample id is `key`."""
    if not ccfg.principles:
        return None
    rng = np.random.default_rng([loop_seed + LABELER_SEED_OFFSET + worker_index, zlib.crc32(key.encode())])
    return ccfg.principles[int(rng.integers(len(ccfg.principles)))]


def pairwise_judge_texts(ccfg, loop_seed: int, prompts: list[str], responses: list[str], prompt_ids: list[str],
                         sample_ids: list[str], mode: str | None = None) -> tuple[list[tuple[int, int]], list[str]]:
    """The judged pairs (row a, row b) of a batch and the judge prompt of each order (a in slot 1, then b in slot
    1), in CriticLabeler's order, for `critic.method=pairwise`; `mode` defaults to `critic.pairs`."""
    mode = mode or ccfg.pairs
    groups: dict[str, list[int]] = defaultdict(list)
    for row, pid in enumerate(prompt_ids):
        groups[pid].append(row)
    judge = JudgePrompts(ccfg)
    pairs, texts = [], []
    for rows in groups.values():
        principle = labeler_principle(ccfg, loop_seed, sample_ids[rows[0]]) or ""
        seed = f"{loop_seed}/" + ",".join(sample_ids[r] for r in rows)
        for i, j in select_pairs(len(rows), mode, ccfg.pairs_k, seed):
            a, b = rows[i], rows[j]
            pairs.append((a, b))
            texts.append(judge.pairwise(prompts[a], responses[a], responses[b], principle) + ccfg.pairwise_ending)
            texts.append(judge.pairwise(prompts[b], responses[b], responses[a], principle) + ccfg.pairwise_ending)
    return pairs, texts


def win_probs(pairs: list[tuple[int, int]], replies: list, n: int, min_mass: float) -> list[float | None]:
    """Each row's mean P(win) over its counted pairs (`replies`: two per pair, as `pairwise_judge_texts` orders)."""
    wins: list[list[float]] = [[] for _ in range(n)]
    for k, (a, b) in enumerate(pairs):
        first, second = replies[2 * k], replies[2 * k + 1]
        if _failure(first, min_mass) or _failure(second, min_mass):
            continue
        p_a, _ = pair_preference(first.probs[0], second.probs[0])
        wins[a].append(p_a)
        wins[b].append(1.0 - p_a)
    return [sum(w) / len(w) if w else None for w in wins]


def group_sample_ids(step: int, prompt_ids: list[str]) -> list[str]:
    """rlaif_ray's sample ids for a batch whose rows are grouped by prompt: the k-th row of a prompt is slot k."""
    seen: dict[str, int] = defaultdict(int)
    out = []
    for pid in prompt_ids:
        out.append(schemas.sample_id(step, pid, seen[pid]))
        seen[pid] += 1
    return out


def completion_text(completion) -> str:
    """A TRL completion as text: plain (text datasets) or the assistant message (conversational datasets)."""
    if isinstance(completion, str):
        return completion
    message = completion[-1] if isinstance(completion, list) else completion
    return message["content"]


class CountingJudge:
    """A judge backend that counts what it is asked: prompts and prompt tokens it read (cache hits never reach it)."""

    def __init__(self, judge):
        self.judge, self.prompts, self.tokens = judge, 0, 0

    def distribution(self, prompts: list[str], labels):
        replies = self.judge.distribution(prompts, labels)
        self.prompts += len(prompts)
        self.tokens += sum(r.prompt_tokens for r in replies)
        return replies

    def usage(self) -> dict:
        return self.judge.usage()


class WinRateReward:
    """A TRL reward function (`reward_funcs=[WinRateReward(...)]`): rlaif_ray's pairwise win-rate reward. The dataset
    carries `judge_prompt` (the readable prompt text) and `prompt_id` beside TRL's `prompt`; `judge` answers
    `distribution(texts, labels)` (a CachedJudge over a CountingJudge, as the labeler holds it). `calls` records each
    call: seconds, judge prompts the labelling needed, prompts and tokens the backend read, unrewarded samples."""

    def __init__(self, judge, ccfg, loop_seed: int, backend: CountingJudge | None = None):
        self.__name__ = "pairwise_win_rate"  # TRL names reward functions by __name__
        self.judge, self.ccfg, self.loop_seed, self.backend = judge, ccfg, loop_seed, backend
        self.calls: list[dict] = []

    def __call__(self, prompts, completions, judge_prompt, prompt_id, trainer_state=None, **_):
        t0 = time.perf_counter()
        before = (self.backend.prompts, self.backend.tokens) if self.backend else (0, 0)
        step = trainer_state.global_step if trainer_state is not None else 0
        responses = [completion_text(c) for c in completions]
        pairs, texts = pairwise_judge_texts(self.ccfg, self.loop_seed, list(judge_prompt), responses, list(prompt_id),
                                            group_sample_ids(step, list(prompt_id)))
        replies = self.judge.distribution(texts, self.ccfg.pairwise_labels)
        wins = win_probs(pairs, replies, len(responses), self.ccfg.min_label_mass)
        after = (self.backend.prompts, self.backend.tokens) if self.backend else (0, 0)
        self.calls.append({"seconds": time.perf_counter() - t0, "judge_calls": len(texts),
                           "backend_prompts": after[0] - before[0], "backend_tokens": after[1] - before[1],
                           "unrewarded": sum(w is None for w in wins)})
        return [None if w is None else 2.0 * w - 1.0 for w in wins]


# ---------------------------------------------------------------------------------------------- figures
TRL_STAGES = ("gen", "judge", "ref_logprobs", "other", "train")


def trl_figures(steps: list[dict], warmup: int) -> dict:
    """TRL's per-step records (seconds of the step and of each timed part, samples and token counts) after `warmup`
    steps: rates, mean seconds per step and per stage, token totals."""
    measured = steps[warmup:] if len(steps) > warmup else steps
    wall = sum(s["step_seconds"] for s in measured)
    total = {k: sum(s[k] for s in measured) for k in measured[0] if k != "stage_seconds"} if measured else {}
    return {"steps_measured": len(measured), "wall_seconds": wall,
            "samples_per_s": total.get("samples", 0) / wall if wall else 0.0,
            "tokens_per_s": total.get("gen_tokens", 0) / wall if wall else 0.0,
            "step_seconds": wall / len(measured) if measured else 0.0,
            "stage_seconds": {k: sum(s["stage_seconds"][k] for s in measured) / len(measured) for k in TRL_STAGES}
            if measured else {}, "totals": total}


def loop_tokens(table, ccfg, loop_seed: int, count_tokens) -> dict:
    """Token counts of one rlaif_ray step from its saved `rewards` table: prompt tokens once per prompt, generated
    tokens, trained tokens (prompt + response of every rewarded sample) and the mean tokens of the batch's distinct
    judge prompts (rebuilt as the labeler built them; `count_tokens(texts)` -> the judge's token count of each)."""
    rows = table.to_pylist()
    prompts = {r["prompt_id"]: len(r["prompt_token_ids"]) for r in rows}
    _, texts = pairwise_judge_texts(ccfg, loop_seed, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                    [r["prompt_id"] for r in rows], [r["sample_id"] for r in rows])
    return {"prefill_tokens": sum(prompts.values()),
            "gen_tokens": sum(len(r["response_token_ids"]) for r in rows),
            "train_tokens": sum(len(r["prompt_token_ids"]) + len(r["response_token_ids"]) for r in rows
                                if r["reward"] is not None),
            "judge_prompt_tokens_mean": _mean(count_tokens(list(dict.fromkeys(texts))))}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _fmt(value, spec: str = "10.3f", width: int = 10) -> str:
    return f"{value:{spec}}" if isinstance(value, (int, float)) else f"{'-' if value is None else value:>{width}}"


STAGE_ORDER = ("gen", "judge", "reward", "ref_logprobs", "other", "train", "sync")


def format_peer_table(systems: dict[str, dict], efficiency: dict, target: float = 1.5) -> str:
    """One table: a column per system (each: samples_per_s, tokens_per_s, step_seconds, stage_seconds, flops), the
    async stage efficiencies, the compute shares, and the async/TRL ratio against `target`."""
    names = list(systems)
    w = max([14] + [len(n) + 2 for n in names])
    head = f"{'':38s}" + "".join(f"{n:>{w}s}" for n in names)
    lines = [head, "-" * len(head)]

    def row(label, values, spec=".2f"):
        lines.append(f"{label:38s}" + "".join(_fmt(v, f"{w}{spec}", w) for v in values))

    row("steps measured (after warm-up)", [systems[n].get("steps_measured") for n in names], "d")
    row("samples/s", [systems[n]["samples_per_s"] for n in names])
    row("generated tokens/s", [systems[n]["tokens_per_s"] for n in names])
    row("seconds/step", [systems[n]["step_seconds"] for n in names], ".3f")
    found = [k for n in names for k in systems[n]["stage_seconds"]]
    for stage in [k for k in STAGE_ORDER if k in found] + [k for k in dict.fromkeys(found) if k not in STAGE_ORDER]:
        row(f"  stage {stage} s/step", [systems[n]["stage_seconds"].get(stage) for n in names], ".3f")
    for key, label in (("gen", "generation"), ("judge", "judge"), ("learner", "learner"), ("total", "loop total")):
        row(f"model GFLOP/s {label}", [systems[n]["flops"]["flops_per_s"][key] / 1e9 for n in names])
        row(f"  share of matmul peak {label}", [systems[n]["flops"]["share_of_peak"][key] for n in names], ".4f")
    if efficiency:
        lines.append("")
        lines.append(f"{'async stage efficiency (in loop / alone)':44s}{'in loop':>12s}{'alone':>12s}{'ratio':>12s}")
        for stage, e in efficiency.items():
            lines.append(f"{'  ' + stage + ' (' + e['unit'] + ')':44s}" + "".join(
                _fmt(e.get(k), "12.2f", 12) for k in ("in_loop", "alone", "efficiency")))
    trl = systems.get("TRL", {}).get("samples_per_s")
    if trl:
        lines.append("")
        for n in names[1:]:
            ratio = systems[n]["samples_per_s"] / trl
            mark = f"  (target >= {target:.1f}x: {'met' if ratio >= target else 'NOT met'})" if "async" in n else ""
            lines.append(f"{n} / TRL samples/s: {ratio:.2f}x{mark}")
    return "\n".join(lines)

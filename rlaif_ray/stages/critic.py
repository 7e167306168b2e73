"""CriticLabeler: a Ray actor holding an AI judge (its own vLLM engine, or a remote OpenAI-compatible
endpoint) that labels rollouts with the method `critic.method` (see `CriticConfig` and `judge_prompts`).

Pairwise methods (pairwise, cot, self_reference) judge pairs of responses to the same prompt (every pair, or
those `critic.pairs` selects: `rlaif_ray.judge.pairs`) in both orders. The soft label is read from the
label-token probabilities, P(slot 1) per order; the two orders are averaged (position-bias mitigation) and
whether they agreed is kept per pair, with the slot-1 probability of each order (so the run's judge report can
measure position bias). `cot` first generates a rationale, `self_reference` first answers the prompt itself
and critiques both responses against that answer. `direct` (d-RLAIF) scores one response: Σ i·P(i) over the
score tokens.

A reply whose label tokens hold less than `critic.min_label_mass`, or a judge call that failed, is never
turned into a label: the sample keeps its row with `label_valid=false` and a `skip_reason`.
Judge replies go through a `CachedJudge`: a judge prompt already answered (re-issued batch, identical
responses) is not judged again; the stats count `judge_calls` (judge prompts the labelling needed) and
`judge_cache_hits` (of those, answered from the cache).
`demonstrate` answers prompts with the judge model itself (the strong-teacher SFT baseline). `label_groups` labels
several prompt groups in one call and hands back a table per group (group flow).
"""
from __future__ import annotations

import dataclasses
import time
import zlib
from collections import defaultdict

import numpy as np
import pyarrow as pa
import ray

from rlaif_ray.config import CriticConfig, RunConfig
from rlaif_ray.console import stage_output_to_run_folder
from rlaif_ray.data import schemas
from rlaif_ray.data.transport import use_arrow_ipc
from rlaif_ray.engine import engine_env
from rlaif_ray.judge.cache import CachedJudge
from rlaif_ray.judge.calibration import position_offset, shift_slot1
from rlaif_ray.judge.local import LocalJudge, TransformersJudge
from rlaif_ray.judge.pairs import select_pairs
from rlaif_ray.judge.quality import judge_bias_counts
from rlaif_ray.judge.reply import concrete_labels
from rlaif_ray.judge.remote import OpenAIJudge, Secret, read_secret
from rlaif_ray.judge.templates import JudgePrompts
from rlaif_ray.stages.group_calls import GroupLabels


def labeler_env(cfg: RunConfig) -> dict[str, str]:
    """A CriticLabeler's environment: the engine's. (A remote judge's API key is not in it: runtime_env is shown
    on the dashboard; it goes to the actor as a `Secret` argument, see `rlaif_ray.judge.remote.read_secret`.)"""
    return engine_env(cfg.engine_for("critic"))


def make_judge(model_path: str, cfg: RunConfig, seed: int, secret: Secret | None = None):
    """The judge the config asks for: remote when `critic.remote.base_url` is set, else a local model run by
    vLLM (`critic.backend=vllm`) or by transformers (`critic.backend=transformers`)."""
    if cfg.critic.remote.base_url:
        judge = OpenAIJudge(cfg.critic.remote, secret)
        judge.check()
        return judge
    if cfg.critic.backend == "transformers":
        return TransformersJudge(model_path, cfg, seed)
    return LocalJudge(model_path, cfg, seed)


def pair_preference(first_order: float, second_order: float) -> tuple[float, bool]:
    """P(A beats B) from P(slot 1 wins | A in slot 1) and P(slot 1 wins | B in slot 1); both orders averaged."""
    a_first, a_second = first_order, 1.0 - second_order
    return 0.5 * (a_first + a_second), (a_first > 0.5) == (a_second > 0.5)


def _failure(reply, min_mass: float) -> str | None:
    if reply.error:
        return reply.error
    if reply.probs is None or reply.mass < min_mass:
        return f"unparsable_judge_reply(mass={reply.mass:.3f})"
    return None


@ray.remote
class CriticLabeler(GroupLabels):
    def __init__(self, model_path: str, cfg: dict, worker_index: int = 0, secret: Secret | None = None):
        """`secret`: a remote judge's API key (`read_secret(cfg.critic.remote)` on the driver)."""
        use_arrow_ipc()  # tables in and out as one IPC buffer each (rlaif_ray.data.transport)
        self.cfg = RunConfig.model_validate(cfg)
        stage_output_to_run_folder(self.cfg, f"critic-{worker_index}")  # output.console=quiet: logs to run_dir/logs
        self.seed = self.cfg.loop.seed + 7919 + worker_index
        judge = make_judge(model_path, self.cfg, self.seed, secret)
        # `auto` labels for this judge's tokenizer (the driver resolved them the same way already)
        self.ccfg: CriticConfig = concrete_labels(self.cfg.critic, getattr(judge, "tokenizer", None))
        self.judge_name = self.ccfg.remote.model if self.ccfg.remote.base_url else model_path
        self.judge = CachedJudge(judge, self.judge_name, self.ccfg.cache_size, self.ccfg.min_label_mass)
        self.prompts = JudgePrompts(self.ccfg)
        self.model_path = model_path
        self.offsets: dict[str, tuple[float, str]] = {}  # method -> (position offset, its source), on first use
        if self.ccfg.method != "direct":
            self._position_offset(self.ccfg.method)  # a malformed calibration file fails at start, not mid-run

    def ready(self) -> str:
        return self.judge_name

    def _principle(self, key: str) -> str | None:
        """One principle per labelled prompt group, drawn reproducibly from the seed and the group's key."""
        if not self.ccfg.principles:
            return None
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])
        return self.ccfg.principles[int(rng.integers(len(self.ccfg.principles)))]

    def _position_offset(self, method: str) -> float:
        """The log-odds of slot 1 taken off each verdict of `method` (rlaif_ray.judge.calibration); said once."""
        if method not in self.offsets:
            self.offsets[method] = position_offset(self.ccfg.position_calibration, self.model_path, method)
            offset, source = self.offsets[method]
            if offset:
                print(f"[critic] {method} verdicts: slot-1 log-odds {offset:+.3f} taken off (position calibration "
                      f"from {source})", flush=True)
        return self.offsets[method][0]

    def slot1_offset(self) -> float:
        """The position offset this labeler takes off `critic.method`'s verdicts (0 for direct scores)."""
        return 0.0 if self.ccfg.method == "direct" else self._position_offset(self.ccfg.method)

    def _clip(self, text: str) -> str:
        return text[: self.ccfg.raw_reply_chars]

    def label(self, rollouts: pa.Table, method: str | None = None, pairs: str | None = None) -> tuple[pa.Table, dict]:
        """Add the label columns; `method` and `pairs` default to `critic.method` and `critic.pairs`."""
        rollouts = schemas.validate(rollouts, "rollouts")
        method = method or self.ccfg.method
        t0, hits = time.perf_counter(), self.judge.hits
        if method == "direct":
            cols, stats = self._label_direct(rollouts)
        else:
            cols, stats = self._label_pairwise(rollouts, method, pairs or self.ccfg.pairs)
        n = rollouts.num_rows
        cols["label_method"] = [method] * n
        cols["judge_model"] = [self.judge_name] * n
        table = rollouts
        for field in schemas.LABEL_FIELDS:
            table = table.append_column(field, pa.array(cols[field.name], field.type))
        table = schemas.validate(table, "labels")
        seconds = time.perf_counter() - t0
        stats.update(label_seconds=seconds, labeled_samples=n, label_valid=int(sum(cols["label_valid"])),
                     judge_cache_hits=self.judge.hits - hits, judge_calls_per_sample=stats["judge_calls"] / max(n, 1),
                     **judge_bias_counts(table))
        return table, stats

    # ---------------------------------------------------------------- pairwise, cot, self_reference
    def _judge_texts(self, method: str, items: list[tuple[str, str, str, str | None, str | None]]):
        """items: (prompt, slot-1 response, slot-2 response, principle, own answer) -> (final prompts, step texts)."""
        c, P = self.ccfg, self.prompts
        if method == "pairwise":
            return [P.pairwise(p, a, b, pr or "") + c.pairwise_ending for p, a, b, pr, _ in items], [""] * len(items)
        if method == "cot":
            heads = [P.pairwise(p, a, b, pr or "") + c.cot_prompt for p, a, b, pr, _ in items]
        else:
            heads = [P.self_reference(p, own or "", a, b, pr or "") + c.critique_prompt for p, a, b, pr, own in items]
        steps = self.judge.complete(heads, c.rationale_max_tokens, c.rationale_stop)
        self.step_calls += len(heads)
        texts = [h + s.text + c.pairwise_ending if not s.error else None for h, s in zip(heads, steps)]
        return texts, [s.error or s.text for s in steps]

    def _pairs(self, rows: list[int], ids: list[str], mode: str) -> list[tuple[int, int]]:
        """The judged pairs of one prompt group's rows (`critic.pairs`); random_k draws from the seed and the
        group's sample ids, so a re-issued batch is judged on the same pairs by any labeler."""
        seed = f"{self.cfg.loop.seed}/" + ",".join(ids[r] for r in rows)
        return [(rows[i], rows[j]) for i, j in select_pairs(len(rows), mode, self.ccfg.pairs_k, seed)]

    def _label_pairwise(self, rollouts: pa.Table, method: str, mode: str):
        prompts = rollouts.column("prompt").to_pylist()
        responses = rollouts.column("response").to_pylist()
        ids = rollouts.column("sample_id").to_pylist()
        groups: dict[str, list[int]] = defaultdict(list)
        for row, pid in enumerate(rollouts.column("prompt_id").to_pylist()):
            groups[pid].append(row)
        principle_of = {pid: self._principle(ids[rows[0]]) for pid, rows in groups.items()}
        own_of: dict[str, str | None] = {pid: None for pid in groups}
        self.step_calls = 0
        if method == "self_reference":  # the judge answers each prompt once, itself
            pids = list(groups)
            answers = self.judge.complete([self.prompts.self_answer(prompts[groups[p][0]], principle_of[p] or "")
                                           for p in pids], self.cfg.rollout.max_new_tokens, self.ccfg.rationale_stop)
            self.step_calls += len(pids)
            own_of = {p: (a.text if not a.error else None) for p, a in zip(pids, answers)}
        pairs = [(pid, pair) for pid, rows in groups.items() for pair in self._pairs(rows, ids, mode)]
        items = []
        for pid, (a, b) in pairs:  # both orders of every pair, in one batch
            items.append((prompts[a], responses[a], responses[b], principle_of[pid], own_of[pid]))
            items.append((prompts[b], responses[b], responses[a], principle_of[pid], own_of[pid]))
        texts, step_texts = self._judge_texts(method, items)
        todo = [k for k, t in enumerate(texts) if t is not None]
        replies: list = [None] * len(texts)
        offset = self._position_offset(method)
        for k, reply in zip(todo, self.judge.distribution([texts[k] for k in todo], self.ccfg.pairwise_labels)):
            if offset and reply.probs and not reply.error:  # a copy: the cache keeps the judge's own reply
                p1 = shift_slot1(reply.probs[0], offset)
                reply = dataclasses.replace(reply, probs=[p1, 1.0 - p1])
            replies[k] = reply
        n = rollouts.num_rows
        partners, wins, agree, slot1 = ([[] for _ in range(n)] for _ in range(4))
        reasons: list[list[str]] = [[] for _ in range(n)]
        latency, raw = [0.0] * n, [None] * n
        failed = unparsable = valid_pairs = 0
        for k, (pid, (a, b)) in enumerate(pairs):
            orders = [replies[2 * k], replies[2 * k + 1]]
            bad = [step_texts[2 * k + o] if orders[o] is None else _failure(orders[o], self.ccfg.min_label_mass)
                   for o in range(2)]
            for row, o in ((a, 0), (b, 1)):
                r = orders[o]
                latency[row] += r.latency_s if r is not None else 0.0
                if raw[row] is None:
                    shown = f"{step_texts[2 * k + o]} ->" if method != "pairwise" else ""
                    top = r.text if r is not None else ""
                    p1 = f" P(slot1)={r.probs[0]:.3f}" if r is not None and r.probs else ""
                    raw[row] = self._clip(f"{shown}{top}{p1}".strip())
            if any(bad):
                reason = next(x for x in bad if x)
                failed += sum(1 for x, r in zip(bad, orders) if x and (r is None or r.error))
                unparsable += sum(1 for x, r in zip(bad, orders) if x and r is not None and not r.error)
                reasons[a].append(reason)
                reasons[b].append(reason)
                continue
            p_a, agreed = pair_preference(orders[0].probs[0], orders[1].probs[0])
            valid_pairs += 1
            for me, other, p, s1 in ((a, b, p_a, orders[0].probs[0]), (b, a, 1.0 - p_a, orders[1].probs[0])):
                partners[me].append(ids[other])
                wins[me].append(p)
                agree[me].append(agreed)
                slot1[me].append(s1)
        valid = [bool(w) for w in wins]
        cols = {
            "label_valid": valid,
            "skip_reason": [None if v else (reasons[i][0] if reasons[i] else "no_valid_pair") for i, v in enumerate(valid)],
            "pair_partner_ids": partners, "pair_win_probs": wins, "pair_position_agree": agree,
            "pair_slot1_probs": slot1,
            "win_prob": [sum(w) / len(w) if w else None for w in wins],
            "judge_score": [None] * n,
            "principle": [principle_of[pid] for pid in rollouts.column("prompt_id").to_pylist()],
            "judge_reply": raw, "label_latency_s": latency,
        }
        stats = {"judge_calls": len(texts) + self.step_calls, "pairs": len(pairs), "valid_pairs": valid_pairs,
                 "failed_calls": failed, "unparsable_calls": unparsable}
        return cols, stats

    # ---------------------------------------------------------------- direct
    def _label_direct(self, rollouts: pa.Table):
        prompts = rollouts.column("prompt").to_pylist()
        ids = rollouts.column("sample_id").to_pylist()
        principles = [self._principle(sid) for sid in ids]
        texts = [self.prompts.direct(p, r, pr or "") + self.ccfg.direct_ending
                 for p, r, pr in zip(prompts, rollouts.column("response").to_pylist(), principles)]
        replies = self.judge.distribution(texts, self.ccfg.direct_labels)
        n = rollouts.num_rows
        reasons = [_failure(r, self.ccfg.min_label_mass) for r in replies]
        scores = [None if bad else sum((i + 1) * p for i, p in enumerate(r.probs)) for r, bad in zip(replies, reasons)]
        cols = {
            "label_valid": [s is not None for s in scores], "skip_reason": reasons,
            "pair_partner_ids": [[] for _ in range(n)], "pair_win_probs": [[] for _ in range(n)],
            "pair_position_agree": [[] for _ in range(n)], "pair_slot1_probs": [[] for _ in range(n)],
            "win_prob": [None] * n, "judge_score": scores, "principle": principles,
            "judge_reply": [self._clip(f"{r.text} E[score]={s:.2f}" if s is not None else (r.error or r.text))
                            for r, s in zip(replies, scores)],
            "label_latency_s": [r.latency_s for r in replies],
        }
        stats = {"judge_calls": n, "failed_calls": sum(1 for r in replies if r.error),
                 "unparsable_calls": sum(1 for r, bad in zip(replies, reasons) if bad and not r.error)}
        return cols, stats

    # ---------------------------------------------------------------- teacher demonstrations
    def demonstrate(self, prompts: pa.Table, indices: list[int], step: int, version: int) -> tuple[pa.Table, dict]:
        """The judge answers prompts[indices] itself (greedy): a `rollouts` table for the SFT baseline."""
        rows = prompts.take(pa.array(indices, pa.int64())).to_pylist()
        t0 = time.perf_counter()
        replies = self.judge.complete([self.prompts.self_answer(r["prompt"]) for r in rows],
                                      self.cfg.rollout.max_new_tokens, [])
        cols: dict[str, list] = {f.name: [] for f in schemas.ROLLOUT_SCHEMA}
        for row, reply in zip(rows, replies):
            if reply.error:  # a demonstration the teacher could not give is left out, and counted
                continue
            cols["sample_id"].append(schemas.sample_id(step, row["prompt_id"], 0))
            cols["prompt_id"].append(row["prompt_id"])
            cols["group_index"].append(0)
            cols["prompt"].append(row["prompt"])
            cols["prompt_token_ids"].append([])   # the learner re-tokenizes text with the policy's tokenizer
            cols["response"].append(reply.text)
            cols["response_token_ids"].append([])
            cols["response_logprobs"].append([])
            cols["finish_reason"].append(reply.finish_reason)  # "length": cut off, the learner adds no EOS
            cols["policy_version"].append(version)
            cols["token_versions"].append(None)  # no policy tokens
            cols["reference"].append(row["reference"])
        table = schemas.validate(pa.Table.from_pydict(cols, schema=schemas.ROLLOUT_SCHEMA), "rollouts")
        seconds = time.perf_counter() - t0
        return table, {"gen_seconds": seconds, "gen_samples": table.num_rows, "gen_tokens": sum(r.completion_tokens for r in replies),
                       "policy_version": version, "failed_demonstrations": sum(1 for r in replies if r.error)}

    def usage(self) -> dict:
        return self.judge.usage()


def new_labeler(model_path: str, cfg: RunConfig, worker_index: int = 0, **options):
    """A CriticLabeler actor (`options`: Ray's, e.g. resources or a placement bundle) with the engine's environment;
    a remote judge's API key goes in as a `Secret` argument, read here on the driver."""
    return CriticLabeler.options(runtime_env={"env_vars": labeler_env(cfg)}, **options).remote(
        model_path, cfg.model_dump(), worker_index, read_secret(cfg.critic.remote))

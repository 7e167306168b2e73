"""The judge under training (`JudgeTrainer`): its tokenizer, label token ids, judge-prompt examples and one
DeepSpeed rank of the learner core; held-out quality before and after, the tuned folder and its report. Used by
`rlaif-ray train-judge` (rlaif_ray.tools.train_judge) and the smol world's judge (rlaif_ray.worlds.smol_judge).
It tunes the verdict `critic.method` reads: pairwise (pairs in both orders) or direct (graded single answers on the
1–K scale). cot and self_reference read the same pairwise labels after a rationale or the judge's own answer, which
tuning does not generate: for them it trains the plain pairwise prompt, an approximation."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import torch

from rlaif_ray.config import ConfigError, RunConfig
from rlaif_ray.data.chat import resolve_template
from rlaif_ray.judge.calibration import estimate_offset, shift_slot1
from rlaif_ray.judge.reply import concrete_labels, label_token_ids
from rlaif_ray.judge.tuning import (direct_examples, judge_examples, label_logits, label_probs, pair_batches,
                                    pair_orders, pair_symmetry, score_quality, score_targets, tuning_loss,
                                    verdict_quality)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_pairs(n: int, held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and held-out pair indices (a seeded shuffle; at least one held out when the share is > 0)."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    k = max(1, round(n * held_out)) if held_out > 0 and n > 1 else 0
    return sorted(order[k:]), sorted(order[:k])


def split_by_prompt(prompts: list[str], held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and held-out row indices with every row of a prompt on the same side: `split_pairs` over the distinct
    prompts (in order of first appearance), so no held-out verdict is on a prompt the judge trained on."""
    distinct = list(dict.fromkeys(prompts))
    train, held = split_pairs(len(distinct), held_out, seed)
    held_prompts = {distinct[k] for k in held}
    rows = range(len(prompts))
    return [i for i in rows if prompts[i] not in held_prompts], [i for i in rows if prompts[i] in held_prompts]


class JudgeTrainer:
    """The judge under training: its tokenizer, label ids, prompt examples and a LearnerCore."""

    def __init__(self, judge_path: str, cfg: RunConfig):
        import torch.distributed as dist
        from transformers import AutoTokenizer

        from rlaif_ray.learner_core import CoreSettings, LearnerCore, init_distributed
        jt = cfg.judge_training
        self.direct = cfg.critic.method == "direct"
        if self.direct and jt.symmetry > 0:
            raise ConfigError("judge_training.symmetry compares a pair's two orders; critic.method=direct scores "
                              "single answers (set judge_training.symmetry=0)")
        self.cfg, self.path = cfg, judge_path
        self.tokenizer = AutoTokenizer.from_pretrained(judge_path)
        self.template = resolve_template(cfg.critic.chat_template, self.tokenizer, "critic.chat_template")
        self.critic = concrete_labels(cfg.critic, self.tokenizer)
        self.labels = list(self.critic.direct_labels if self.direct else self.critic.pairwise_labels)
        self.label_ids = label_token_ids(self.tokenizer, self.labels, judge_path)
        if not dist.is_initialized():
            init_distributed("nccl" if torch.cuda.is_available() else "gloo", "127.0.0.1", _free_port(), 0, 1)
        self.core = LearnerCore(judge_path, CoreSettings(  # constant learning rate, no reference model
            zero_stage=0, dtype=cfg.model.dtype, learning_rate=jt.learning_rate, grad_clip=cfg.learner.grad_clip,
            reference="none", lora_rank=jt.lora_rank, lora_alpha=2.0 * jt.lora_rank,
            logprob_chunk_tokens=0, seed=cfg.loop.seed))
        config = self.core.engine.module.config
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.max_tokens = cfg.engine_for("critic").max_model_len - 1

    def examples(self, rows):
        """Judge prompts of (prompt, chosen, rejected, label) pairs, both orders; direct: of (prompt, response,
        grade) answers. Returns the examples and how many rows were too long for the judge."""
        make = direct_examples if self.direct else judge_examples
        return make(rows, self.critic, self.tokenizer, self.template, self.cfg.loop.seed, self.max_tokens)

    def verdicts(self, examples) -> tuple[np.ndarray, np.ndarray]:
        """`label_probs` of the judge under training: the labels' probabilities for each example and their mass."""
        return label_probs(self.core.engine, examples, self.label_ids, self.pad_id, self.core.device)

    def both_orders(self, examples) -> tuple[list[int], np.ndarray]:
        """The pairs both of whose orders are in `examples`, and [pairs, order, (P(slot 1), label mass)]."""
        return pair_orders(examples, *self.verdicts(examples))

    def quality(self, examples, labels: dict[int, float]) -> dict:
        """verdict_quality of the pairs both of whose orders are in `examples` (`labels`: P(chosen ≻ rejected) per
        pair); direct: score_quality of the answers (`labels`: the grade per answer)."""
        if not self.direct:
            return self._pair_quality(*self.both_orders(examples), labels)
        probs, mass = self.verdicts(examples)
        expected = probs @ np.arange(1, len(self.label_ids) + 1)
        return score_quality(expected, np.asarray([labels[e.pair] for e in examples]), len(self.label_ids), mass,
                             self.critic.min_label_mass)

    def quality_calibrated(self, held, labels: dict[int, float], calib) -> tuple[dict | None, float, int, dict | None]:
        """After training, pairwise: the held-out quality (`quality`), the position offset (rlaif_ray.judge.calibration)
        measured on `calib` (pairs in both orders neither trained on nor scored; their labels are not read), how many
        pairs it was estimated on, and the held-out quality with the offset taken off each verdict's log-odds, as
        the labeler reads it with critic.position_calibration=auto. The held-out verdicts are computed once."""
        calib_pairs, calib_both = self.both_orders(calib)
        offset = estimate_offset(calib_both[:, :, 0])
        if not held:
            return None, offset, len(calib_pairs), None
        pairs, both = self.both_orders(held)
        return (self._pair_quality(pairs, both, labels), offset, len(calib_pairs),
                self._pair_quality(pairs, both, labels, offset))

    def _pair_quality(self, pairs: list[int], both: np.ndarray, labels: dict[int, float], offset: float = 0.0) -> dict:
        """verdict_quality of `both_orders`' output, each verdict's log-odds of slot 1 less `offset`."""
        return verdict_quality(shift_slot1(both[:, :, 0], offset), np.asarray([labels[k] for k in pairs]),
                               both[:, :, 1], self.critic.min_label_mass)

    def train(self, examples, progress=print) -> list[float]:
        """`judge_training.epochs` passes over `examples` in seeded random order (whole pairs per batch when
        `judge_training.symmetry` > 0); the mean loss per epoch (the cross-entropy plus the weighted symmetry term)."""
        jt, rng = self.cfg.judge_training, np.random.default_rng(self.cfg.loop.seed + 1)
        symmetry = jt.symmetry  # 0 on the direct scale (refused in __init__)
        losses = []
        for epoch in range(jt.epochs):
            if symmetry > 0:
                batches = pair_batches(examples, jt.batch_size, rng)
            else:
                order = rng.permutation(len(examples))
                batches = [[examples[i] for i in order[s:s + jt.batch_size]]
                           for s in range(0, len(examples), jt.batch_size)]
            total, t0 = 0.0, time.perf_counter()
            for chunk in batches:
                targets = torch.tensor([e.target for e in chunk], dtype=torch.float32, device=self.core.device)
                if self.direct:
                    targets = score_targets(targets, len(self.label_ids))
                seen: list[float] = []

                def loss_of(_, chunk=chunk, targets=targets, seen=seen):
                    logp = label_logits(self.core.engine, chunk, self.label_ids, self.pad_id, self.core.device)
                    loss = tuning_loss(logp, targets).mean()
                    if symmetry > 0:
                        loss = loss + symmetry * pair_symmetry(logp, chunk)
                    seen.append(float(loss.detach()))
                    return loss
                self.core.train_passes(1, 1, loss_of)
                total += seen[0] * len(chunk)
            losses.append(total / max(len(examples), 1))
            progress(f"[train-judge] epoch {epoch + 1}/{jt.epochs}: loss {losses[-1]:.4f} "
                     f"({len(examples)} judge prompts, {time.perf_counter() - t0:.1f} s)")
        return losses

    def save(self, out: str) -> None:
        params = [(n, t.detach().cpu().clone()) for bucket in self.core.full_buckets(2 ** 30) for n, t in bucket]
        self.core.save_pretrained(out, params)
        self.tokenizer.save_pretrained(out)


def write_report(out: str, report: dict) -> None:
    """`judge_report.json` and `judge_report.md` in the tuned judge's folder."""
    Path(out, "judge_report.json").write_text(json.dumps(report, indent=1))
    Path(out, "judge_report.md").write_text(_markdown(report))


def _markdown(report: dict) -> str:
    lines = [f"# Judge tuning: {report['judge']}", "",
             f"{report['pairs']['train']} training {report.get('unit', 'pairs')}, "
             f"{report['pairs']['held_out']} held out; "
             f"epoch losses {', '.join(f'{x:.4f}' for x in report['epoch_losses'])}; {report['seconds']} s.", ""]
    before, after, calibrated = report["held_out_before"], report["held_out_after"], report.get("held_out_calibrated")
    if before and after:
        columns = [before, after] + ([calibrated] if calibrated else [])
        lines += [f"| held-out {report.get('unit', 'pairs')} | before | after |"
                  + (" after, calibrated (critic.position_calibration=auto) |" if calibrated else ""),
                  "|---" * (len(columns) + 1) + "|"]
        for key in ("agreement", "position_consistency", "first_slot_rate", "brier", "pearson", "mae", "mean_score",
                    "label_mass", "unparsable_share"):
            fmt = (lambda v: "n/a" if v is None else f"{v:.3f}")
            if key in before:
                lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(fmt(c[key]) for c in columns) + " |")
    twins = report.get("held_out_twins") or {}
    meaning = {"minimal": "a right answer over itself with its number made wrong",
               "flipped": "each held-out pair with its two numbers swapped"}
    for kind, twin in twins.items():
        lines += ["", f"| {twin['pairs']} held-out {kind} pairs ({meaning.get(kind, kind)}) | before | after |",
                  "|---|---|---|"]
        lines += [f"| {key.replace('_', ' ')} | {twin['before'][key]:.3f} | {twin['after'][key]:.3f} |"
                  for key in ("agreement", "position_consistency", "first_slot_rate")]
    if report.get("position_offset") is not None:
        lines += ["", f"Position calibration: slot-1 log-odds offset {report['position_offset']:+.3f}, the median "
                  f"over both orders of {report['pairs'].get('calibration', 'the')} pairs neither trained on nor held "
                  f"out (judge_calibration.json; the labeler takes it off every verdict with "
                  f"critic.position_calibration=auto)."]
    return "\n".join(lines) + "\n"

"""`rlaif-ray train-judge PREFERENCES --out DIR`: fine-tune the judge (`model.critic`) on a preference file so that
its pairwise verdict, read the way the labeler reads it, matches the file's labels (rlaif_ray.judge.tuning).

One process, one DeepSpeed rank through the learner core (no Ray, no vLLM). Held-out pairs (`judge_training.held_out`)
are kept out of training and scored before and after; the output folder is a Hugging Face model (+ tokenizer with the
judge's chat template) that `model.critic` takes as it is, with `judge_report.json` and `judge_report.md` beside it,
and (pairwise) `judge_calibration.json`: the judge's lean towards one slot, measured on `judge_training.calibration`
of the prompts set aside, which the labeler takes off every verdict with `critic.position_calibration=auto`
(rlaif_ray.judge.calibration).
With `critic.method=direct` the file holds graded single answers (rlaif_ray.data.graded) and the judge is tuned on
the 1–K score the direct labeler reads.
"""
from __future__ import annotations

import time
from pathlib import Path

from rlaif_ray.config import ConfigError, RunConfig
from rlaif_ray.judge.calibration import CALIBRATION_FILE, write_calibration
from rlaif_ray.judge.trainer import JudgeTrainer, split_by_prompt, write_report


def train_judge(cfg: RunConfig, preferences: str, out: str, judge_path: str | None = None, progress=print) -> dict:
    """Fine-tune the judge on `preferences`, write the tuned judge and its report into `out`; returns the report."""
    from rlaif_ray.runtime.inputs import built_in_worlds, read_graded, read_preferences

    cfg = cfg.model_copy(update={"preferences": cfg.preferences.model_copy(update={"path": preferences})})
    direct = cfg.critic.method == "direct"
    if direct:  # graded single answers: (prompt, response, grade)
        rows, stats = read_graded(cfg)
    else:
        table, stats = read_preferences(cfg)
        rows = list(zip(*(table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected", "label"))))
    unit = "answers" if direct else "pairs"
    jt = cfg.judge_training
    if jt.max_pairs:
        rows = rows[:jt.max_pairs]
    judge_path = judge_path or built_in_worlds(cfg)[1]
    train_idx, held_idx = split_by_prompt([r[0] for r in rows], jt.held_out, cfg.loop.seed)  # whole prompts held out
    calib_idx: list[int] = []
    if jt.calibration > 0 and not direct:  # more whole prompts, not trained on: the position calibration's pairs
        keep, aside = split_by_prompt([rows[i][0] for i in train_idx], jt.calibration, cfg.loop.seed + 1)
        train_idx, calib_idx = [train_idx[i] for i in keep], [train_idx[i] for i in aside]
    t0 = time.perf_counter()
    trainer = JudgeTrainer(judge_path, cfg)
    examples, too_long = trainer.examples(rows)
    labels = {k: float(r[-1]) for k, r in enumerate(rows)}  # P(chosen ≻ rejected), or the grade
    held_set, train_set, calib_set = set(held_idx), set(train_idx), set(calib_idx)
    held = [e for e in examples if e.pair in held_set]
    train_examples = [e for e in examples if e.pair in train_set]
    calib = [e for e in examples if e.pair in calib_set]
    if not train_examples:
        raise ConfigError(f"{preferences}: nothing left to train on ({len(rows)} {unit}, {len(held_idx)} held out, "
                         f"{too_long} longer than the judge's max_model_len)")
    before = trainer.quality(held, labels) if held else None
    progress(f"[train-judge] {judge_path} ({'direct 1-' + str(len(trainer.labels)) if direct else 'pairwise'}): "
             f"{len(train_idx)} training {unit}, {len(held_idx)} held out"
             + (f", {len(calib_idx)} for the position calibration" if calib_idx else "")
             + (f"; {too_long} left out (judge prompt longer than {trainer.max_tokens} tokens)" if too_long else "")
             + (f"; held-out before: {before}" if before else ""))
    losses = trainer.train(train_examples, progress)
    offset, calibrated = None, None
    if calib:
        after, offset, calib_pairs, calibrated = trainer.quality_calibrated(held, labels, calib)
        progress(f"[train-judge] position calibration: slot-1 log-odds offset {offset:+.3f} on {calib_pairs} pairs "
                 "not trained on (critic.position_calibration=auto takes it off every verdict)")
    else:
        after = trainer.quality(held, labels) if held else None
    Path(out).mkdir(parents=True, exist_ok=True)
    trainer.save(out)
    if calib:
        write_calibration(out, offset, calib_pairs, f"{preferences}: {len(calib_idx)} pairs set aside by prompt")
    else:  # an earlier judge's calibration in the same folder is not this judge's
        Path(out, CALIBRATION_FILE).unlink(missing_ok=True)
    report = {"judge": judge_path, "preferences": stats, "out": str(Path(out).resolve()),
              "method": "direct" if direct else "pairwise", "unit": unit,
              "pairs": {"train": len(train_idx), "held_out": len(held_idx),
                        **({} if direct else {"calibration": len(calib_idx)}), "too_long": too_long},
              "labels": trainer.labels, "label_token_ids": trainer.label_ids,
              "settings": jt.model_dump(), "epoch_losses": losses, "held_out_before": before,
              "held_out_after": after, "position_offset": offset, "held_out_calibrated": calibrated,
              "seconds": round(time.perf_counter() - t0, 1)}
    write_report(out, report)
    return report


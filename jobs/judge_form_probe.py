"""Does a judge read the answer or its form? The smol task's 81 sums, each with a right and a wrong answer written in
several forms ("15", "7 + 8 equals 15.", "7 + 8 = 15", "The answer is 15."), judged in both orders as the
CriticLabeler reads the judge (the config's pairwise prompt, labels and chat template; P(slot 1) from the two label
tokens). Same form: only the number tells the answers apart. Crossed forms: a judge that reads the form, not the
number, prefers one form whichever answer is right, so its agreement swings far from the same-form figure.

    python jobs/judge_form_probe.py JUDGE_DIR [JUDGE_DIR ...] [-c jobs/configs/smol_rlaif.yaml]

Prints one table per judge: agreement with the checker (the both-orders average prefers the right answer), position
consistency and first-slot rate per (right form, wrong form). A few minutes per judge on 2 CPU cores (transformers,
no vLLM); figures in docs/feedback.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

CONFIG = Path(__file__).resolve().parent / "configs" / "smol_rlaif.yaml"
FORMS = {"bare": "{n}", "equals": "{a} + {b} equals {n}.", "equation": "{a} + {b} = {n}",
         "sentence": "The answer is {n}."}
CROSSED = [("bare", "equals"), ("equals", "bare"), ("equation", "sentence"), ("sentence", "equation")]


def probe_pairs(seed: int = 0, max_operand: int = 9) -> dict[tuple[str, str], list[tuple[str, str, str, float]]]:
    """(right form, wrong form) -> (prompt, right answer, wrong answer, 1.0) for every sum; the wrong number is the sum
    off by a seeded 1-3 or 10, the same for every form of one sum."""
    import numpy as np

    from rlaif_ray.worlds.smol import QUESTION
    rng = np.random.default_rng(seed)
    sums = [(a, b) for a in range(1, max_operand + 1) for b in range(1, max_operand + 1)]
    wrong = {}
    for a, b in sums:
        offsets = [d for d in (-3, -2, -1, 1, 2, 3, 10) if a + b + d >= 0]
        wrong[a, b] = a + b + offsets[int(rng.integers(len(offsets)))]
    cells = [(f, f) for f in FORMS] + CROSSED
    return {(r, w): [(QUESTION.format(a=a, b=b), FORMS[r].format(a=a, b=b, n=a + b),
                      FORMS[w].format(a=a, b=b, n=wrong[a, b]), 1.0) for a, b in sums] for r, w in cells}


def probe(judge: str, cfg) -> dict[tuple[str, str], dict]:
    """verdict_quality of `judge` on every cell of `probe_pairs`."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlaif_ray.data.chat import resolve_template
    from rlaif_ray.judge.reply import concrete_labels, label_token_ids
    from rlaif_ray.judge.tuning import judge_examples, label_probs, pair_orders, verdict_quality
    tokenizer = AutoTokenizer.from_pretrained(judge)
    model = AutoModelForCausalLM.from_pretrained(judge, dtype=torch.float32).eval()
    template = resolve_template(cfg.critic.chat_template, tokenizer, "critic.chat_template")
    critic = concrete_labels(cfg.critic, tokenizer)
    label_ids = label_token_ids(tokenizer, list(critic.pairwise_labels), judge)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    out = {}
    for cell, pairs in probe_pairs(cfg.loop.seed, cfg.smol.max_operand).items():
        examples, _ = judge_examples(pairs, critic, tokenizer, template, cfg.loop.seed)
        kept, both = pair_orders(examples, *label_probs(model, examples, label_ids, pad, "cpu"))
        out[cell] = verdict_quality(both[:, :, 0], np.ones(len(kept)), both[:, :, 1], critic.min_label_mass)
    return out


def main() -> None:
    from rlaif_ray.config import load_config
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("judges", nargs="+", help="judge folders (Hugging Face), e.g. ~/.cache/rlaif_ray/smol/judge-*")
    parser.add_argument("-c", "--config", default=str(CONFIG), help="the run config whose critic prompts are read")
    args = parser.parse_args()
    cfg = load_config(args.config)
    for judge in args.judges:
        print(f"\n{judge}\n| right answer | wrong answer | agreement | position consistency | first-slot rate |\n"
              "|---|---|---|---|---|", flush=True)
        for (right, wrong), q in probe(judge, cfg).items():
            print(f"| {right} | {wrong} | {q['agreement']:.3f} | {q['position_consistency']:.3f} | "
                  f"{q['first_slot_rate']:.3f} |", flush=True)


if __name__ == "__main__":
    main()

"""jobs/judge_form_probe.py: right and wrong answers to the smol sums in several forms, judged in both orders."""
from __future__ import annotations

import re
from pathlib import Path

from rlaif_ray.data.checkers import last_number
from tests.conftest import job_module

ROOT = Path(__file__).resolve().parents[1]


def test_probe_pairs_differ_in_number_or_form_as_the_cell_says():
    probe = job_module("judge_form_probe")
    cells = probe.probe_pairs(seed=0, max_operand=3)
    assert set(cells) == {(f, f) for f in probe.FORMS} | set(probe.CROSSED)
    wrong_numbers = set()
    for (right, wrong), pairs in cells.items():
        assert len(pairs) == 9
        for prompt, chosen, rejected, label in pairs:
            reference = str(sum(int(x) for x in re.findall(r"\d+", prompt)))
            assert last_number(chosen, reference) and not last_number(rejected, reference) and label == 1.0
            if right == wrong:  # the same form: only the number differs
                assert re.sub(r"\d+", "N", chosen) == re.sub(r"\d+", "N", rejected)
            wrong_numbers.add((prompt, re.findall(r"\d+", rejected)[-1]))
    assert len(wrong_numbers) == 9  # one wrong number per sum, whatever the form


def test_the_untuned_smol_judge_leans_to_slot_one_in_every_form(smol_world):
    """Untuned SmolLM2 picks slot 1 whatever the answers (docs/feedback.md): the probe, reading P(slot 1) from the two
    label tokens of the config's judge prompt, sees that lean in every cell."""
    from rlaif_ray.config import load_config
    probe = job_module("judge_form_probe")
    cfg = load_config(ROOT / "jobs" / "configs" / "smol_rlaif.yaml", ["smol.max_operand=3"])
    figures = probe.probe(smol_world.model, cfg)
    assert set(figures) == set(probe.probe_pairs(0, 3))
    for cell, q in figures.items():
        assert q["pairs"] == 9 and q["first_slot_rate"] >= 0.9, (cell, q)

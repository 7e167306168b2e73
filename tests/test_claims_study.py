"""The claims study (`jobs/claims_study.py`): simulated raters, the position-bias figures on constructed labels, and
the job end to end on a tiny setting (one RLHF run on a simulated human file, the toy judge's position figures)."""
import json
from pathlib import Path

import pyarrow as pa
import pytest

from rlaif_ray.data.checkers import make_checker
from rlaif_lab import claims
from tests.conftest import job_module

ROOT = Path(__file__).resolve().parents[1]


def rollouts(responses_per_prompt):
    rows = [(f"p{k}", f"{k}+{k}=", str(2 * k), r) for k, rs in enumerate(responses_per_prompt) for r in rs]
    return pa.Table.from_pydict({"sample_id": [f"s{n}" for n in range(len(rows))],
                                 "prompt_id": [r[0] for r in rows], "prompt": [r[1] for r in rows],
                                 "reference": [r[2] for r in rows], "response": [r[3] for r in rows]})


def test_simulated_raters_decide_only_pairs_with_one_right_answer_and_err_at_the_noise_rate():
    table = rollouts([[" 0", " 1", " 0"], [" 2", " 2"], [" 5", " 6"]] * 1)
    assert claims.decided_pairs(table, make_checker("exact")) == [(0, 1), (2, 1)]  # (right, wrong); ties skipped
    clean = claims.simulated_rater_rows(table, make_checker("exact"), 0.0, seed=0)
    assert [(r["chosen"], r["rejected"]) for r in clean] == [(" 0", " 1"), (" 0", " 1")]
    many = rollouts([[f" {2 * k}", f" {2 * k + 1}"] for k in range(2000)])  # each prompt: one right, one wrong
    noisy = claims.simulated_rater_rows(many, make_checker("exact"), 0.25, seed=1)
    wrong = [int(r["chosen"]) % 2 == 1 for r in noisy]
    assert len(noisy) == 2000 and 0.22 < sum(wrong) / len(noisy) < 0.28
    refs = dict(zip(many.column("prompt").to_pylist(), many.column("reference").to_pylist()))
    assert claims.file_truth_agreement(noisy, make_checker("exact"), refs) == pytest.approx(1 - sum(wrong) / 2000)


def labels(slot1_probs):
    """Two responses to "1+1=", the first right; `slot1_probs`: P(slot 1 wins) with a first, then with b first."""
    p_ab, p_ba = slot1_probs
    win_a = (p_ab + 1 - p_ba) / 2
    return pa.Table.from_pydict({
        "sample_id": ["a", "b"], "prompt": ["1+1="] * 2, "response": [" 2", " 3"], "reference": ["2", "2"],
        "label_valid": [True, True], "pair_partner_ids": [["b"], ["a"]], "pair_win_probs": [[win_a], [1 - win_a]],
        "pair_slot1_probs": [[p_ab], [p_ba]]})


@pytest.mark.parametrize("probs, one, both, consistent", [
    ((0.9, 0.2), 1.0, 1.0, 1.0),   # right in both orders
    ((0.9, 0.9), 0.5, 0.5, 0.0),   # always slot 1: one order is right half the time, the average is a tie
    ((0.9, 0.6), 0.5, 1.0, 0.0),   # slot-1-biased but leaning right: averaging both orders fixes it
])
def test_one_order_against_both_orders(probs, one, both, consistent):
    figures = claims.order_agreement(labels(probs), make_checker("exact"))
    assert (figures["one_order"], figures["both_orders"], figures["position_consistency"]) == (one, both, consistent)
    assert figures["decided_pairs"] == 1


def test_claims_study_on_a_tiny_setting(tmp_path, ray_cluster, toy_world):
    claims_study = job_module("claims_study")
    out = tmp_path / "claims"
    assert claims_study.main(["--claims", "1,3", "--runs", "rlhf_rm", "--widths", "64", "--out", str(out),
                              "-c", str(ROOT / "jobs/configs/toy_cpu.yaml"), "loop.num_steps=2",
                              "loop.eval_samples=1", "reward.warmup_steps=10", "rollout.max_new_tokens=4"]) == 0
    study = json.loads((out / "claims.json").read_text())
    one = study["claims"]["1"]
    files = one["files"]
    human = [json.loads(line) for line in Path(files["human"]).read_text().splitlines()]
    assert len(human) == files["human_pairs"] == one["batch"]["decided_pairs"] > 20  # one row per decided pair
    assert 0.6 < files["human_truth_agreement"] < 0.9  # raters wrong a quarter of the time
    run = one["runs"]["rlhf_rm"]
    seen = run["per_seed"][0]["reward_model_labels"]
    assert seen["file"]["path"] == files["human"] and seen["trained_on_judge"] == 0 == seen["judge_pairs"]
    assert seen["trained_on_file"] == 10 * 32 and seen["file"]["sources"] == {"human (simulated, rater noise 0.25)":
                                                                               files["human_pairs"]}
    assert 0 <= run["rm_truth_agreement"] <= 1 and run["win_rate"] is not None and run["seeds"] == [0]
    summary = json.loads((out / "runs" / "rlhf_rm-s0" / "summary.json").read_text())
    assert "critic" not in summary["dispatched"] and "critic" not in summary["placement"]  # label_share 0: no judge
    assert "judge_report" not in summary and summary["dispatched"]["rollout"] == [2]
    judge = study["claims"]["3"]["judges"]["toy critic 64"]
    assert judge["decided_pairs"] == one["batch"]["decided_pairs"] and judge["self_reference"] is not None
    md = (out / "claims.md").read_text()
    assert "## 1. RLAIF vs RLHF" in md and "## 3. Position bias" in md and "| rlhf_rm |" in md
    assert any(word in md for word in ("holds here", "does not hold here", "not measurable here"))
    assert (out / "claims.png").stat().st_size > 10_000
    (out / "claims.png").unlink()
    (out / "claims.md").unlink()
    assert claims_study.main(["--report-only", "--out", str(out)]) == 0  # tables and plot again from claims.json
    assert (out / "claims.md").read_text() == md and (out / "claims.png").is_file()
    assert claims_study.main(["--report-only", "--out", str(tmp_path / "none")]) == 2
    assert claims_study.main(["--claims", "5", "--out", str(out)]) == 2  # a clear error, nothing run
    assert claims_study.main(["--rater-noise", "0.6", "--out", str(out)]) == 2


def smol_section(tuned_gain: float) -> dict:
    judge = lambda label, one, both, pc, fs: {"label": label, "one_order": one, "both_orders": both,  # noqa: E731
                                               "position_consistency": pc, "first_slot_rate": fs, "self_reference": 0.5,
                                               "decided_pairs": 40, "unparsable_share": 0.0}
    run = lambda claim, after, **extra: {"claim": claim, "label": "r", "before_sampled": 0.4, "before_greedy": 0.8,  # noqa: E731
                                         "accuracy_sampled": after, "accuracy_greedy": 0.8, "win_rate": 0.6, **extra}
    section = {"config": "jobs/configs/smol_rlaif.yaml", "seed": 0,
               "batch": {"samples": 240, "prompts": 60, "decided_pairs": 40},
               "judges": {"untuned": judge("untuned", 0.5, 0.5, 0.0, 1.0), "tuned": judge("tuned", 0.85, 0.9, 0.8, 0.5)},
               "files": {"ai_pairs": 300, "ai_truth_agreement": 0.9, "human_pairs": 40, "human_truth_agreement": 0.75},
               "runs": {"rlaif_tuned": run("2", 0.4 + tuned_gain), "rlaif_untuned": run("2", 0.3),
                        "rlaif_rm": run("1", 0.7, rm_truth_agreement=0.9), "rlhf_rm": run("1", 0.6, rm_truth_agreement=0.7)}}
    section["verdicts"] = job_module("claims_smol").verdicts(section)
    return section


def test_the_smol_claims_read_their_verdicts_from_the_figures(tmp_path):
    held = smol_section(tuned_gain=0.4)["verdicts"]
    assert len(held) == 4 and all("**holds here**" in v for v in held[1:])
    assert "**does not hold here**" not in held[0] and "both orders" in held[0]  # 0.5 vs 0.5: averaging is no worse
    worse = smol_section(tuned_gain=-0.2)["verdicts"]  # the tuned judge's policy gained less than the untuned one's
    assert "a better labeler gives a better policy" in worse[2] and "**does not hold here**" in worse[2]
    section = smol_section(0.4)
    for name, after in (("rlaif_rm", 0.2), ("rlhf_rm", 0.1)):  # both below the initial 0.4: both reward models exploited
        section["runs"][name]["accuracy_sampled"] = after
    exploited = job_module("claims_smol").verdicts(section)[-1]
    assert "**not measurable here**" in exploited and "reward models were exploited" in exploited
    claims_study = job_module("claims_study")
    study = {"config": "jobs/configs/toy_cpu.yaml", "overrides": [], "seeds": [0], "rater_noise": 0.25, "steps": 24,
             "claims": {}, "smol": smol_section(0.4), "wall_seconds": 3600}
    (tmp_path / "claims.json").write_text(json.dumps(study))
    assert claims_study.main(["--report-only", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "claims.md").read_text()
    assert "## On the real policy: SmolLM2-135M-Instruct" in md and "| rlhf_rm |" in md and "0.400 → **0.800**" in md
    assert (tmp_path / "claims_smol.png").stat().st_size > 10_000 and not (tmp_path / "claims.png").exists()
    assert claims_study.main(["--no-toy", "--out", str(tmp_path)]) == 2  # --no-toy alone: nothing to run

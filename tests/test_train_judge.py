"""`rlaif-ray train-judge` (issue 27): the judge is tuned on exactly the prompt, label tokens and answer position the
labeler reads, so the labeler's P(slot 1) from the tuned judge (a real vLLM engine in a CriticLabeler) equals the
probability training computed; bad preference rows stop it with the file, row and field."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray

ROOT = Path(__file__).resolve().parents[1]


def toy_pairs(prompts_path: str, n: int) -> list[dict]:
    """Pairs of the toy world's sums: the right answer chosen over a wrong one."""
    rows = [json.loads(line) for line in Path(prompts_path).read_text().splitlines()][:n]
    out = []
    for i, r in enumerate(rows):
        right, wrong = f" {r['reference']}", f" {int(r['reference']) + 1 + i % 3}"
        out.append({"prompt": r["prompt"], "chosen": right, "rejected": wrong})
    return out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlaif_ray.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, toy_world):
    folder = tmp_path_factory.mktemp("judge")
    prefs = folder / "prefs.jsonl"
    pairs = toy_pairs(toy_world.prompts, 30)
    prefs.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    out = folder / "tuned"
    proc = run_cli("train-judge", str(prefs), "--out", str(out), "model.critic=toy", "judge_training.epochs=2",
                   "judge_training.learning_rate=2e-4", "judge_training.batch_size=8", "judge_training.held_out=0.2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "judge_report.json").read_text()), pairs


def test_train_judge_writes_a_judge_folder_and_a_report(tuned):
    out, report, _ = tuned
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    # 30 prompts: 6 held out, 2 of the other 24 set aside for the position calibration (judge_training.calibration)
    assert report["pairs"] == {"train": 22, "held_out": 6, "calibration": 2, "too_long": 0}
    assert len(report["epoch_losses"]) == 2 and report["epoch_losses"][1] < report["epoch_losses"][0]
    for key in ("agreement", "position_consistency", "first_slot_rate", "brier"):
        assert key in report["held_out_before"] and key in report["held_out_after"]
        assert key in report["held_out_calibrated"]
    calibration = json.loads((out / "judge_calibration.json").read_text())
    assert calibration["slot1_log_odds_offset"] == pytest.approx(report["position_offset"], abs=1e-6)
    assert calibration["method"] == "pairwise" and calibration["pairs"] == 2
    assert "| agreement |" in (out / "judge_report.md").read_text()
    assert "Position calibration" in (out / "judge_report.md").read_text()


def test_the_labeler_reads_what_training_optimised(tuned, ray_cluster):
    """On a pair it trained on, the CriticLabeler on the tuned folder reads, in both orders, the P(slot 1) the
    training code computes, with the folder's position offset taken off its log-odds when asked
    (critic.position_calibration=auto; the default, none, reads the raw verdict), and it prefers the chosen answer in
    both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlaif_ray.config import CriticConfig
    from rlaif_ray.data.chat import resolve_template
    from rlaif_ray.engine import engine_env
    from rlaif_ray.judge.calibration import shift_slot1
    from rlaif_ray.judge.reply import concrete_labels, label_token_ids
    from rlaif_ray.judge.tuning import judge_examples, label_logits
    from rlaif_ray.stages.critic import CriticLabeler
    from tests.conftest import small_config
    from tests.test_actors import rollout_table

    from rlaif_ray.judge.trainer import split_by_prompt
    out, _, pairs = tuned
    first_trained = split_by_prompt([p["prompt"] for p in pairs], 0.2, 0)[0][0]
    prompt, a, b = (pairs[first_trained][k] for k in ("prompt", "chosen", "rejected"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    critic = concrete_labels(CriticConfig(), tokenizer)
    examples, _ = judge_examples([(prompt, a, b, 1.0)], critic, tokenizer, resolve_template("auto", tokenizer))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with __import__("torch").no_grad():
        trained = label_logits(model, examples, label_token_ids(tokenizer, critic.pairwise_labels, str(out)), 0, "cpu")
    trained = trained.softmax(-1)[:, 0].numpy()  # P(slot 1) with a first, then with b first
    offset = json.loads((out / "judge_calibration.json").read_text())["slot1_log_odds_offset"]
    assert abs(offset) > 0.05  # else reading it or not would look the same below
    calibrated = shift_slot1(trained, offset)

    cfg = small_config(critic={"position_calibration": "auto"})
    labeler = CriticLabeler.options(num_cpus=1, runtime_env={"env_vars": engine_env(cfg.engine_for("critic"))}).remote(
        str(out), cfg.model_dump())
    try:
        table, _ = ray.get(labeler.label.options(num_returns=2).remote(rollout_table([a, b], prompt=prompt)))
    finally:
        ray.kill(labeler)
    read = [row["pair_slot1_probs"][0] for row in table.to_pylist()]  # row a: a in slot 1; row b: b in slot 1
    assert np.allclose(read, calibrated, atol=2e-3), (read, calibrated, trained)
    assert calibrated[0] > 0.5 > calibrated[1]  # the direction training was given, in both orders


def test_the_symmetry_term_penalises_position_bias_only_and_batches_keep_pairs_whole():
    """judge_training.symmetry: (z₁ + z₂)² over a pair's two orders is 0 for mirrored verdicts whatever their margin,
    positive for a judge that picks slot 1 in both orders, and its gradient lowers both orders' slot-1 log-odds; the
    batches it trains on hold both orders of every pair, every judge prompt once."""
    import torch

    from rlaif_ray.judge.tuning import JudgeExample, pair_batches, pair_symmetry
    examples = [JudgeExample([1], 1.0 - order, pair, order) for pair in range(7) for order in (0, 1)]
    mirrored = torch.log_softmax(torch.tensor([[3.0, 0.0], [0.0, 3.0]] * 7), -1)
    assert float(pair_symmetry(mirrored, examples)) == pytest.approx(0.0, abs=1e-6)
    slot_one = torch.tensor([[2.0, 0.0], [1.0, 0.0]] * 7, requires_grad=True)  # slot 1 in both orders: z 2 and 1
    penalty = pair_symmetry(torch.log_softmax(slot_one, -1), examples)
    assert float(penalty.detach()) == pytest.approx(9.0, rel=1e-5)
    penalty.backward()
    assert (slot_one.grad[:, 0] > 0).all() and (slot_one.grad[:, 1] < 0).all()
    assert float(pair_symmetry(mirrored[:1], examples[:1])) == 0.0  # no whole pair: nothing to compare
    batches = pair_batches(examples, 4, np.random.default_rng(0))
    assert [len(b) for b in batches] == [4, 4, 4, 2]
    assert sorted((e.pair, e.order) for b in batches for e in b) == sorted((e.pair, e.order) for e in examples)
    assert all(sorted(e.order for e in b if e.pair == k) == [0, 1] for b in batches for k in {e.pair for e in b})


@pytest.fixture(scope="module")
def tuned_direct(tmp_path_factory, toy_world):
    """The toy critic tuned on the direct (1-K) scale from graded single answers: right 1, wrong 0."""
    folder = tmp_path_factory.mktemp("direct")
    graded = folder / "graded.jsonl"
    pairs = toy_pairs(toy_world.prompts, 30)
    rows = [{"prompt": r["prompt"], "response": r[side], "grade": float(side == "chosen")}
            for r in pairs for side in ("chosen", "rejected")]
    graded.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = folder / "tuned"
    proc = run_cli("train-judge", str(graded), "--out", str(out), "model.critic=toy", "critic.method=direct",
                   "reward.kind=direct_score",
                   "judge_training.epochs=2", "judge_training.learning_rate=2e-4", "judge_training.batch_size=8",
                   "judge_training.held_out=0.2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "judge_report.json").read_text()), rows


def test_the_direct_labeler_reads_the_score_training_optimised(tuned_direct, ray_cluster):
    """critic.method=direct: train-judge reads graded answers, tunes the 1-K score, and a CriticLabeler on the tuned
    folder reads Σ i·P(i) as training computes it on an answer it trained on, the right answer above the wrong."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlaif_ray.config import CriticConfig
    from rlaif_ray.data.chat import resolve_template
    from rlaif_ray.judge.reply import concrete_labels, label_token_ids
    from rlaif_ray.judge.trainer import split_by_prompt
    from rlaif_ray.judge.tuning import direct_examples, label_logits
    from rlaif_ray.stages.critic import CriticLabeler
    from tests.conftest import small_config
    from tests.test_actors import rollout_table

    out, report, rows = tuned_direct
    assert report["method"] == "direct" and report["pairs"] == {"train": 48, "held_out": 12, "too_long": 0}
    assert report["epoch_losses"][1] < report["epoch_losses"][0]
    assert {"agreement", "pearson", "mae", "label_mass"} <= set(report["held_out_after"])
    assert "| pearson |" in (out / "judge_report.md").read_text()
    trained_row = split_by_prompt([r["prompt"] for r in rows], 0.2, 0)[0][0]  # a prompt trained on: right, wrong
    prompt, right, wrong = rows[trained_row]["prompt"], rows[trained_row]["response"], rows[trained_row + 1]["response"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    critic = concrete_labels(CriticConfig(method="direct"), tokenizer)
    examples, _ = direct_examples([(prompt, right, 1.0), (prompt, wrong, 0.0)], critic, tokenizer,
                                  resolve_template("auto", tokenizer))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logp = label_logits(model, examples, label_token_ids(tokenizer, critic.direct_labels, str(out)), 0, "cpu")
    trained = (logp.softmax(-1) * torch.arange(1, logp.shape[1] + 1)).sum(-1).numpy()

    cfg = small_config(critic={"method": "direct", "backend": "transformers"}, reward={"kind": "direct_score"})
    labeler = CriticLabeler.options(num_cpus=1).remote(str(out), cfg.model_dump())
    try:
        table, _ = ray.get(labeler.label.options(num_returns=2).remote(rollout_table([right, wrong], prompt=prompt)))
    finally:
        ray.kill(labeler)
    read = table.column("judge_score").to_pylist()
    assert np.allclose(read, trained, atol=2e-2), (read, trained)
    assert trained[0] > trained[1]  # the direction training was given


def test_the_direct_targets_and_figures_and_a_split_by_prompt():
    """score_targets puts each grade's expected score, what the labeler reads, at 1 + grade·(K − 1); score_quality's
    figures on a hand-worked case; held-out rows take whole prompts."""
    import torch

    from rlaif_ray.judge.trainer import split_by_prompt
    from rlaif_ray.judge.tuning import score_quality, score_targets
    for n in (2, 5, 10):
        grades = torch.tensor([0.0, 1 / 3, 0.5, 0.9, 1.0])
        targets = score_targets(grades, n)
        assert torch.allclose(targets.sum(-1), torch.ones(5)) and (targets >= 0).all()
        assert torch.allclose(targets @ torch.arange(1.0, n + 1), 1 + grades * (n - 1), atol=1e-6)
        assert targets[0, 0] == 1 and targets[-1, -1] == 1
    q = score_quality(np.array([9.0, 2.0, 6.0, 4.0]), np.array([1.0, 0.0, 0.0, 0.5]), 9)
    assert q["agreement"] == pytest.approx(2 / 3) and q["mae"] == pytest.approx((0 + 1 / 8 + 5 / 8 + 1 / 8) / 4)
    assert q["pearson"] > 0 and q["mean_score"] == 5.25
    prompts = ["a", "b", "a", "c", "b", "d", "e"]
    train, held = split_by_prompt(prompts, 0.4, 0)
    assert sorted(train + held) == list(range(7)) and not {prompts[i] for i in train} & {prompts[i] for i in held}
    assert len({prompts[i] for i in held}) == 2


def test_the_symmetry_term_is_refused_on_the_direct_scale():
    from rlaif_ray.config import ConfigError
    from rlaif_ray.judge.trainer import JudgeTrainer
    from tests.conftest import small_config
    cfg = small_config(critic={"method": "direct"}, reward={"kind": "direct_score"}, judge_training={"symmetry": 0.5})
    with pytest.raises(ConfigError, match="judge_training.symmetry"):
        JudgeTrainer("/nonexistent/judge", cfg)


def test_bad_graded_rows_name_the_file_row_and_field(tmp_path):
    from rlaif_ray.data.graded import read_graded_file
    from rlaif_ray.data.prompts import PromptFileError  # what every input file's row error is (the CLI exits 2)
    bad = tmp_path / "graded.jsonl"
    for row, field in (({"prompt": "1+1=", "response": " 2", "grade": 1.7}, "'grade'"),
                       ({"prompt": "1+1=", "grade": 1}, "'response'"), ({"response": " 2", "grade": 0}, "'prompt'"),
                       ({"prompt": "1+1=", "response": " 2"}, "'grade' is missing")):
        bad.write_text(json.dumps({"prompt": "1+2=", "response": " 3", "grade": 1}) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(PromptFileError, match="row 2") as err:
            read_graded_file(bad)
        assert str(bad) in str(err.value) and field in str(err.value)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1="}], "response": " 2", "grade": 0.5,
                               "note": "x"}) + "\n")
    rows, stats = read_graded_file(bad)
    assert rows == [("1+1=", " 2", 0.5)] and stats["unused_fields"] == {"note": 1}


def test_bad_preference_rows_name_the_file_row_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1=", "chosen": " 2", "rejected": " 3"}) + "\n"
                   + json.dumps({"prompt": "1+2=", "chosen": " 3", "rejected": " 4", "label": 1.7}) + "\n")
    proc = run_cli("train-judge", str(bad), "--out", str(tmp_path / "out"), "model.critic=toy")
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "row 2" in proc.stderr and "'label'" in proc.stderr


def test_the_smol_judge_is_built_once_per_judge_prompt(tmp_path, smol_world):
    """model.critic=smol_judge on a tiny task: SmolLM2 answers sums outside the RL set, the checker grades the answers,
    the judge is tuned on the pairs (a child process: vLLM, then one DeepSpeed rank) and cached under a key of the
    judge's prompts; a second resolve reuses the folder, and other judge prompts get their own."""
    from rlaif_ray.config import load_config
    from rlaif_ray.runtime.inputs import built_in_worlds
    from rlaif_ray.worlds.smol_judge import build_smol_judge, judge_key
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / smol_world.root.name).symlink_to(smol_world.root)  # the converted model, not converted again
    overrides = [f"smol.cache_dir={cache}", "smol.max_operand=3", "smol.judge_max_operand=9",
                 "smol.held_out=2", "smol.judge_max_prompts=12", "smol.judge_samples=4", "judge_training.epochs=1",
                 "smol.judge_calibration_prompts=6", "smol.judge_counterfactuals=both",
                 "judge_training.batch_size=8", "model.critic=smol_judge", f"output.run_dir={tmp_path / 'run'}"]
    cfg = load_config(ROOT / "jobs" / "configs" / "smol_rlaif.yaml", overrides)
    messages = []
    folder = Path(build_smol_judge(cfg, progress=messages.append))
    assert folder == cache / f"judge-{judge_key(cfg)}" and (folder / "config.json").is_file()
    report = json.loads((folder / "judge_report.json").read_text())
    assert report["pairs"]["train"] > 0 and report["pairs"]["held_out"] > 0
    after = report["held_out_after"]
    assert set(after) >= {"agreement", "position_consistency", "first_slot_rate", "brier", "label_mass"}
    assert after["unparsable_share"] == 0  # the labels keep the answer's probability: the labeler reads every verdict
    assert "| agreement |" in (folder / "judge_report.md").read_text() and len(messages) == 2
    assert report["pairs"]["calibration"] > 0  # right-vs-wrong pairs of SmolLM2's answers to the calibration sums
    assert report["held_out_calibrated"]["first_slot_rate"] is not None
    assert json.loads((folder / "judge_calibration.json").read_text())["slot1_log_odds_offset"] == \
        pytest.approx(report["position_offset"], abs=1e-6)
    assert "taken off" in messages[-1]
    trained = report["preferences"]["train"]  # smol.judge_counterfactuals=both: the twins are trained on
    assert trained["minimal_pairs"] > 0 and trained["flipped_pairs"] > 0
    assert report["pairs"]["train"] == trained["pairs"] + trained["minimal_pairs"] + trained["flipped_pairs"]
    for kind in ("minimal", "flipped"):  # measured on the held-out answers' twins whatever is trained on
        twin = report["held_out_twins"][kind]
        assert twin["pairs"] > 0 and twin["after"]["agreement"] is not None
        assert f"held-out {kind} pairs" in (folder / "judge_report.md").read_text()
    built = (folder / "config.json").stat().st_mtime_ns
    assert built_in_worlds(cfg)[1] == str(folder)  # reused: not built again
    assert (folder / "config.json").stat().st_mtime_ns == built and not list(cache.glob("judge-*.*/"))
    other = load_config(ROOT / "jobs" / "configs" / "smol_rlaif.yaml",
                        [*overrides, "critic.pairwise_ending=Which answer is right? Reply 1 or 2."])
    assert judge_key(other) != judge_key(cfg)
    for setting in ("smol.judge_tie_share=0.5", "judge_training.symmetry=0.25", "judge_training.learning_rate=1e-4",
                    "smol.judge_calibration_prompts=7", "smol.judge_counterfactuals=flipped"):
        assert judge_key(load_config(ROOT / "jobs" / "configs" / "smol_rlaif.yaml", [*overrides, setting])) != \
            judge_key(cfg), setting


def test_checker_pairs_add_ties_up_to_their_share():
    """The smol judge's training pairs: right over wrong (label 1) per question, then ties (two distinct answers the
    checker grades the same, label 0.5) up to smol.judge_tie_share of them, never two copies of one answer."""
    from rlaif_ray.worlds.smol_judge import checker_pairs
    questions = [(f"What is {k} + 1?", str(k + 1)) for k in range(1, 9)]
    answers = [[str(k + 1), f"It is {k + 1}", str(k + 3), str(k + 4), str(k + 3)] for k in range(1, 9)]
    rows, counts = checker_pairs(questions, answers, per_prompt=2, tie_share=0.25, seed=0)
    decided = [r for r in rows if r["label"] == 1.0]
    ties = [r for r in rows if r["label"] == 0.5]
    assert len(decided) == 16 and counts == {"prompts": 8, "answers": 40, "right_share": 0.4, "pairs": 16,
                                             "tie_pairs": 4}
    assert len(ties) == 4 and all(r["chosen"] != r["rejected"] and r["source"] == "checker_tie" for r in ties)
    for r in ties:  # both right (two distinct right answers exist in every question here)
        k = int(r["prompt"].split()[2])
        assert {r["chosen"], r["rejected"]} == {str(k + 1), f"It is {k + 1}"}
    assert checker_pairs(questions, answers, per_prompt=2, tie_share=0.0)[0] == decided


def test_minimal_pairs_differ_in_the_number_only():
    """The smol judge's counterfactual twins: each right answer (at most per_prompt, distinct) is chosen over itself
    with its last number made wrong, preferring numbers the model gave wrongly to that question; the checker grades
    the chosen answer right and the twin wrong, and nothing but that number differs."""
    import re

    from rlaif_ray.data.checkers import last_number
    from rlaif_ray.worlds.smol_judge import minimal_pairs, with_last_number
    questions = [("What is 7 + 8?", "15"), ("What is 1 + 1?", "2"), ("What is 2 + 2?", "4")]
    answers = [["7 + 8 equals 15.", "15", "It is 16", "7 + 8 equals 15.", "15 apples, or 15"],
               ["2", "The answer is 2.", "1 + 1 = 2", "no idea"],
               ["5", "six"]]  # no right answer: no twin
    rows = minimal_pairs(questions, answers, per_prompt=2, seed=0)
    assert [(r["prompt"], r["chosen"]) for r in rows] == [
        ("What is 7 + 8?", "7 + 8 equals 15."), ("What is 7 + 8?", "15"),
        ("What is 1 + 1?", "2"), ("What is 1 + 1?", "The answer is 2.")]
    assert rows[0]["rejected"] == "7 + 8 equals 16."  # the model's own wrong number first
    for (question, reference), r in ((questions[0], rows[0]), (questions[0], rows[1]), (questions[1], rows[2]),
                                     (questions[1], rows[3])):
        assert last_number(r["chosen"], reference) and not last_number(r["rejected"], reference)
        assert re.sub(r"\d+", "N", r["chosen"]) == re.sub(r"\d+", "N", r["rejected"])
        assert r["label"] == 1.0 and r["source"] == "checker_minimal"
    assert with_last_number("15 apples, or 15", 3) == "15 apples, or 3"
    assert minimal_pairs(questions, answers, per_prompt=2, seed=0) == rows  # seeded
    assert len(minimal_pairs(questions, answers, per_prompt=1)) == 2


def test_flipped_pairs_swap_the_numbers_of_a_pair():
    """Each right-vs-wrong pair flipped: the wrong answer with the right number over the right answer with the wrong
    number, so each form wins once; a wrong answer without a number gives no flipped pair."""
    from rlaif_ray.data.checkers import last_number
    from rlaif_ray.worlds.smol_judge import checker_pairs, flipped_pairs
    questions = [("What is 7 + 8?", "15"), ("What is 1 + 1?", "2")]
    answers = [["7 + 8 equals 15.", "15", "It is 16", "no idea"], ["2", "The answer is 3."]]
    rows, _ = checker_pairs(questions, answers, per_prompt=2)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("7 + 8 equals 15.", "It is 16"), ("15", "no idea"),
                                                            ("2", "The answer is 3.")]
    flipped = flipped_pairs(questions, rows)
    assert [(r["chosen"], r["rejected"]) for r in flipped] == [("It is 15", "7 + 8 equals 16."),
                                                               ("The answer is 2.", "3")]
    for r in flipped:
        reference = dict(questions)[r["prompt"]]
        assert last_number(r["chosen"], reference) and not last_number(r["rejected"], reference)
        assert r["label"] == 1.0 and r["source"] == "checker_flipped"

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
    assert report["pairs"] == {"train": 24, "held_out": 6, "too_long": 0}
    assert len(report["epoch_losses"]) == 2 and report["epoch_losses"][1] < report["epoch_losses"][0]
    for key in ("agreement", "position_consistency", "first_slot_rate", "brier"):
        assert key in report["held_out_before"] and key in report["held_out_after"]
    assert "| agreement |" in (out / "judge_report.md").read_text()


def test_the_labeler_reads_what_training_optimised(tuned, ray_cluster):
    """On a pair it trained on, the CriticLabeler on the tuned folder reads, in both orders, the P(slot 1) the
    training code computes, and it prefers the chosen answer in both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlaif_ray.config import CriticConfig
    from rlaif_ray.data.chat import resolve_template
    from rlaif_ray.engine import engine_env
    from rlaif_ray.judge.reply import concrete_labels
    from rlaif_ray.judge.tuning import judge_examples, label_logits, pairwise_label_ids
    from rlaif_ray.stages.critic import CriticLabeler
    from tests.conftest import small_config
    from tests.test_actors import rollout_table

    from rlaif_ray.judge.trainer import split_pairs
    out, _, pairs = tuned
    first_trained = split_pairs(len(pairs), 0.2, 0)[0][0]
    prompt, a, b = (pairs[first_trained][k] for k in ("prompt", "chosen", "rejected"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    critic = concrete_labels(CriticConfig(), tokenizer)
    examples, _ = judge_examples([(prompt, a, b, 1.0)], critic, tokenizer, resolve_template("auto", tokenizer))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with __import__("torch").no_grad():
        trained = label_logits(model, examples, pairwise_label_ids(critic, tokenizer, str(out)), 0, "cpu")
    trained = trained.softmax(-1)[:, 0].numpy()  # P(slot 1) with a first, then with b first

    cfg = small_config()
    labeler = CriticLabeler.options(num_cpus=1, runtime_env={"env_vars": engine_env(cfg.engine_for("critic"))}).remote(
        str(out), cfg.model_dump())
    try:
        table, _ = ray.get(labeler.label.options(num_returns=2).remote(rollout_table([a, b], prompt=prompt)))
    finally:
        ray.kill(labeler)
    read = [row["pair_slot1_probs"][0] for row in table.to_pylist()]  # row a: a in slot 1; row b: b in slot 1
    assert np.allclose(read, trained, atol=2e-3), (read, trained)
    assert trained[0] > 0.5 > trained[1]  # the direction training was given, in both orders


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
    built = (folder / "config.json").stat().st_mtime_ns
    assert built_in_worlds(cfg)[1] == str(folder)  # reused: not built again
    assert (folder / "config.json").stat().st_mtime_ns == built and not list(cache.glob("judge-*.*/"))
    other = load_config(ROOT / "jobs" / "configs" / "smol_rlaif.yaml",
                        [*overrides, "critic.pairwise_ending=Which answer is right? Reply 1 or 2."])
    assert judge_key(other) != judge_key(cfg)

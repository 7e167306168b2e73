"""`rlaif-ray label`: a prompts file labelled by the judge into one Parquet file, no training."""
import json

import pyarrow.parquet as pq

import pytest

from rlaif_ray.cli import main
from rlaif_ray.data.preferences import preference_pairs, read_preference_file
from rlaif_ray.data.schemas import REWARD_SCHEMA
from rlaif_ray.stages.reward_model import labelled_pairs
from rlaif_ray.tools.label import label_prompts
from tests.conftest import small_config


def test_label_a_prompts_file_into_parquet(tmp_path, ray_cluster, toy_world):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"{i}+{i + 1}=", "reference": str(2 * i + 1)} for i in range(5)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = small_config(tmp_path, data={"prompts": str(prompts), "prompts_per_step": 2})  # 3 batches, the last short
    summary = label_prompts(cfg, str(tmp_path / "out" / "labels.parquet"))
    table = pq.read_table(tmp_path / "out" / "labels.parquet")
    assert table.schema.equals(REWARD_SCHEMA, check_metadata=False)
    assert table.num_rows == summary["samples"] == 5 * 2 and summary["prompts"] == 5
    assert list(dict.fromkeys(table.column("prompt_id").to_pylist())) == [r["id"] for r in rows]  # prompt order kept
    assert all(table.column("label_valid").to_pylist()) and None not in table.column("reward").to_pylist()
    assert summary["judge_report"]["judge_calls"] == 5 * 2 and summary["method"] == "pairwise"
    assert not (tmp_path / "out" / "labels.parquet.tmp").exists()

    # round trip: the labels as a preference file (what preferences.path reads), soft and hard
    assert main(["preferences", str(tmp_path / "out" / "labels.parquet"), "--out", str(tmp_path / "ai.jsonl")]) == 0
    prefs, stats = read_preference_file(tmp_path / "ai.jsonl")
    # what the reward model trains on from a run, less pairs of two identical answers (they teach it nothing)
    judged = {(p, a, b): w for p, a, b, w in labelled_pairs(table) if a != b}
    assert stats["identical_left_out"] == 0 and prefs.num_rows == len(judged) >= 1 and list(stats["sources"]) == [
        f"ai:{table.column('judge_model')[0].as_py()}"]
    for p, chosen, rejected, label in preference_pairs(prefs):
        assert label >= 0.5 and label == pytest.approx(judged.get((p, chosen, rejected), 1 - judged.get(
            (p, rejected, chosen), 2)), abs=1e-6)
    assert main(["preferences", str(tmp_path / "out"), "--hard", "--out", str(tmp_path / "hard.jsonl")]) == 0
    hard = read_preference_file(tmp_path / "hard.jsonl")[0]
    assert set(hard.column("label").to_pylist()) == {1.0}
    assert hard.num_rows == sum(abs(w - 0.5) > 1e-9 for w in judged.values())


def test_label_cli_names_the_bad_row(tmp_path, capsys):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "1+1="}\n{"prompt": ""}\n')
    assert main(["label", "--out", str(tmp_path / "x.parquet"), f"data.prompts={prompts}"]) == 2
    err = capsys.readouterr().err
    assert "rlaif-ray: error" in err and "bad.jsonl" in err and "2" in err
    assert not (tmp_path / "x.parquet").exists()

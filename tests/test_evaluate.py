"""`rlaif-ray eval`: the figures on constructed labels, and a real run of a checkpoint against a responses file."""
import json

import pytest

from rlaif_ray.tools.evaluate import compare, length_controlled_win_rate
from tests.test_algorithms import labelled


def test_length_controlled_win_rate_removes_a_pure_length_effect():
    # the candidate wins exactly when it is longer: its raw win rate is high, at equal length it is a coin flip
    dlen = [5, 4, 6, 5, -1, 1, -2, 2] * 4
    p = [0.95, 0.9, 0.97, 0.95, 0.1, 0.9, 0.05, 0.92] * 4
    assert sum(p) / len(p) > 0.7
    assert length_controlled_win_rate(p, dlen) == pytest.approx(0.5, abs=0.15)
    assert length_controlled_win_rate([0.9] * 8, [0] * 8) == pytest.approx(0.9, abs=0.01)
    assert length_controlled_win_rate([], []) is None


def test_compare_reads_candidate_against_reference():
    table = labelled([" 2", " 33"], [(0.8, 0.3)])  # rows s/0 (candidate) and s/1 (reference), both orders agree
    ids = ["cand/p", "ref/p"]
    table = table.set_column(0, table.schema.field("sample_id"), [ids])
    out = compare(table)
    assert out["win_rate"] == pytest.approx(0.75) and out["win_rate_hard"] == 1.0
    assert out["accuracy_candidate"] == 1.0 and out["accuracy_reference"] == 0.0
    assert out["position_consistency"] == 1.0 and out["mean_length_diff"] == -1


def test_eval_cli_against_a_responses_file(tmp_path, ray_cluster, toy_world, capsys):
    from rlaif_ray.cli import main
    responses = tmp_path / "ref.jsonl"
    rows = [json.loads(line) for line in open(toy_world.prompts)]
    # a reference that is always wrong by one: a better-than-chance judge must prefer a policy that is sometimes right
    responses.write_text("".join(json.dumps({"prompt_id": r["id"], "response": f" {int(r['reference']) + 1}"}) + "\n"
                                 for r in rows))
    out = tmp_path / "eval"
    assert main(["eval", toy_world.policy, "--reference", str(responses), "--out", str(out),
                 "output.progress=false"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["prompts"] == 100 and result["judged"] + result["unjudged"] == 100
    assert result["accuracy_reference"] == 0.0 and 0.0 <= result["win_rate"] <= 1.0
    assert result["length_controlled_win_rate"] is not None and (out / "eval.png").stat().st_size > 1000
    # bad reference file: a clear error naming the row, exit code 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_id": "add-0-0", "response": " 0"}\n{"oops": 1}\n')
    assert main(["eval", toy_world.policy, "--reference", str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl: row 2" in capsys.readouterr().err

"""Preference files (the RLHF baseline's input): the public sets' formats, bad rows named, the config's checks, and a
reward model trained on a (noisy) human file ranking chosen above rejected on held-out pairs."""
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlaif_ray.config import ConfigError, load_config
from rlaif_ray.data.preferences import (PreferenceFileError, PreferenceKeys, labels_to_preferences,
                                        preference_pairs, read_preference_file)
from rlaif_ray.data.prompts import PromptFileError


def write(tmp_path, rows, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_the_public_formats_load_to_one_table(tmp_path):
    rows = [
        {"prompt": "1+1=", "chosen": " 2", "rejected": " 3", "source": "human"},             # plain text
        {"prompt": "2+2=", "chosen": " 4", "rejected": " 5", "label": 0.8},                   # a soft label
        {"prompt": "3+3=", "chosen": " 6", "rejected": " 7", "strength": 0.5},                # a strength
        {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],  # TRL, implicit
         "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}]},
        {"messages": [{"role": "user", "content": "Sum 1 and 2"}], "chosen": "3", "rejected": "4"},
        {"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.",                           # Anthropic HH
         "rejected": "\n\nHuman: Name a colour.\n\nAssistant: No.", "annotator": "a7"},
        {"prompt": "5+5=", "chosen": " 10", "rejected": " 10"},                               # identical: left out
    ]
    table, stats = read_preference_file(write(tmp_path, rows))
    assert table.num_rows == 6 and stats["identical_left_out"] == 1
    assert stats["sources"] == {"human": 1, "unstated": 5} and stats["unused_fields"] == {"annotator": 1}
    assert table.column("label").to_pylist() == pytest.approx([1.0, 0.8, 0.75, 1.0, 1.0, 1.0])
    assert table.column("prompt").to_pylist()[3:] == ["Hi?", "Sum 1 and 2", "\n\nHuman: Name a colour.\n\nAssistant:"]
    assert table.column("chosen").to_pylist()[3:] == ["Hello!", "3", "Blue."]
    assert table.column("messages").to_pylist()[3] == [{"role": "user", "content": "Hi?"}]
    assert table.column("pair_id").to_pylist()[0] == "row1"
    assert preference_pairs(table)[1] == ("2+2=", " 4", " 5", pytest.approx(0.8))
    pq.write_table(pa.Table.from_pylist([{"q": "1+1=", "good": " 2", "bad": " 3"}]), tmp_path / "mapped.parquet")
    keys = PreferenceKeys(prompt="q", chosen="good", rejected="bad")  # preferences.*_key
    assert preference_pairs(read_preference_file(tmp_path / "mapped.parquet", keys)[0]) == [("1+1=", " 2", " 3", 1.0)]


@pytest.mark.parametrize("line, fragment", [
    ('{"prompt": "1+1=", "rejected": " 3"}', "row 2: field 'chosen' is missing or not a string"),
    ('{"prompt": "1+1=", "chosen": "", "rejected": " 3"}', "row 2: field 'chosen' is empty"),
    ('{"prompt": "1+1=", "chosen": " 2", "rejected": " 3", "label": 1.5}', "row 2: field 'label' must be a number in"),
    ('{"prompt": "1+1=", "chosen": " 2", "rejected": " 3", "label": true}', "row 2: field 'label' must be a number"),
    ('{"prompt": "1+1=", "chosen": " 2", "rejected": " 3", "label": 1, "strength": 1}', "row 2: give 'label'"),
    ('{"chosen": "Blue.", "rejected": "No."}', "row 2: no 'prompt' or 'messages' field"),
    ('{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Yo", "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: "}',
     "row 2: field 'rejected' has no reply after"),
    ('{"chosen": [{"role": "user", "content": "Hi"}], "rejected": " 3"}', "does not end with an assistant turn"),
    ('{"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}], "rejected": '
     '[{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]}', "different turns before the reply"),
    ('{"prompt": "1+1=", "chosen": " 2", "rejected": " 3", "id": "a"}', "row 2: id 'a' already used at row 1"),
    ('{"prompt": "1+1=", "chosen": " 2",', "row 2: not valid JSON"),
])
def test_bad_rows_name_the_file_row_and_field(tmp_path, line, fragment):
    path = write(tmp_path, ['{"id": "a", "prompt": "0+0=", "chosen": " 0", "rejected": " 1"}', line])
    with pytest.raises(PromptFileError, match=fragment.replace("(", r"\(")) as err:  # PreferenceFileError's base
        read_preference_file(path)
    assert str(path) in str(err.value)


def test_a_file_without_usable_pairs_and_a_missing_file(tmp_path):
    with pytest.raises(PreferenceFileError, match="no usable pairs"):
        read_preference_file(write(tmp_path, [{"prompt": "1+1=", "chosen": " 2", "rejected": " 2"}]))
    with pytest.raises(PromptFileError, match="preferences file not found"):
        read_preference_file(tmp_path / "nope.jsonl")


def test_config_checks_where_a_preference_file_is_read(tmp_path):
    path = write(tmp_path, [{"prompt": "1+1=", "chosen": " 2", "rejected": " 3"}])
    with pytest.raises(ConfigError, match="needs reward.kind=reward_model"):
        load_config(None, [f"preferences.path={path}"])
    with pytest.raises(ConfigError, match="set preferences.path"):
        load_config(None, ["reward.kind=reward_model", "reward.label_share=0"])
    with pytest.raises(ConfigError, match="set preferences.share=1"):
        load_config(None, ["reward.kind=reward_model", "reward.label_share=0", f"preferences.path={path}",
                           "preferences.share=0.5"])
    cfg = load_config(None, ["reward.kind=reward_model", "reward.label_share=0", f"preferences.path={path}"])
    assert cfg.preferences.share == 1


def test_judge_labels_become_preference_rows():
    labels = pa.Table.from_pydict({
        "sample_id": ["a", "b", "c"], "prompt": ["1+1="] * 3, "response": [" 2", " 3", " 4"],
        "judge_model": ["critic"] * 3, "label_valid": [True, True, False],
        "pair_partner_ids": [["b", "c"], ["a"], ["a"]], "pair_win_probs": [[0.3, 0.9], [0.7], [0.1]]})
    soft = labels_to_preferences(labels)  # c has no valid label: only a-b
    assert soft == [{"id": "b>a", "prompt": "1+1=", "chosen": " 3", "rejected": " 2", "label": pytest.approx(0.7),
                     "source": "ai:critic"}]
    assert labels_to_preferences(labels, hard=True)[0]["label"] == 1.0
    tie = labels.set_column(6, "pair_win_probs", pa.array([[0.5, 0.9], [0.5], [0.1]]))
    assert labels_to_preferences(tie, hard=True) == [] and labels_to_preferences(tie)[0]["label"] == 0.5
    with pytest.raises(PreferenceFileError, match="no pairwise labels"):
        labels_to_preferences(labels.drop_columns(["pair_partner_ids"]))


def _rater_pairs(rng, sums, noise):
    """Rows of raters who pick the right sum over a wrong one (often off by one), wrong `noise` of the time."""
    out = []
    for a, b in sums:
        right = a + b
        wrong = right + 1 if rng.random() < 0.5 else rng.choice([x for x in range(19) if x != right])
        good, bad = f" {right}", f" {wrong}"
        chosen, rejected = (bad, good) if rng.random() < noise else (good, bad)
        out.append({"prompt": f"{a}+{b}=", "chosen": chosen, "rejected": rejected})
    return out


def test_reward_model_trained_on_a_human_file_ranks_chosen_first_on_held_out_pairs(tmp_path, toy_world):
    import torch

    from rlaif_ray.stages.reward_model import fit_pairs, load_reward_model, ranking_accuracy
    rng = random.Random(0)
    sums = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(sums)
    train_file = write(tmp_path, _rater_pairs(rng, sums[:70] * 3, noise=0.1), "human.jsonl")  # raters 90% right
    heldout = preference_pairs(read_preference_file(
        write(tmp_path, _rater_pairs(rng, sums[70:] * 3, noise=0.0), "heldout.jsonl"))[0])  # prompts never trained on
    pairs = preference_pairs(read_preference_file(train_file)[0])
    accuracy = {}
    for name, data in (("as labelled", pairs), ("labels flipped", [(p, r, c, 1.0) for p, c, r, _ in pairs])):
        torch.manual_seed(0)
        model, tok = load_reward_model(toy_world.critic)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses, from_file, from_judge = fit_pairs(model, tok, opt, random.Random(0), data, [], 100, 32, 1.0, 0.0)
        assert (from_file, from_judge) == (100 * 32, 0)
        accuracy[name] = ranking_accuracy(model, tok, heldout)
    assert accuracy["as labelled"] >= 0.7 and accuracy["labels flipped"] <= 0.3, accuracy


def test_minibatches_mix_the_file_and_the_judge_by_the_configured_share():
    from rlaif_ray.stages.reward_model import minibatch
    rng = random.Random(0)
    file_pairs, judge_pairs = [("f", str(k), "x", 1.0) for k in range(100)], [("j", str(k), "x", 0.7) for k in range(100)]
    assert [len(part) for part in minibatch(rng, file_pairs, judge_pairs, 32, 0.25)] == [8, 24]
    assert [len(part) for part in minibatch(rng, file_pairs, [], 32, 0.25)] == [32, 0]  # one source: all from it
    assert [len(part) for part in minibatch(rng, [], judge_pairs, 32, 0.25)] == [0, 32]
    assert [len(part) for part in minibatch(rng, file_pairs[:3], judge_pairs, 32, 0.5)] == [3, 16]  # never repeats

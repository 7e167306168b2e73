import json

import pyarrow as pa
import pytest

from rlaif_ray.data import schemas
from rlaif_ray.data.prompts import PromptFileError, PromptSampler, load_prompts


def rollout_rows(n=2):
    return {
        "sample_id": [f"s{i}" for i in range(n)], "prompt_id": ["p"] * n, "group_index": list(range(n)),
        "prompt": ["1+1="] * n, "prompt_token_ids": [[1, 2]] * n, "response": [" 2"] * n,
        "response_token_ids": [[5, 2]] * n, "response_logprobs": [[-0.1, -0.2]] * n,
        "finish_reason": ["stop"] * n, "policy_version": [0] * n, "reference": ["2"] * n,
    }


def test_valid_table_is_cast_to_declared_types():
    table = pa.Table.from_pydict(rollout_rows())  # int64 / double lists: cast on validation
    out = schemas.validate(table, "rollouts")
    assert out.schema.equals(schemas.ROLLOUT_SCHEMA)
    # a table saved before token_versions existed reads as one whose tokens all come from its policy_version
    assert out.column("token_versions").null_count == out.num_rows


def test_schema_errors_name_column_and_row():
    rows = rollout_rows(3)
    with pytest.raises(schemas.SchemaError, match="missing column.*policy_version"):
        schemas.validate(pa.Table.from_pydict({k: v for k, v in rows.items() if k != "policy_version"}), "rollouts")
    bad = dict(rows, sample_id=["a", "b", "a"])
    with pytest.raises(schemas.SchemaError, match="duplicate sample_id 'a' at row 2"):
        schemas.validate(pa.Table.from_pydict(bad), "rollouts")
    bad = dict(rows, prompt=["x", None, "y"])
    with pytest.raises(schemas.SchemaError, match="'prompt' is null at row 1"):
        schemas.validate(pa.Table.from_pydict(bad), "rollouts")
    bad = dict(rows, policy_version=["v0", "v1", "v2"])
    with pytest.raises(schemas.SchemaError, match="'policy_version' has type string"):
        schemas.validate(pa.Table.from_pydict(bad), "rollouts")
    with pytest.raises(schemas.SchemaError, match="unexpected column"):
        schemas.validate(pa.Table.from_pydict(dict(rows, extra=[1, 2, 3])), "rollouts")
    with pytest.raises(schemas.SchemaError, match="missing column"):
        schemas.validate(pa.Table.from_pydict(rows), "labels")


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompt_file_ok(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": "a"}), "", json.dumps({"prompt": "b", "id": "x", "reference": 3})])
    table = load_prompts(path)
    assert table.column("prompt_id").to_pylist() == ["row1", "x"]
    assert table.column("reference").to_pylist() == [None, "3"]


@pytest.mark.parametrize("lines, fragment", [
    ([json.dumps({"prompt": "a"}), "{not json"], "row 2: not valid JSON"),
    ([json.dumps({"prompt": "a"}), json.dumps({"prompt": "  "})], "row 2: field 'prompt' is empty"),
    ([json.dumps({"text": "a"})], "row 1: field 'prompt' is missing"),
    ([json.dumps({"prompt": "a", "id": 1}), json.dumps({"prompt": "b", "id": 1})], "row 2: id '1' already used at row 1"),
    (["[1, 2]"], "row 1: expected a JSON object"),
    ([""], "no prompts"),
    ([json.dumps({"prompt": "a"}), json.dumps({"prompt": "x" * (1 << 20)})], "row 2: line is 1048590 bytes, over the limit"),
    ([json.dumps({"prompt": "a\ud800b"})], "row 1: field 'prompt' holds an unpaired surrogate"),
    ([json.dumps({"prompt": "a", "id": [1]})], "row 1: field 'id' must be a string or an integer"),
    ([json.dumps({"prompt": "a", "reference": {"x": 1}})], "row 1: field 'reference' must be text or a number"),
    (["[" * 100000], "row 1: JSON nested too deeply"),
])
def test_bad_prompt_files_name_the_row(tmp_path, lines, fragment):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(PromptFileError) as err:
        load_prompts(path)
    assert fragment in str(err.value) and "bad.jsonl" in str(err.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "none.jsonl")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n' + '{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(PromptFileError, match="row 2: not UTF-8"):
        load_prompts(path)
    path.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "caf\xe9"}\r\n{"prompt": "a\u2028b"}\n'.encode())  # BOM, CRLF, U+2028
    assert load_prompts(path).column("prompt").to_pylist() == ["caf\xe9", "a\u2028b"]


def test_prompts_longer_than_the_context_error_or_skip(tmp_path, toy_world):
    from rlaif_ray.config import ConfigError, load_config
    from rlaif_ray.runtime.inputs import resolve_inputs
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": f"{i}+1=", "id": f"q{i}"}) for i in range(3)]
                       + [json.dumps({"prompt": "9+9=" * 200, "id": "long"})])
    overrides = [f"data.prompts={path}", "data.prompts_per_step=2", "model.max_model_len=64"]
    with pytest.raises(ConfigError, match="prompt 'long' is .* tokens.*at most 56"):
        resolve_inputs(load_config(None, overrides))
    resolved = resolve_inputs(load_config(None, [*overrides, "data.long_prompts=skip"]))
    assert resolved.prompts.column("prompt_id").to_pylist() == ["q0", "q1", "q2"] and resolved.prompts_left_out == 1


def test_sampler_covers_every_prompt_each_epoch_and_is_seeded():
    a, b = PromptSampler(10, seed=3), PromptSampler(10, seed=3)
    first = a.next_indices(10)
    assert sorted(first) == list(range(10)) and first == b.next_indices(10)
    assert sorted(a.next_indices(10)) == list(range(10))


def test_sampler_never_repeats_a_prompt_within_a_batch():
    sampler = PromptSampler(10, seed=0)
    seen = []
    for _ in range(30):  # batches of 4 over 10 prompts cross epoch boundaries often
        batch = sampler.next_indices(4)
        assert len(set(batch)) == 4
        seen += batch
    assert all(seen.count(i) == 12 for i in range(10))  # still fair: every prompt equally often
    with pytest.raises(ValueError, match="needs at least 11 distinct prompts"):
        sampler.next_indices(11)

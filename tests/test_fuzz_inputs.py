"""Fuzzing the two doors bad data comes in by: the prompt loader and the Arrow schema check. Whatever the input,
the answer is a valid table or the module's own error naming the row or column -- never another exception."""
import json

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlaif_ray.data import schemas
from rlaif_ray.data.prompts import PROMPT_SCHEMA, PromptFileError, load_prompts

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# text as JSON can spell it: escapes may encode unpaired surrogates ("\ud800"), which Arrow cannot store
texts = st.text(max_size=30) | st.builds(lambda a, b: a + "\ud800" + b, st.text(max_size=3), st.text(max_size=3))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | texts,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=6)
prompt_rows = st.fixed_dictionaries({}, optional={
    "prompt": texts | json_values, "id": texts | st.integers(0, 5) | json_values,
    "reference": st.text(max_size=4) | st.none() | json_values, "extra": json_values,
    "messages": json_values | st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "x"]),
                                                              "content": texts | json_values}), max_size=3)})


def check_loaded(table: pa.Table, rows: int | None = None) -> None:
    assert table.schema.equals(PROMPT_SCHEMA)
    ids = table.column("prompt_id").to_pylist()
    assert len(ids) == len(set(ids)) and all(p.strip() for p in table.column("prompt").to_pylist())
    if rows is not None:
        assert table.num_rows == rows
    pa.ipc.new_stream(pa.BufferOutputStream(), table.schema).write_table(table)  # encodable: no lone surrogates


@FUZZ
@given(raw=st.binary(max_size=400))
def test_prompt_loader_on_arbitrary_bytes(tmp_path, raw):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(raw)
    try:
        check_loaded(load_prompts(path))
    except PromptFileError as err:
        assert str(path) in str(err)


@FUZZ
@given(rows=st.lists(prompt_rows, min_size=0, max_size=8), blank=st.booleans())
def test_prompt_loader_on_arbitrary_json_rows(tmp_path, rows, blank):
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps(r) for r in rows]
    path.write_text(("\n\n" if blank else "\n").join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    try:
        table = load_prompts(path)
    except PromptFileError as err:
        message = str(err)
        assert str(path) in message and ("row " in message or "no prompts" in message)
        return
    check_loaded(table, rows=len(rows))


@FUZZ
@given(rows=st.lists(prompt_rows, min_size=1, max_size=6))
def test_prompt_loader_on_parquet(tmp_path, rows):
    import pyarrow.parquet as pq
    try:
        table = pa.Table.from_pylist([{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()}
                                      for r in rows])
    except (pa.ArrowException, UnicodeEncodeError, OverflowError):
        return  # not a table Arrow can hold (mixed types in a column, an int past int64): no file to load
    if table.num_columns == 0:
        return
    path = tmp_path / "prompts.parquet"
    pq.write_table(table, path)
    try:
        check_loaded(load_prompts(path), rows=len(rows))
    except PromptFileError as err:
        assert str(path) in str(err)


COLUMN_VALUES = {
    pa.string(): st.text(max_size=5) | st.none(),
    pa.int32(): st.integers(-2 ** 40, 2 ** 40) | st.none(),
    pa.int64(): st.integers(-2 ** 70, 2 ** 70) | st.none(),
    pa.float32(): st.floats(allow_nan=True) | st.none(),
    pa.bool_(): st.booleans() | st.none(),
}


@st.composite
def stage_tables(draw):
    """A table shaped roughly like a stage's: some declared columns (maybe dropped, maybe of another type),
    maybe an extra column, nulls and duplicate ids where they come."""
    stage = draw(st.sampled_from(sorted(schemas.STAGE_SCHEMAS)))
    n = draw(st.integers(0, 4))
    columns = {}
    for field in schemas.STAGE_SCHEMAS[stage]:
        mode = draw(st.integers(0, 39))  # mostly well-formed, so that tables also get through to the checks after
        if mode == 0:
            continue  # missing column
        kind = field.type if mode > 1 else draw(st.sampled_from(list(COLUMN_VALUES)))
        nulls = mode < 6 or field.nullable
        if pa.types.is_list(kind):
            item = COLUMN_VALUES.get(kind.value_type, st.none())
            if not nulls:
                item = item.filter(lambda v: v is not None)
            lists = st.lists(item, max_size=3)
            values = draw(st.lists(lists | st.none() if nulls else lists, min_size=n, max_size=n))
        else:
            item = COLUMN_VALUES[kind] if nulls else COLUMN_VALUES[kind].filter(lambda v: v is not None)
            values = draw(st.lists(item, min_size=n, max_size=n))
            if field.name == "sample_id" and draw(st.booleans()):
                values = [f"s{i}" for i in range(n)]  # unique ids, so the row checks are reached
        try:
            columns[field.name] = pa.array(values, type=kind)
        except (pa.ArrowException, OverflowError):
            columns[field.name] = pa.array([None] * n, type=kind)
    if draw(st.integers(0, 9)) == 0:
        columns["unexpected"] = pa.array([1] * n)
    return stage, pa.table(columns) if columns else pa.table({"x": pa.array([], pa.int8())})


@FUZZ
@given(case=stage_tables())
def test_schema_validation_on_arbitrary_tables(case):
    stage, table = case
    try:
        out = schemas.validate(table, stage)
    except schemas.SchemaError as err:
        assert str(err).startswith(f"{stage}:")
        return
    assert out.schema.equals(schemas.STAGE_SCHEMAS[stage])
    ids = out.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids))
    for field in out.schema:
        if not field.nullable:
            assert out.column(field.name).null_count == 0
        if pa.types.is_list(field.type):  # no null inside a list a learner would index
            assert all(v is not None for row in out.column(field.name).to_pylist() for v in row)


def test_schema_error_for_null_inside_a_list():
    rows = schemas.empty("rollouts").to_pylist()
    row = {"sample_id": "s1", "prompt_id": "p", "group_index": 0, "prompt": "1+1=", "prompt_token_ids": [1, None],
           "response": " 2", "response_token_ids": [5], "response_logprobs": [-0.1], "finish_reason": "stop",
           "policy_version": 0, "reference": "2"}
    with pytest.raises(schemas.SchemaError, match="prompt_token_ids.*row 0"):
        schemas.validate(pa.Table.from_pylist(rows + [row], schema=schemas.ROLLOUT_SCHEMA), "rollouts")

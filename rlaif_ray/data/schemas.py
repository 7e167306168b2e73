"""The Arrow schema each stage emits, and the check every stage runs on what it receives.

rollouts -> (CriticLabeler adds label columns) -> labels -> (RewardScorer adds `reward`) -> rewards.
Every row carries a stable `sample_id` and the `policy_version` whose weights generated it (and, per response
token, the version that sampled it: `token_versions`). Rows the
critic could not label stay in the table with `label_valid=false` and a `skip_reason`, so the learner can
account for every sample (trained, dropped as stale, or skipped with a reason).
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc


class SchemaError(ValueError):
    """A table that does not match the schema its stage declares."""


ROLLOUT_FIELDS = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("group_index", pa.int32(), nullable=False),    # which of the n samples for this prompt
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("response", pa.string(), nullable=False),
    pa.field("response_token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("response_logprobs", pa.list_(pa.float32()), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=True),
    pa.field("policy_version", pa.int64(), nullable=False),  # the version the sample's requests started under
    # the version whose weights sampled each response token (a weight update taken between two engine steps under
    # rollout.in_flight_update=continue changes it mid-response); null: every token from `policy_version`
    pa.field("token_versions", pa.list_(pa.int32()), nullable=True),
    pa.field("reference", pa.string(), nullable=True),       # ground truth where the task has one
]

LABEL_FIELDS = [
    pa.field("label_method", pa.string(), nullable=False),
    pa.field("judge_model", pa.string(), nullable=False),
    pa.field("label_valid", pa.bool_(), nullable=False),
    pa.field("skip_reason", pa.string(), nullable=True),
    # pairwise: P(this response beats each partner), both orders averaged, and whether both orders agreed
    pa.field("pair_partner_ids", pa.list_(pa.string()), nullable=False),
    pa.field("pair_win_probs", pa.list_(pa.float32()), nullable=False),
    pa.field("pair_position_agree", pa.list_(pa.bool_()), nullable=False),
    # P(slot 1 wins) in the order that put this response in slot 1: each judged order appears once in the table
    pa.field("pair_slot1_probs", pa.list_(pa.float32()), nullable=False),
    pa.field("win_prob", pa.float32(), nullable=True),       # mean over valid pairs; |2p-1| is the margin
    pa.field("judge_score", pa.float32(), nullable=True),    # direct: E[score] on the judge's 1..K scale
    pa.field("principle", pa.string(), nullable=True),       # the principle sampled for this label, if any
    pa.field("judge_reply", pa.string(), nullable=True),     # rationale/critique and label token, truncated
    pa.field("label_latency_s", pa.float32(), nullable=False),  # judge time spent on this row's calls
]

REWARD_FIELDS = [
    pa.field("reward", pa.float32(), nullable=True),
]

ROLLOUT_SCHEMA = pa.schema(ROLLOUT_FIELDS)
LABEL_SCHEMA = pa.schema(ROLLOUT_FIELDS + LABEL_FIELDS)
REWARD_SCHEMA = pa.schema(ROLLOUT_FIELDS + LABEL_FIELDS + REWARD_FIELDS)

STAGE_SCHEMAS = {"rollouts": ROLLOUT_SCHEMA, "labels": LABEL_SCHEMA, "rewards": REWARD_SCHEMA}
# columns added after tables were first saved (output.save_labels): one missing from a table is read as all null
ADDED_LATER = {"token_versions"}


def unjudged(rollouts: pa.Table) -> pa.Table:
    """A rollouts table as a labels table whose rows no judge saw (a reward model scores them: `reward.label_share`):
    label_method "none", every row valid for a reward, no pairs, no score."""
    n = rollouts.num_rows
    empty = {"pair_partner_ids": pa.string(), "pair_win_probs": pa.float32(), "pair_position_agree": pa.bool_(),
             "pair_slot1_probs": pa.float32()}
    columns = {"label_method": pa.array(["none"] * n), "judge_model": pa.array([""] * n),
               "label_valid": pa.array([True] * n), "label_latency_s": pa.array([0.0] * n, pa.float32()),
               **{name: pa.array([[]] * n, pa.list_(t)) for name, t in empty.items()}}
    table = rollouts
    for f in LABEL_FIELDS:
        table = table.append_column(f, columns[f.name] if f.name in columns else pa.nulls(n, f.type))
    return validate(table, "labels")


def validate(table: pa.Table, stage: str) -> pa.Table:
    """Check `table` against the schema of `stage`; return it cast to the exact declared types.

    Raises SchemaError naming the stage and the offending column (or row, for nulls and duplicates).
    """
    if stage not in STAGE_SCHEMAS:
        raise SchemaError(f"unknown stage '{stage}' (known: {', '.join(STAGE_SCHEMAS)})")
    if not isinstance(table, pa.Table):
        raise SchemaError(f"{stage}: expected a pyarrow.Table, got {type(table).__name__}")
    schema = STAGE_SCHEMAS[stage]
    for name in ADDED_LATER & set(schema.names) - set(table.column_names):
        table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise SchemaError(f"{stage}: missing column(s) {', '.join(missing)}")
    extra = [n for n in table.column_names if n not in schema.names]
    if extra:
        raise SchemaError(f"{stage}: unexpected column(s) {', '.join(extra)}")
    columns = []
    for field in schema:
        col = table.column(field.name)
        if not col.type.equals(field.type):
            try:
                col = col.cast(field.type)
            except (pa.ArrowException, OverflowError) as err:
                raise SchemaError(f"{stage}: column '{field.name}' has type {col.type}, "
                                  f"expected {field.type} ({err})") from None
        if not field.nullable and col.null_count:
            row = next(i for i, v in enumerate(col.is_null().to_pylist()) if v)
            raise SchemaError(f"{stage}: column '{field.name}' is null at row {row}")
        if pa.types.is_list(field.type) and pc.list_flatten(col).null_count:  # a learner indexes these lists
            row = next(i for i, v in enumerate(col.to_pylist()) if v is not None and None in v)
            raise SchemaError(f"{stage}: column '{field.name}' holds a null item at row {row}")
        columns.append(col)
    out = pa.Table.from_arrays(columns, schema=schema)
    ids = out.column("sample_id").to_pylist()
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next((i, s) for i, s in enumerate(ids) if s in seen or seen.add(s))
        raise SchemaError(f"{stage}: duplicate sample_id '{dup[1]}' at row {dup[0]}")
    return out


def empty(stage: str) -> pa.Table:
    return STAGE_SCHEMAS[stage].empty_table()


def sample_id(step: int, prompt_id: str, group_index: int) -> str:
    """Stable across runs with the same seed: the batch index, the prompt and the sample's slot."""
    return f"s{step:06d}/{prompt_id}/{group_index}"

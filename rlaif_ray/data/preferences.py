"""Preference files (JSONL, Parquet or a saved Hugging Face dataset folder): pairs of responses to one prompt with
the one a rater preferred, the input of a reward model trained offline (RLHF on human labels, or on AI labels
written by `rlaif-ray preferences`). Read with the same readers, field mapping and row-naming errors as prompt files.

A row holds the prompt (`prompt`, or `messages`: the conversation so far), `chosen` and `rejected`, and optionally
a soft label or a strength (which field holds each: `preferences.*_key`):
- `chosen` / `rejected`: the response text, or a list of {role, content} turns ending with the assistant's (TRL's
  conversational format; without a prompt field the turns before the last are the prompt, and both must share them);
- with neither prompt nor messages, text in Anthropic HH's format ("\\n\\nHuman: ... \\n\\nAssistant: ...") is split
  at the last "\\n\\nAssistant:" the two texts share;
- `label`: P(chosen ≻ rejected) in [0, 1] (a soft label; default 1); `strength`: how strongly chosen is preferred,
  0 (a tie) to 1, read as the soft label (1 + strength) / 2. A row gives at most one of them.
Rows whose chosen and rejected texts are identical teach nothing; they are left out and counted.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from rlaif_ray.data.prompts import (MESSAGE_TYPE, PromptFileError, messages_field, read_rows, readable_prompt,
                                    row_id, text_field)

PREFERENCE_SCHEMA = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),          # what the reward model reads before a response
    pa.field("messages", pa.list_(MESSAGE_TYPE), nullable=True),
    pa.field("chosen", pa.string(), nullable=False),
    pa.field("rejected", pa.string(), nullable=False),
    pa.field("label", pa.float32(), nullable=False),          # P(chosen ≻ rejected)
])
HH_ASSISTANT = "\n\nAssistant:"


class PreferenceFileError(PromptFileError):
    """A preference file that cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class PreferenceKeys:
    """Which field of a row holds what (`preferences.*_key`)."""
    prompt: str = "prompt"
    messages: str = "messages"
    id: str = "id"
    chosen: str = "chosen"
    rejected: str = "rejected"
    label: str = "label"
    strength: str = "strength"
    source: str = "source"  # who labelled the row (e.g. "human", "ai:<judge>"): counted, not trained on
    split: str = "train"


def response_field(path: Path, lineno: int, field: str, value) -> tuple[str, list[dict] | None]:
    """(the response text, the turns before it when the field is a conversation)."""
    if isinstance(value, list):
        turns = messages_field(path, lineno, field, value, prompt=False)
        if turns[-1]["role"] != "assistant":
            raise PreferenceFileError(f"{path}: row {lineno}: field '{field}' is a conversation that does not end "
                                      "with an assistant turn (the response)")
        return text_field(path, lineno, f"{field}[-1].content", turns[-1]["content"]), turns[:-1] or None
    return text_field(path, lineno, field, value), None


def _split_hh(path: Path, lineno: int, chosen: str, rejected: str, keys: PreferenceKeys) -> tuple[str, str, str]:
    """Anthropic HH rows carry the dialogue in both texts: (prompt, chosen reply, rejected reply)."""
    cut = chosen.rfind(HH_ASSISTANT)
    prompt = chosen[:cut + len(HH_ASSISTANT)]
    if cut < 0 or not rejected.startswith(prompt):
        raise PreferenceFileError(f"{path}: row {lineno}: no '{keys.prompt}' or '{keys.messages}' field, and "
                                  f"'{keys.chosen}'/'{keys.rejected}' do not share a dialogue ending in "
                                  "'\\n\\nAssistant:' (Anthropic HH's format)")
    replies = chosen[len(prompt):].strip(), rejected[len(prompt):].strip()
    for field, reply in zip((keys.chosen, keys.rejected), replies):
        if not reply:
            raise PreferenceFileError(f"{path}: row {lineno}: field '{field}' has no reply after the last "
                                      "'\n\nAssistant:'")
    return prompt, *replies


def _soft_label(path: Path, lineno: int, row: dict, keys: PreferenceKeys) -> float:
    label, strength = row.get(keys.label), row.get(keys.strength)
    if label is not None and strength is not None:
        raise PreferenceFileError(f"{path}: row {lineno}: give '{keys.label}' (P(chosen ≻ rejected)) or "
                                  f"'{keys.strength}', not both")
    for field, value in ((keys.label, label), (keys.strength, strength)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise PreferenceFileError(f"{path}: row {lineno}: field '{field}' must be a number in [0, 1], "
                                      f"got {value!r}")
        return float(value) if field == keys.label else (1 + float(value)) / 2
    return 1.0


def read_preference_file(path: str | Path, keys: PreferenceKeys = PreferenceKeys()) -> tuple[pa.Table, dict]:
    """The preference table, and counts a user should see: pairs per stated source, rows left out as identical
    pairs, and how many rows carry each field the loader did not use."""
    path = Path(path).expanduser()
    rows = read_rows(path, keys.split, "preferences")
    cols: dict[str, list] = {f.name: [] for f in PREFERENCE_SCHEMA}
    seen: dict[str, int] = {}
    unused: Counter = Counter()
    used = {keys.prompt, keys.messages, keys.id, keys.chosen, keys.rejected, keys.label, keys.strength, keys.source}
    identical = 0
    sources: Counter = Counter()
    for lineno, row in rows:
        unused.update(k for k, v in row.items() if k not in used and v is not None)
        pair_id = row_id(path, lineno, keys.id, row.get(keys.id), seen)
        chosen, chosen_context = response_field(path, lineno, keys.chosen, row.get(keys.chosen))
        rejected, rejected_context = response_field(path, lineno, keys.rejected, row.get(keys.rejected))
        messages, prompt = row.get(keys.messages), row.get(keys.prompt)
        if messages is not None:
            messages = messages_field(path, lineno, keys.messages, messages)
        elif prompt is None and chosen_context is not None:  # TRL's implicit prompt: the turns before the reply
            if rejected_context != chosen_context:
                raise PreferenceFileError(f"{path}: row {lineno}: '{keys.chosen}' and '{keys.rejected}' are "
                                          "conversations with different turns before the reply (no shared prompt)")
            messages = chosen_context
        if prompt is None and messages is not None:
            prompt = readable_prompt(messages)
        elif prompt is None:
            prompt, chosen, rejected = _split_hh(path, lineno, chosen, rejected, keys)
        prompt = text_field(path, lineno, keys.prompt, prompt)
        if chosen == rejected:
            identical += 1
            continue
        sources[str(row.get(keys.source) or "unstated")] += 1
        for name, value in (("pair_id", pair_id), ("prompt", prompt), ("messages", messages), ("chosen", chosen),
                            ("rejected", rejected), ("label", _soft_label(path, lineno, row, keys))):
            cols[name].append(value)
    if not cols["pair_id"]:
        raise PreferenceFileError(f"{path}: no usable pairs (all {identical} rows have identical chosen and rejected)")
    return pa.Table.from_pydict(cols, schema=PREFERENCE_SCHEMA), {
        "pairs": len(cols["pair_id"]), "sources": dict(sources), "identical_left_out": identical,
        "unused_fields": dict(unused)}


def preference_pairs(table: pa.Table) -> list[tuple[str, str, str, float]]:
    """(prompt, chosen, rejected, P(chosen ≻ rejected)): the reward model's training pairs."""
    return list(zip(*(table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected", "label"))))


def judged_pairs(labels: pa.Table) -> list[tuple[int, int, float]]:
    """(row i, row j, P(i ≻ j)) for every pair the judge labelled between valid rows of a labels table, each once."""
    from rlaif_ray import algorithms
    valid = labels.column("label_valid").to_pylist()
    return algorithms.preference_pairs(labels.column("sample_id").to_pylist(),
                                       labels.column("pair_partner_ids").to_pylist(),
                                       labels.column("pair_win_probs").to_pylist(),
                                       {i for i, v in enumerate(valid) if v})


def labels_to_preferences(labels: pa.Table, hard: bool = False) -> list[dict]:
    """A labels table's judged pairs (each once, both orders averaged) as preference rows: the judge's winner is
    `chosen`, `label` its win probability (`hard`: 1, and pairs the judge left at exactly 0.5 are left out). Pairs of
    two identical texts are left out."""
    if "pair_partner_ids" not in labels.column_names:
        raise PreferenceFileError("the table has no pairwise labels (pair_partner_ids): only a pairwise, cot or "
                                  "self_reference judge's labels make preference pairs")
    ids = labels.column("sample_id").to_pylist()
    prompts, responses = labels.column("prompt").to_pylist(), labels.column("response").to_pylist()
    judges = labels.column("judge_model").to_pylist()
    rows = []
    for i, j, p in judged_pairs(labels):
        if (hard and p == 0.5) or responses[i] == responses[j]:  # identical texts teach a reward model nothing
            continue
        win, lose, p_win = (i, j, p) if p >= 0.5 else (j, i, 1 - p)
        rows.append({"id": f"{ids[win]}>{ids[lose]}", "prompt": prompts[i], "chosen": responses[win],
                     "rejected": responses[lose], "label": 1.0 if hard else round(float(p_win), 6),
                     "source": f"ai:{judges[i]}"})
    return rows


def write_preference_file(labels_path: str | Path, out: str | Path, hard: bool = False) -> dict:
    """Labels (a Parquet file of `rlaif-ray label`, or a run's `labels/` folder of them) -> a preference file (JSONL,
    one row per judged pair) that `preferences.path` reads; returns counts."""
    import json

    import pyarrow.parquet as pq

    labels_path = Path(labels_path).expanduser()
    files = sorted(labels_path.glob("*.parquet")) if labels_path.is_dir() else [labels_path]
    if not files or not files[0].is_file():
        raise PreferenceFileError(f"no labels to convert at {labels_path} (a Parquet file of `rlaif-ray label`, or "
                                  "a run's labels/ folder)")
    rows, judged = [], 0
    for f in files:
        try:
            table = pq.read_table(f)
        except (pa.ArrowException, OSError) as err:
            raise PreferenceFileError(f"{f}: not a readable Parquet file ({err})") from None
        try:
            rows += labels_to_preferences(table, hard)
        except PreferenceFileError as err:
            raise PreferenceFileError(f"{f}: {err}") from None
        judged += len(judged_pairs(table))
    if not rows:
        raise PreferenceFileError(f"{labels_path}: no judged pairs to write (no valid pairwise labels"
                                  f"{', or every pair a tie, which --hard leaves out' if hard else ''})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    tmp.replace(out)
    return {"labels": [str(f) for f in files], "pairs": len(rows), "out": str(out), "hard": hard,
            "left_out": {"judged_pairs": judged, "identical_texts_or_ties": judged - len(rows)}}

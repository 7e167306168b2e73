"""Prompt files (JSONL or Parquet) -> a validated Arrow table, and the batches the loop draws from it.

A row needs a non-empty string `prompt`; `id` (unique) and `reference` (ground truth for the toy
checker) are optional. Errors name the file and the 1-based row.
"""
from __future__ import annotations

import codecs
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PROMPT_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("reference", pa.string(), nullable=True),
])


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and row."""


MAX_LINE_BYTES = 1 << 20  # one JSONL row over 1 MiB is an error naming the row (a runaway line, not a prompt)


def _rows_from_jsonl(path: Path) -> list[tuple[int, dict]]:
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):  # editors on Windows write one
        data = data[len(codecs.BOM_UTF8):]
    rows = []
    for lineno, line in enumerate(data.split(b"\n"), start=1):  # JSONL rows end at \n only
        if len(line) > MAX_LINE_BYTES:
            raise PromptFileError(f"{path}: row {lineno}: line is {len(line)} bytes, over the limit of "
                                  f"{MAX_LINE_BYTES} bytes per row")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PromptFileError(f"{path}: row {lineno}: not UTF-8 text ({err.reason} at byte {err.start} "
                                  "of the line)") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path}: row {lineno}: not valid JSON ({err.msg})") from None
        except RecursionError:
            raise PromptFileError(f"{path}: row {lineno}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise PromptFileError(f"{path}: row {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    return rows


def _rows_from_parquet(path: Path) -> list[tuple[int, dict]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise PromptFileError(f"{path}: not a readable Parquet file ({err})") from None
    return list(enumerate(table.to_pylist(), start=1))


def _text(path: Path, lineno: int, field: str, value) -> str:
    """A field that must hold text Arrow can store (JSON escapes can spell unpaired surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PromptFileError(f"{path}: row {lineno}: field '{field}' holds an unpaired surrogate "
                              "(not valid Unicode)") from None
    return value


def load_prompts(path: str | Path) -> pa.Table:
    path = Path(path).expanduser()
    if not path.is_file():
        raise PromptFileError(f"prompts file not found: {path}")
    rows = _rows_from_parquet(path) if path.suffix == ".parquet" else _rows_from_jsonl(path)
    if not rows:
        raise PromptFileError(f"{path}: no prompts in file")
    ids, prompts, refs = [], [], []
    seen: dict[str, int] = {}
    for lineno, row in rows:
        prompt = row.get("prompt")
        if not isinstance(prompt, str):
            raise PromptFileError(f"{path}: row {lineno}: field 'prompt' is missing or not a string")
        if not prompt.strip():
            raise PromptFileError(f"{path}: row {lineno}: field 'prompt' is empty")
        prompt = _text(path, lineno, "prompt", prompt)
        raw_id = row.get("id")
        if raw_id is None:
            pid = f"row{lineno}"
        elif isinstance(raw_id, str) or (isinstance(raw_id, int) and not isinstance(raw_id, bool)):
            pid = _text(path, lineno, "id", str(raw_id))
        else:
            raise PromptFileError(f"{path}: row {lineno}: field 'id' must be a string or an integer, "
                                  f"got {type(raw_id).__name__}")
        if pid in seen:
            raise PromptFileError(f"{path}: row {lineno}: id '{pid}' already used at row {seen[pid]}")
        seen[pid] = lineno
        ref = row.get("reference")
        if ref is not None and (isinstance(ref, (bool, dict, list)) or not isinstance(ref, (str, int, float))):
            raise PromptFileError(f"{path}: row {lineno}: field 'reference' must be text or a number, "
                                  f"got {type(ref).__name__}")
        ids.append(pid)
        prompts.append(prompt)
        refs.append(None if ref is None else _text(path, lineno, "reference", str(ref)))
    return pa.Table.from_pydict({"prompt_id": ids, "prompt": prompts, "reference": refs}, schema=PROMPT_SCHEMA)


class PromptSampler:
    """Epochs over the prompt table in a seeded order; `next_indices(k)` is the cursor the loop advances.

    A batch never holds the same prompt twice (sample ids and prompt groups stay unique): when an epoch
    ends inside a batch, the prompts already in that batch move to the end of the next epoch's order.
    """

    def __init__(self, num_prompts: int, seed: int, shuffle: bool = True):
        self.num_prompts = num_prompts
        self.rng = np.random.default_rng(seed)
        self.shuffle = shuffle
        self.order = self._new_order()
        self.cursor = 0

    def _new_order(self) -> np.ndarray:
        idx = np.arange(self.num_prompts)
        return self.rng.permutation(idx) if self.shuffle else idx

    def state(self) -> dict:
        """Everything `next_indices` depends on, JSON-serialisable (checkpoints)."""
        return {"order": [int(i) for i in self.order], "cursor": self.cursor, "rng": self.rng.bit_generator.state}

    def restore(self, state: dict) -> None:
        if len(state["order"]) != self.num_prompts:
            raise ValueError(f"sampler state holds {len(state['order'])} prompts, the prompt file {self.num_prompts}")
        self.order, self.cursor = np.asarray(state["order"]), int(state["cursor"])
        self.rng.bit_generator.state = state["rng"]

    def next_indices(self, k: int) -> list[int]:
        if k > self.num_prompts:
            raise ValueError(f"a batch of {k} prompts needs at least {k} distinct prompts; the file has {self.num_prompts}")
        out: list[int] = []
        while len(out) < k:
            if self.cursor == self.num_prompts:
                order = self._new_order()
                in_batch = np.isin(order, out)
                self.order, self.cursor = np.concatenate([order[~in_batch], order[in_batch]]), 0
            out.append(int(self.order[self.cursor]))
            self.cursor += 1
        return out

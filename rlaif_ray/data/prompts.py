"""Prompt files (JSONL, Parquet, or a Hugging Face dataset folder written by `save_to_disk`) -> a validated Arrow
table, and the batches the loop draws from it. A saved `DatasetDict` is read at its `data.split` (train).

A row needs a non-empty string `prompt`, or `messages` (an OpenAI-style list of {role, content} turns, the
conversation so far); `id` (unique) and `reference` (ground truth for the checker) are optional. Which field
holds each is set by `data.prompt_key`, `messages_key`, `id_key` and `reference_key`. A row with messages and no
prompt gets a readable prompt from its turns (what the judge reads; the engine gets the messages through the
policy's chat template). Fields the loader does not use are counted and reported once by the driver, so a
dataset whose answers sit in `answer` is not silently stripped of them. Errors name the file and the 1-based row.
"""
from __future__ import annotations

import codecs
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MESSAGE_TYPE = pa.struct([pa.field("role", pa.string(), nullable=False), pa.field("content", pa.string(), nullable=False)])
PROMPT_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("reference", pa.string(), nullable=True),
    pa.field("messages", pa.list_(MESSAGE_TYPE), nullable=True),  # None: the prompt is plain text
])
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptKeys:
    """Which field of a row holds what (`data.*_key`)."""
    prompt: str = "prompt"
    messages: str = "messages"
    id: str = "id"
    reference: str = "reference"
    split: str = "train"  # the split of a saved DatasetDict


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


def _rows_from_saved_dataset(path: Path, split: str) -> list[tuple[int, dict]]:
    """The rows of a folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: `split`)."""
    try:
        import datasets
    except ImportError:
        raise PromptFileError(f"{path}: a folder is read as a Hugging Face dataset, and `datasets` is not "
                              "installed (pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError, pa.ArrowException) as err:
        raise PromptFileError(f"{path}: a folder, but not a dataset saved with save_to_disk ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PromptFileError(f"{path}: the saved DatasetDict has no split '{split}' (it has "
                                  f"{', '.join(ds)}); choose one with data.split")
        ds = ds[split]
    return list(enumerate(ds.to_list(), start=1))


def _text(path: Path, lineno: int, field: str, value) -> str:
    """A field that must hold text Arrow can store (JSON escapes can spell unpaired surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PromptFileError(f"{path}: row {lineno}: field '{field}' holds an unpaired surrogate "
                              "(not valid Unicode)") from None
    return value


def messages_field(path: Path, lineno: int, field: str, value, prompt: bool = True) -> list[dict]:
    """A list of {role, content} turns; `prompt`: a conversation the policy answers (it must not end with the
    assistant's turn)."""
    if not isinstance(value, list) or not value:
        raise PromptFileError(f"{path}: row {lineno}: field '{field}' must be a non-empty list of "
                              "{role, content} messages")
    out = []
    for k, turn in enumerate(value):
        where = f"{path}: row {lineno}: {field}[{k}]"
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise PromptFileError(f"{where} must be {{\"role\": one of {', '.join(ROLES)}, \"content\": text}}")
        out.append({"role": turn["role"], "content": _text(path, lineno, f"{field}[{k}].content", turn["content"])})
    if prompt and out[-1]["role"] == "assistant":
        raise PromptFileError(f"{path}: row {lineno}: {field} ends with an assistant turn; the policy answers the "
                              "last user turn")
    return out


def readable_prompt(messages: list[dict]) -> str:
    """The conversation as text a judge can read: a single user turn is its content; longer ones are labelled."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


def read_rows(path: Path, split: str, what: str) -> list[tuple[int, dict]]:
    """(1-based row number, row) of a JSONL or Parquet file or a saved dataset folder; `what` names the file in errors."""
    if path.is_dir():
        rows = _rows_from_saved_dataset(path, split)
    elif not path.is_file():
        raise PromptFileError(f"{what} file not found: {path}")
    else:
        rows = _rows_from_parquet(path) if path.suffix == ".parquet" else _rows_from_jsonl(path)
    if not rows:
        raise PromptFileError(f"{path}: no {what} in file")
    return rows


def text_field(path: Path, lineno: int, field: str, value) -> str:
    """A row's field that must be a non-empty string of valid Unicode; errors name the file, row and field."""
    if not isinstance(value, str):
        raise PromptFileError(f"{path}: row {lineno}: field '{field}' is missing or not a string")
    if not value.strip():
        raise PromptFileError(f"{path}: row {lineno}: field '{field}' is empty")
    return _text(path, lineno, field, value)


def row_id(path: Path, lineno: int, field: str, value, seen: dict[str, int]) -> str:
    """A row's id (`row<N>` when it has none), unique in the file."""
    if value is None:
        pid = f"row{lineno}"
    elif isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        pid = _text(path, lineno, field, str(value))
    else:
        raise PromptFileError(f"{path}: row {lineno}: field '{field}' must be a string or an integer, "
                              f"got {type(value).__name__}")
    if pid in seen:
        raise PromptFileError(f"{path}: row {lineno}: id '{pid}' already used at row {seen[pid]}")
    seen[pid] = lineno
    return pid


def load_prompts(path: str | Path, keys: PromptKeys = PromptKeys()) -> pa.Table:
    return read_prompt_file(path, keys)[0]


def read_prompt_file(path: str | Path, keys: PromptKeys = PromptKeys()) -> tuple[pa.Table, dict[str, int]]:
    """The prompt table, and how many rows carry each field the loader did not use."""
    path = Path(path).expanduser()
    rows = read_rows(path, keys.split, "prompts")
    ids, prompts, refs, conversations = [], [], [], []
    seen: dict[str, int] = {}
    unused: Counter = Counter()
    used = {keys.prompt, keys.messages, keys.id, keys.reference}
    for lineno, row in rows:
        unused.update(k for k, v in row.items() if k not in used and v is not None)
        messages = row.get(keys.messages)
        messages = None if messages is None else messages_field(path, lineno, keys.messages, messages)
        prompt = row.get(keys.prompt)
        if prompt is None and messages is not None:
            prompt = readable_prompt(messages)
        if not isinstance(prompt, str):
            raise PromptFileError(f"{path}: row {lineno}: field '{keys.prompt}' is missing or not a string "
                                  f"(nor is there a '{keys.messages}' list)")
        if not prompt.strip():
            raise PromptFileError(f"{path}: row {lineno}: field '{keys.prompt}' is empty")
        prompt = _text(path, lineno, keys.prompt, prompt)
        pid = row_id(path, lineno, keys.id, row.get(keys.id), seen)
        ref = row.get(keys.reference)
        if ref is not None and (isinstance(ref, (bool, dict, list)) or not isinstance(ref, (str, int, float))):
            raise PromptFileError(f"{path}: row {lineno}: field '{keys.reference}' must be text or a number, "
                                  f"got {type(ref).__name__}")
        ids.append(pid)
        prompts.append(prompt)
        refs.append(None if ref is None else _text(path, lineno, keys.reference, str(ref)))
        conversations.append(messages)
    table = pa.Table.from_pydict({"prompt_id": ids, "prompt": prompts, "reference": refs, "messages": conversations},
                                 schema=PROMPT_SCHEMA)
    return table, dict(unused)


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

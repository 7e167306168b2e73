"""Graded answer files (JSONL, Parquet or a saved Hugging Face dataset folder): single responses to a prompt with a
grade, what `rlaif-ray train-judge` reads to tune a judge's direct (1–K) score (`critic.method=direct`). Read with
the same readers, field mapping and row-naming errors as prompt and preference files.

A row holds the prompt (`prompt`, or `messages`: the conversation so far), the `response` (text, or a list of
{role, content} turns ending with the assistant's) and its `grade` in [0, 1]: 0 the worst answer, 1 the best (a
checker's wrong / right; a rating r on a 1–K scale is (r − 1) / (K − 1)). Which field holds each:
`preferences.*_key`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rlaif_ray.data.preferences import PreferenceFileError, response_field
from rlaif_ray.data.prompts import messages_field, read_rows, readable_prompt, row_id, text_field


@dataclass(frozen=True)
class GradedKeys:
    """Which field of a row holds what (`preferences.*_key`)."""
    prompt: str = "prompt"
    messages: str = "messages"
    id: str = "id"
    response: str = "response"
    grade: str = "grade"
    split: str = "train"


def read_graded_file(path: str | Path, keys: GradedKeys = GradedKeys()) -> tuple[list[tuple[str, str, float]], dict]:
    """(prompt, response, grade) per row, and counts a user should see (rows, grades, unused fields)."""
    path = Path(path).expanduser()
    out, seen, unused = [], {}, Counter()
    used = {keys.prompt, keys.messages, keys.id, keys.response, keys.grade}
    for lineno, row in read_rows(path, keys.split, "graded answers"):
        unused.update(k for k, v in row.items() if k not in used and v is not None)
        row_id(path, lineno, keys.id, row.get(keys.id), seen)
        response, context = response_field(path, lineno, keys.response, row.get(keys.response))
        messages, prompt = row.get(keys.messages), row.get(keys.prompt)
        if messages is not None:
            messages = messages_field(path, lineno, keys.messages, messages)
        if prompt is None and (messages or context):
            prompt = readable_prompt(messages or context)
        prompt = text_field(path, lineno, keys.prompt, prompt)
        grade = row.get(keys.grade)
        if grade is None:
            raise PreferenceFileError(f"{path}: row {lineno}: field '{keys.grade}' is missing (a number in [0, 1]: "
                                      "0 the worst answer, 1 the best)")
        if isinstance(grade, bool) or not isinstance(grade, (int, float)) or not 0 <= grade <= 1:
            raise PreferenceFileError(f"{path}: row {lineno}: field '{keys.grade}' must be a number in [0, 1] "
                                      f"(0 the worst answer, 1 the best), got {grade!r}")
        out.append((prompt, response, float(grade)))
    if not out:
        raise PreferenceFileError(f"{path}: no graded answers")
    grades = [g for _, _, g in out]
    return out, {"path": str(path.resolve()), "answers": len(out), "mean_grade": round(sum(grades) / len(grades), 4),
                 "unused_fields": dict(unused)}

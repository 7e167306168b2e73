"""Ground-truth checkers: is a response right for a prompt's reference answer? (`data.checker`)

- `exact`: the response, stripped, is the reference (the toy world's " 7" for "3+4=");
- `last_number` / `first_number`: the last (first) number in the response equals the reference as a number
  (chat models answer "3 + 4 = 7");
- `choice`: the first standalone capital letter A-J in the response is the reference letter (multiple choice);
- `package.module:function` or `path/to/file.py:function`: the user's own `function(response, reference) -> bool`.
A prompt row may carry a `reference`; every place that reports true accuracy (the rollout worker's evaluation,
label quality, eval, the prompt-injection study) asks the checker made here from the config.
"""
from __future__ import annotations

import re
from typing import Callable

from rlaif_ray.user_code import UserCodeError, load_callable

Checker = Callable[[str, "str | None"], bool]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
CHOICE = re.compile(r"\b([A-J])\b")


class CheckerError(ValueError):
    """`data.checker` names no built-in checker and no importable `module:function`."""


def is_correct(response: str, reference: str | None) -> bool:
    """Exact match: the response, stripped, is the reference answer."""
    return reference is not None and response.strip() == reference.strip()


def _number(text: str | None, which: int) -> float | None:
    found = NUMBER.findall(text or "")
    return float(found[which]) if found else None


def last_number(response: str, reference: str | None) -> bool:
    ref = _number(reference, -1)
    return ref is not None and _number(response, -1) == ref


def first_number(response: str, reference: str | None) -> bool:
    ref = _number(reference, -1)
    return ref is not None and _number(response, 0) == ref


def choice(response: str, reference: str | None) -> bool:
    found = CHOICE.search(response)
    return reference is not None and found is not None and found.group(1) == reference.strip().upper()


BUILT_IN = {"exact": is_correct, "last_number": last_number, "first_number": first_number, "choice": choice}


def make_checker(spec: str) -> Checker:
    """A built-in checker by name, or the user's `module:function` / `path/to/file.py:function`
    (rlaif_ray.user_code: found in the working folder too, and shipped to the actors)."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    try:
        return load_callable(spec, "data.checker")
    except UserCodeError as err:
        raise CheckerError(f"{err} (built-in checkers: {', '.join(BUILT_IN)})") from None

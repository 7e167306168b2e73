"""Ground-truth checkers: is a response right for a prompt's reference answer?

A prompt row may carry a `reference`; every stage that reports true accuracy (the rollout worker's evaluation,
label quality, eval, the prompt-injection study) asks the checker here, so a world with another task changes
one function, not five call sites.
"""
from __future__ import annotations


def is_correct(response: str, reference: str | None) -> bool:
    """Exact match: the response, stripped, is the reference answer (the toy world's addition task)."""
    return reference is not None and response.strip() == reference.strip()

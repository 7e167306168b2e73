"""How a judge prompt is put together for every labeling method.

    judge prompt = preamble + few_shot + body [+ step prompt + generated rationale] + ending

`body` is the method's template filled with the prompt and response(s); `preamble` and the templates may
hold `{principle}` (one principle sampled per label). Few-shot examples and the endings are literal text.
The toy world trains its critic on exactly these strings, so what it learned is what the labeler asks.
"""
from __future__ import annotations

import string

# placeholders each template must (and may) hold; {principle} is allowed everywhere a template is formatted
REQUIRED_FIELDS = {
    "pairwise_template": {"prompt", "response_a", "response_b"},
    "self_reference_template": {"prompt", "own_answer", "response_a", "response_b"},
    "self_answer_template": {"prompt"},
    "direct_template": {"prompt", "response"},
    "preamble": set(),
}
METHOD_TEMPLATES = {
    "pairwise": ("pairwise_template",),
    "cot": ("pairwise_template",),
    "self_reference": ("self_answer_template", "self_reference_template"),
    "direct": ("direct_template",),
}


def placeholders(text: str, where: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as err:  # a lone "{" or "}"
        raise ValueError(f"{where} is not a valid template ({err}); write literal braces as {{{{ and }}}}") from None


def check_templates(cfg) -> None:
    """Raise ValueError naming the field for a template that misses (or invents) a placeholder."""
    for name, required in REQUIRED_FIELDS.items():
        found = placeholders(getattr(cfg, name), f"critic.{name}")
        missing = sorted(required - found)
        unknown = sorted(found - required - {"principle"})
        if missing:
            raise ValueError(f"critic.{name} lacks the placeholder(s) {', '.join('{' + m + '}' for m in missing)}")
        if unknown:
            raise ValueError(f"critic.{name} has unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)} "
                             f"(allowed: {', '.join('{' + a + '}' for a in sorted(required | {'principle'}))})")
    if cfg.principles:
        holders = ("preamble",) + METHOD_TEMPLATES[cfg.method]
        if not any("principle" in placeholders(getattr(cfg, h), h) for h in holders):
            raise ValueError(f"critic.principles is set but none of critic.{', critic.'.join(holders)} "
                             "holds {principle}")
    if len(set(cfg.pairwise_labels)) != 2:
        raise ValueError(f"critic.pairwise_labels must be two different strings, got {list(cfg.pairwise_labels)}")
    if len(cfg.direct_labels) < 2 or len(set(cfg.direct_labels)) != len(cfg.direct_labels):
        raise ValueError("critic.direct_labels must be at least two different strings")


class JudgePrompts:
    """The judge-prompt strings of one critic config (everything before the label token)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def _head(self, principle: str) -> str:
        return self.cfg.preamble.format(principle=principle) + "".join(self.cfg.few_shot)

    def pairwise(self, prompt: str, response_a: str, response_b: str, principle: str = "") -> str:
        """Body of a pairwise comparison (pairwise, cot): the ending or the CoT step prompt follows."""
        return self._head(principle) + self.cfg.pairwise_template.format(
            prompt=prompt, response_a=response_a, response_b=response_b, principle=principle)

    def self_answer(self, prompt: str, principle: str = "") -> str:
        return self.cfg.self_answer_template.format(prompt=prompt, principle=principle)

    def self_reference(self, prompt: str, own_answer: str, response_a: str, response_b: str,
                       principle: str = "") -> str:
        return self._head(principle) + self.cfg.self_reference_template.format(
            prompt=prompt, own_answer=own_answer, response_a=response_a, response_b=response_b, principle=principle)

    def direct(self, prompt: str, response: str, principle: str = "") -> str:
        return self._head(principle) + self.cfg.direct_template.format(
            prompt=prompt, response=response, principle=principle)

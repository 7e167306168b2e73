"""How a judge prompt is put together for every labeling method.

    judge prompt = preamble + few_shot + body [+ step prompt + generated rationale] + ending

`body` is the method's template filled with the prompt and response(s); `preamble` and the templates may
hold `{principle}` (one principle sampled per label). Few-shot examples and the endings are literal text.
The toy world trains its critic on exactly these strings, so what it learned is what the labeler asks.
Which placeholders each template must hold is checked when the config loads (`rlaif_ray.config`).
"""
from __future__ import annotations


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

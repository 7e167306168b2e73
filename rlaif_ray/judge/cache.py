"""A judge with a memory: a judge prompt it has answered is not sent again. Batches re-issued after a fault and
identical responses within a prompt group (common for short answers: identical responses give identical judge
prompts) are answered from a bounded LRU keyed by (judge, exact prompt text, label set or generation settings).
Only usable replies are kept: a failed or unparsable one is asked again next time."""
from __future__ import annotations

import dataclasses
from collections import OrderedDict

from rlaif_ray.judge.reply import JudgeReply


class CachedJudge:
    """Wraps a judge backend (`distribution`, `complete`, `usage`); `size` = 0 passes every prompt through.
    `hits`: prompts answered without the backend (a hit's reply carries latency 0)."""

    def __init__(self, judge, name: str, size: int, min_label_mass: float):
        self.judge, self.name, self.size, self.min_label_mass = judge, name, size, min_label_mass
        self.replies: OrderedDict[tuple, JudgeReply] = OrderedDict()
        self.hits = 0

    def distribution(self, prompts: list[str], labels) -> list[JudgeReply]:
        return self._through(prompts, ("labels", tuple(labels)), lambda todo: self.judge.distribution(todo, labels),
                             lambda r: r.probs is not None and r.mass >= self.min_label_mass)

    def complete(self, prompts: list[str], max_tokens: int, stop: list[str]) -> list[JudgeReply]:
        return self._through(prompts, ("complete", max_tokens, tuple(stop or ())),
                             lambda todo: self.judge.complete(todo, max_tokens, stop), lambda r: True)

    def usage(self) -> dict:
        return self.judge.usage()

    def _through(self, prompts: list[str], setting: tuple, ask, usable) -> list[JudgeReply]:
        if not self.size:
            return ask(prompts)
        keys = [(self.name, p, setting) for p in prompts]
        known = {}
        for key in dict.fromkeys(keys):
            if key in self.replies:
                self.replies.move_to_end(key)
                known[key] = self.replies[key]
        todo = [key for key in dict.fromkeys(keys) if key not in known]  # each new prompt asked once
        fresh = dict(zip(todo, ask([key[1] for key in todo]) if todo else []))
        for key, reply in fresh.items():
            if reply.error is None and usable(reply):
                self.replies[key] = reply
                if len(self.replies) > self.size:
                    self.replies.popitem(last=False)
        out, answered = [], set()
        for key in keys:
            if key in fresh and key not in answered:  # the first asker gets the reply; the rest are hits
                answered.add(key)
                out.append(fresh[key])
            else:
                self.hits += 1
                out.append(dataclasses.replace(known.get(key) or fresh[key], latency_s=0.0))
        return out

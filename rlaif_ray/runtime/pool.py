"""Least-loaded dispatch over the actors of one stage (RolloutWorkers, CriticLabelers).

The driver knows every call it submitted: `pick` returns the actor with the fewest unfinished calls
(ties broken round-robin), `track` records the ref that completes with a call. Finished calls are found
with a non-blocking `ray.wait` that fetches nothing, so the driver never pulls a batch to look at it.
`depth` is the stage's queue: submitted calls not finished yet (running + waiting in the actors' queues).
"""
from __future__ import annotations

import ray


class ActorPool:
    def __init__(self, actors: list, name: str):
        if not actors:
            raise ValueError(f"{name}: a pool needs at least one actor")
        self.actors, self.name = list(actors), name
        self._pending: list[list] = [[] for _ in self.actors]
        self._next = 0
        self.dispatched = [0] * len(self.actors)

    def __len__(self) -> int:
        return len(self.actors)

    def _prune(self) -> None:
        refs = [ref for queue in self._pending for ref in queue]
        if not refs:
            return
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        done = set(done)
        self._pending = [[ref for ref in queue if ref not in done] for queue in self._pending]

    def loads(self) -> list[int]:
        self._prune()
        return [len(queue) for queue in self._pending]

    def pick(self) -> int:
        """Index of the least-loaded actor (fewest unfinished calls); ties go round-robin."""
        loads = self.loads()
        n = len(self.actors)
        best = min(range(n), key=lambda k: (loads[(self._next + k) % n], k))
        index = (self._next + best) % n
        self._next = (index + 1) % n
        self.dispatched[index] += 1
        return index

    def replace(self, index: int, actor) -> None:
        """A new actor in place of a dead one (its unfinished calls are lost with it)."""
        self.actors[index] = actor
        self._pending[index] = []

    def track(self, index: int, ref) -> None:
        self._pending[index].append(ref)

    def depth(self) -> int:
        return sum(self.loads())

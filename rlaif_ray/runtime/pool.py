"""Least-loaded dispatch over the actors of one stage (RolloutWorkers, CriticLabelers).

The driver knows every call it submitted: `pick` returns the actor with the fewest unfinished calls
(ties broken round-robin), `track` records the ref that completes with a call. Finished calls are found
with a non-blocking `ray.wait` that fetches nothing, so the driver never pulls a batch to look at it; a batch
split into many shards prunes once (`prune`) and then picks from the counts it keeps (`pick(prune=False)`):
one `ray.wait` per pool and batch instead of one per shard (128 a step at 64 engines).
`depth` is the stage's queue: submitted calls not finished yet (running + waiting in the actors' queues).
`lives[i]` counts the faults the driver has counted against actor i: a call made in an earlier life of the actor died
with a fault already counted (one dead actor is one fault, however many calls it held).
Elastic: an actor gone for good is replaced at once, but its replacement may wait for a node (a lost node, the
autoscaler adding one). Until it answers `ready()` its index is `absent` (index -> the ref of that answer): `pick`
passes it over and the stage goes on with the actors `present`; `rejoin` takes it back.
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
        self.lives = [0] * len(self.actors)
        self.absent: dict[int, object] = {}

    def present(self) -> list[int]:
        """Indices of the actors that take calls (every one but those waiting for their replacement to come up)."""
        return [i for i in range(len(self.actors)) if i not in self.absent]

    def leave(self, index: int, replacement, ready_ref) -> None:
        """Actor `index` is gone: `replacement` takes its place once `ready_ref` (its `ready()` call) answers."""
        self.replace(index, replacement)
        self.absent[index] = ready_ref

    def rejoin(self, index: int) -> None:
        self.absent.pop(index, None)

    def __len__(self) -> int:
        return len(self.actors)

    def prune(self) -> None:
        """Forget the calls that finished (one non-blocking `ray.wait` over all the pool's unfinished calls)."""
        refs = self.unfinished()
        if not refs:
            return
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        done = set(done)
        self._pending = [[ref for ref in queue if ref not in done] for queue in self._pending]

    def loads(self, prune: bool = True) -> list[int]:
        if prune:
            self.prune()
        return [len(queue) for queue in self._pending]

    def pick(self, prune: bool = True, loads: list[int] | None = None) -> int:
        """Index of the least-loaded actor (fewest unfinished calls); ties go round-robin. `prune=False`: by the
        counts as they were at the last prune, plus the calls tracked since; `loads`: by counts the caller keeps
        (streaming calls, which no single ref completes)."""
        loads = self.loads(prune) if loads is None else loads
        n = len(self.actors)
        here = [k for k in range(n) if (self._next + k) % n not in self.absent]
        if not here:
            raise RuntimeError(f"{self.name}: no actor is up to take a call (all {n} wait for a node)")
        best = min(here, key=lambda k: (loads[(self._next + k) % n], k))
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

    def forget(self, index: int, ref) -> None:
        """The call of actor `index` that `ref` completes finished (its caller was told so: no wait needed)."""
        self._pending[index] = [r for r in self._pending[index] if r is not ref]

    def unfinished(self) -> list:
        """The refs of the calls not finished at the last prune (and of those tracked since)."""
        return [ref for queue in self._pending for ref in queue]

    def depth(self) -> int:
        return sum(self.loads())

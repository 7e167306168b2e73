"""One vLLM engine shared by several concurrent `generate_groups` calls (`rollout.engine_streams` > 1).

vLLM batches every request it holds continuously, so an engine that runs one call at a time is only as full as that
call: in group flow, at one prompt group per engine and step, `samples_per_prompt` sequences, far below what the engine
can batch. Here each call adds its requests to the one engine, and whichever call gets to the engine first steps it
(under a lock: one `step()` at a time); each finished request goes to the call that added it.

Every use of the whole engine (`generate`, `score`, sleep, and a weight update under
`rollout.in_flight_update: finish`) takes the engine exclusively: new requests are held back, the requests in flight
finish under the weights they started with (stepped by their calls, or by the waiting use), and only then the engine
is handed over, so a group is generated under one policy version. Under `in_flight_update: continue` a weight update
takes the engine between two steps (`between_steps`) and the requests in flight go on under the new weights (the
RolloutWorker has vLLM preempt them so their KV cache is recomputed; their tokens so far are kept).
"""
from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager


class BusyClock:
    """An engine's busy wall time: the seconds during which at least one call had requests in it (calls that overlap
    count once, not once each), handed out in increments: `take()` is the busy time since the previous `take()`, so
    the increments the engine's calls report add up to its busy time."""

    def __init__(self, clock=time.perf_counter):
        self.clock, self.lock = clock, threading.Lock()
        self.open_calls, self.since, self.total, self.taken = 0, 0.0, 0.0, 0.0

    @contextmanager
    def call(self):
        with self.lock:
            if self.open_calls == 0:
                self.since = self.clock()
            self.open_calls += 1
        try:
            yield
        finally:
            with self.lock:
                self.open_calls -= 1
                if self.open_calls == 0:
                    self.total += self.clock() - self.since

    def take(self) -> float:
        with self.lock:
            total = self.total + (self.clock() - self.since if self.open_calls else 0.0)
            out, self.taken = total - self.taken, total
        return out


class SharedEngine:
    def __init__(self, llm):
        self.llm = llm
        self.lock = threading.RLock()     # held while the engine steps, takes requests, or is used whole
        self.open = threading.Event()     # cleared while a whole-engine use waits for the requests in flight
        self.open.set()
        self.owners: dict[str, queue.SimpleQueue] = {}  # request id (vLLM's output id) -> its call's inbox
        self.after_step = None  # a chaos hook (RolloutWorker.inject_fault): run once, outside the lock, after a step

    def add(self, inputs: list, params: list, on_added=None) -> tuple[list[str], queue.SimpleQueue, object]:
        """Add one call's requests; returns their ids (as outputs carry them), the call's inbox and what `on_added()`
        returned: it runs under the lock right after (read the policy version there: no weight update comes between)."""
        self.open.wait()
        with self.lock:
            # enqueue answers vLLM's internal ids ("<counter>-<8 random characters>"); outputs carry the counter
            ids = [rid.rsplit("-", 1)[0] for rid in self.llm.enqueue(inputs, params, use_tqdm=False)]
            inbox = queue.SimpleQueue()
            for rid in ids:
                self.owners[rid] = inbox
            extra = on_added() if on_added else None
        return ids, inbox, extra

    def next_finished(self, inbox: queue.SimpleQueue):
        """The next finished request of the call whose inbox this is, stepping the engine while none is there."""
        while True:
            try:
                return inbox.get_nowait()
            except queue.Empty:
                pass
            if not self.lock.acquire(timeout=0.05):
                continue
            try:
                if inbox.empty():
                    self._step(caller_waits=True)
            finally:
                self.lock.release()
            hook, self.after_step = self.after_step, None
            if hook is not None:
                hook()

    def _step(self, caller_waits: bool = False) -> None:
        """One engine step, each finished request to its call's inbox. `caller_waits`: the caller still waits for a
        request of its own, so an engine with nothing left to run is an error, not the end."""
        engine = self.llm.llm_engine
        if not engine.has_unfinished_requests():
            if caller_waits:
                raise RuntimeError("the engine holds none of this call's requests any more: they never finished")
            return
        for out in engine.step():
            if out.finished:
                self.owners.pop(out.request_id).put(out)

    @contextmanager
    def between_steps(self):
        """The engine between two steps, its requests in flight left where they are."""
        with self.lock:
            yield

    @contextmanager
    def exclusive(self):
        """The whole engine: new requests held back, the ones in flight finished first (this thread steps them too)."""
        self.open.clear()
        try:
            while True:
                self.lock.acquire()
                if not self.llm.llm_engine.has_unfinished_requests():
                    break
                try:
                    self._step()
                finally:
                    self.lock.release()
            try:
                yield
            finally:
                self.lock.release()
        finally:
            self.open.set()

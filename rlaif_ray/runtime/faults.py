"""What counts as a fault, and how the driver brings a stage back after one.

- A stage actor (RolloutWorker, CriticLabeler, RewardScorer) that dies is restarted by Ray (`max_restarts`) or,
  when it is gone for good (`ray.kill`, restarts used up, its node lost), replaced by a new actor in the same
  placement bundle. `recover_pool` probes every actor of a pool and does that; the loop gives restarted engines the
  current weights and re-issues the batches that failed, under the same sample ids, to the actors left. A
  replacement that waits for a node (Ray places the lost node's bundles again once one has room) is taken back
  when it comes up (`take_back`); only a stage with no actor left waits for one, at most
  `fault.recovery_timeout_s` (`NoActorLeft`: the loop checkpoints, then stops).
- A learner rank that dies leaves the others blocked in a collective: `get_all_or_fail` returns as soon as
  one rank's call fails (`LearnerFailure`), and the loop resumes from the last checkpoint. The reward-model trainer
  lost is the same (`trainer_result`): its state is in the checkpoints, not in any other actor.
- Application errors (a bug, bad data) are not faults: they propagate unchanged, and are never retried.
"""
from __future__ import annotations

import logging
import time

import ray
from ray import exceptions as rex

from rlaif_ray.runtime.placement import room_for

log = logging.getLogger(__name__)

ACTOR_FAULTS = (rex.RayActorError, rex.ActorUnavailableError, rex.WorkerCrashedError, rex.ObjectLostError,
                rex.OwnerDiedError, rex.NodeDiedError, rex.OutOfMemoryError)


class LearnerFailure(RuntimeError):
    """A learner rank died (or its node did); the step did not happen."""


class RunStopped(RuntimeError):
    """The run cannot go on (too many faults, a judge failing past its limit); the message says why."""


class NoActorLeft(RunStopped):
    """Every actor of a stage is gone and no replacement came up within `fault.recovery_timeout_s` (the message names
    the resources no live node has); the loop writes a checkpoint before it stops."""


class StaleEngine(RuntimeError):
    """A batch came from an engine that lost its weights (restarted after the batch was submitted)."""


class StageTimeout(RuntimeError):
    """A stage actor alive but not answering within `fault.stage_timeout_s`: killed, handled like a dead one."""


def is_actor_fault(err: BaseException) -> bool:
    """An actor, its process or its node went away (also when that surfaces through a downstream task)."""
    if isinstance(err, (StaleEngine, StageTimeout, *ACTOR_FAULTS)):
        return True
    cause = getattr(err, "cause", None)
    return isinstance(err, rex.RayTaskError) and cause is not None and is_actor_fault(cause)


def get_all_or_fail(refs: list, what: str, timeout_s: float | None = None,
                    setting: str = "fault.stage_timeout_s") -> list:
    """`ray.get(refs)`, but a failed ref raises at once, even while other refs (ranks blocked in a collective
    with the failed one) never finish. Actor faults, and refs not all done within `timeout_s` (the config
    `setting` it came from, named in the error), become LearnerFailure."""
    pending, results = list(refs), {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not done:
                raise LearnerFailure(f"{what}: {len(pending)} of {len(refs)} learner ranks did not answer within "
                                     f"{timeout_s:.0f} s ({setting})")
            (ref,) = done
            try:
                results[ref] = ray.get(ref)
            except Exception as err:
                if not is_actor_fault(err):  # a rank whose peer died fails in the collective first, often by a
                    err = _dead_peer(pending) or err  # hair: the peer's death is the fault, not its error
                raise err
    except Exception as err:
        if is_actor_fault(err):
            raise LearnerFailure(f"{what}: {type(err).__name__}: {str(err).splitlines()[0][:300]}") from err
        raise
    return [results[ref] for ref in refs]


def trainer_result(ref, what: str):
    """`ray.get(ref)` of a call that needs the reward-model trainer. The trainer lost (its process or its node) is a
    LearnerFailure: its state (weights, optimizer, label buffer) is in the checkpoints, so the run resumes from the
    last one, as after a learner rank's loss."""
    try:
        return ray.get(ref)
    except Exception as err:
        if is_actor_fault(err):
            raise LearnerFailure(f"reward-model trainer ({what}): {type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:300]}") from err
        raise


def _dead_peer(refs: list, grace_s: float = 10.0) -> BaseException | None:
    """The actor fault among `refs` (the other ranks' calls) that shows within `grace_s`, if any."""
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=grace_s) if refs else ([], [])
    for ref in done:
        try:
            ray.get(ref)
        except Exception as err:
            if is_actor_fault(err):
                return err
    return None


def probe(actor, timeout_s: float, what: str = "an actor", bundle: dict | None = None):
    """The actor's `ready()` answer once it is up (waits through a restart); ActorDiedError if gone for good.
    Not up within `timeout_s`: RunStopped naming `what` and, given its `bundle`, the resources no live node has."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(actor.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
        except (rex.ActorUnavailableError, rex.GetTimeoutError):
            if time.monotonic() > deadline:
                where = f": {room_for(bundle)}" if bundle else ""
                raise RunStopped(f"{what} did not come back within {timeout_s:.0f} s (fault.recovery_timeout_s)"
                                 f"{where}")
            time.sleep(0.5)


def recover_pool(pool, factory, timeout_s: float, bundle: dict | None = None) -> tuple[list[tuple[int, object]], list[int]]:
    """Probe every actor present in `pool` (waiting through a Ray restart, at most `timeout_s`). Returns the live
    ones' (index, `ready()` answer), and the indices of those gone for good: each is replaced at once through
    `factory(index)` in its own bundle, and is absent from the pool until the replacement answers (`take_back`), so
    the stage goes on with the actors left. `bundle`: the resources one actor of the pool holds."""
    live, lost = [], []
    for i in pool.present():
        actor = pool.actors[i]
        try:
            live.append((i, probe(actor, timeout_s, f"{pool.name} actor {i}", bundle)))
        except rex.RayActorError:
            log.warning("%s actor %d is gone for good: starting a replacement", pool.name, i)
            ray.kill(actor, no_restart=True)  # make sure, and free its bundle
            fresh = factory(i)
            pool.leave(i, fresh, fresh.ready.remote())
            lost.append(i)
    return live, lost


def take_back(pool, factory, timeout_s: float | None = None, bundle: dict | None = None) -> tuple[list, int]:
    """The replacements in `pool` that answered `ready()` by now: rejoined, returned as (index, answer). With
    `timeout_s`, and no actor of the pool present, waits that long for one to answer (NoActorLeft otherwise). A
    replacement that died before it answered is replaced again; the count of those is returned beside."""
    back, again = [], 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pool.absent:
        refs = list(pool.absent.values())
        left = 0.0 if deadline is None or pool.present() else max(0.0, deadline - time.monotonic())
        done = set(ray.wait(refs, num_returns=1 if left else len(refs), timeout=left, fetch_local=False)[0])
        for i, ref in [(i, ref) for i, ref in pool.absent.items() if ref in done]:
            try:
                back.append((i, ray.get(ref)))
                pool.rejoin(i)
            except rex.RayActorError:
                log.warning("%s actor %d (a replacement) died before it came up: starting another", pool.name, i)
                fresh = factory(i)
                pool.leave(i, fresh, fresh.ready.remote())
                again += 1
        if pool.present() or deadline is None:
            return back, again
        if time.monotonic() >= deadline:
            where = f": {room_for(bundle)}" if bundle else ""
            raise NoActorLeft(f"no {pool.name} actor left: {len(pool.absent)} replacement(s) not up within "
                              f"{timeout_s:.0f} s (fault.recovery_timeout_s){where}")
    return back, again


def check_judge_failures(counts: dict, failure_limit: float, min_calls: int) -> None:
    """RunStopped when the share of failed judge calls is past the limit (counted from `min_calls` calls on)."""
    calls, failed = counts.get("judge_calls", 0), counts.get("failed_calls", 0)
    if calls >= min_calls and failed / calls > failure_limit:
        raise RunStopped(f"the judge failed {int(failed)} of {int(calls)} calls ({failed / calls:.0%}), over "
                         f"fault.judge_failure_limit={failure_limit:.0%}: check the judge endpoint "
                         "(the failed labels are skipped with their reason in samples.jsonl)")

"""Least-loaded dispatch over a stage's actors, on real Ray actors whose calls take known times."""
import time

import pytest
import ray

from rlaif_ray.runtime.accounting import busy_fractions
from rlaif_ray.runtime.faults import NoActorLeft, recover_pool, take_back
from rlaif_ray.runtime.pool import ActorPool


@ray.remote(num_cpus=0)
class Sleeper:
    def __init__(self, index: int):
        self.index = index

    def work(self, seconds: float) -> int:
        time.sleep(seconds)
        return self.index

    def ready(self) -> int:
        return self.index


def submit(pool: ActorPool, seconds: float):
    k = pool.pick()
    ref = pool.actors[k].work.remote(seconds)
    pool.track(k, ref)
    return k, ref


def test_least_loaded_dispatch_avoids_the_busy_actor(ray_cluster):
    pool = ActorPool([Sleeper.remote(i) for i in range(3)], "test")
    # three calls with nothing in flight go round-robin
    first = [submit(pool, s) for s in (3.0, 0.05, 0.05)]
    assert [k for k, _ in first] == [0, 1, 2]
    assert pool.depth() == 3 and pool.loads() == [1, 1, 1]
    ray.get([first[1][1], first[2][1]])
    # actor 0 is still busy although it is next in round-robin order: the next calls go to 1 and 2
    assert pool.loads() == [1, 0, 0]
    more = [submit(pool, 0.05)[0] for _ in range(2)]
    assert more == [1, 2]
    ray.get([a.work.remote(0) for a in pool.actors[1:]])  # drain 1 and 2 (calls run in order per actor)
    assert pool.loads() == [1, 0, 0] and pool.depth() == 1
    assert pool.dispatched == [1, 2, 2]
    ray.get(first[0][1])
    assert pool.depth() == 0
    for actor in pool.actors:
        ray.kill(actor)


def kill(actor) -> None:
    """`ray.kill`, returning once the actor is dead. The kill is asynchronous: a call sent right after it can still
    be answered (a fresh machine's suite got an answer once), so ask until the actor is gone."""
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    pytest.fail("the actor still answered 30 s after ray.kill")


def test_a_lost_actor_leaves_the_pool_until_its_replacement_is_up(ray_cluster):
    """Elastic pools: an actor gone for good is replaced at once, but its replacement waits for a node (here: a
    resource no node of the test cluster has); the pool goes on with the others, and takes it back once it is up."""
    spot = {"CPU": 0.0, "spot_node": 1.0}
    room = {"spot": False}

    def factory(i):  # a replacement that needs a spot node until one "comes" (room["spot"])
        return Sleeper.options(**({} if room["spot"] else {"resources": {"spot_node": 1}})).remote(i)

    pool = ActorPool([Sleeper.remote(i) for i in range(3)], "rollout")
    kill(pool.actors[1])
    live, lost = recover_pool(pool, factory, 10.0, spot)
    assert [i for i, _ in live] == [0, 2] and lost == [1]
    assert pool.present() == [0, 2] and list(pool.absent) == [1]
    assert [submit(pool, 0.0)[0] for _ in range(4)] == [0, 2, 0, 2]  # calls go to the actors present only
    assert take_back(pool, factory) == ([], 0)                         # not up: does not wait
    assert take_back(pool, factory, 1.0, spot) == ([], 0)              # actors present: no wait either

    for i in (0, 2):
        kill(pool.actors[i])
    live, lost = recover_pool(pool, factory, 10.0, spot)
    assert live == [] and lost == [0, 2] and pool.present() == []
    with pytest.raises(RuntimeError, match="rollout: no actor is up to take a call"):
        pool.pick()
    t0 = time.monotonic()
    with pytest.raises(NoActorLeft, match=r"no rollout actor left: 3 replacement\(s\) not up within 2 s "
                       r"\(fault.recovery_timeout_s\): it needs \{spot_node: 1\} and none of the 1 live node"):
        take_back(pool, factory, 2.0, spot)
    assert 2.0 <= time.monotonic() - t0 < 10.0

    room["spot"] = True                   # the cluster has room now; a replacement that never came up is replaced
    kill(pool.actors[1])
    back, again = take_back(pool, factory, 60.0, spot)
    assert [i for i, _ in back] == [1] and again == 1 and pool.present() == [1]
    assert submit(pool, 0.0)[0] == 1 and ray.get(pool.actors[1].work.remote(0)) == 1
    for actor in pool.actors:
        ray.kill(actor)


def test_pool_needs_an_actor():
    with pytest.raises(ValueError, match="rollout: a pool needs at least one actor"):
        ActorPool([], "rollout")


def test_busy_fraction_is_working_time_over_wall_time_per_actor():
    busy = busy_fractions({"gen": 6.0, "label": 2.5, "train": 10.0}, wall=10.0, pool_sizes={"gen": 2, "label": 1})
    assert busy == pytest.approx({"gen": 0.3, "label": 0.25, "train": 1.0})
    assert busy_fractions({"gen": 1.0}, wall=0.0, pool_sizes={}) == {"gen": 0.0}

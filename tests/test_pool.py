"""Least-loaded dispatch over a stage's actors, on real Ray actors whose calls take known times."""
import time

import pytest
import ray

from rlaif_ray.runtime.accounting import busy_fractions
from rlaif_ray.runtime.pool import ActorPool


@ray.remote(num_cpus=0)
class Sleeper:
    def __init__(self, index: int):
        self.index = index

    def work(self, seconds: float) -> int:
        time.sleep(seconds)
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


def test_pool_needs_an_actor():
    with pytest.raises(ValueError, match="rollout: a pool needs at least one actor"):
        ActorPool([], "rollout")


def test_busy_fraction_is_working_time_over_wall_time_per_actor():
    busy = busy_fractions({"gen": 6.0, "label": 2.5, "train": 10.0}, wall=10.0, pool_sizes={"gen": 2, "label": 1})
    assert busy == pytest.approx({"gen": 0.3, "label": 0.25, "train": 1.0})
    assert busy_fractions({"gen": 1.0}, wall=0.0, pool_sizes={}) == {"gen": 0.0}

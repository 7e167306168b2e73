"""Which pairs of one prompt group's responses the pairwise judge compares (`critic.pairs`). Judging every pair
costs n(n-1) judge prompts per group (both orders); the other modes grow with n. The labeler judges each
selected pair in both orders."""
from __future__ import annotations

import itertools
import random


def select_pairs(n: int, mode: str = "all", k: int = 2, seed: str = "") -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of the positions 0..n-1 of a group of n responses, sorted, no duplicates:
    `all` every pair, n(n-1)/2; `anchor` position 0 (the reference response) vs each other one, n-1;
    `round_robin` i vs i+1 mod n, n pairs (one for n=2), each response in two; `random_k` each response vs
    min(k, n-1) others drawn by `random.Random(seed)` (between n·k/2 and n·k pairs, capped at all of them)."""
    if mode == "all":
        return list(itertools.combinations(range(n), 2))
    if mode == "anchor":
        return [(0, j) for j in range(1, n)]
    if mode == "round_robin":
        pairs = {(min(i, (i + 1) % n), max(i, (i + 1) % n)) for i in range(n)} if n > 1 else set()
    elif mode == "random_k":
        rng = random.Random(seed)
        pairs = {(min(i, j), max(i, j)) for i in range(n)
                 for j in rng.sample([j for j in range(n) if j != i], min(k, n - 1))}
    else:
        raise ValueError(f"unknown pair selection '{mode}' (all, anchor, round_robin, random_k)")
    return sorted(pairs)

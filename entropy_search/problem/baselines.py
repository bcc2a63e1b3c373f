"""What the RL agent must beat, under the same FLOPs budget and the same number of candidate evaluations.

* `uniform_counts` / `uniform_baseline`: one keep ratio for every group, the largest that meets the target (one candidate);
  with `shallow_blocks` dropped, its shallower variant (`uniform_shallow` in a search).
* `random_search`: random actions in [-1, 1] with AMC's action clipping (`Budget`, as the environment), one per
  residual block (dropped below 0) and one per channel group, as many distinct candidates as the agent
  evaluated; the best by reward wins.

Both work on channel counts through `Budget`, so they obey the same rounding and
the same budget arithmetic as the environment. Pure PyTorch/NumPy: no Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from .blocks import ResidualBlock
from .budget import Budget

Evaluate = Callable[..., dict]
"""`evaluate(counts, dropped=blocks)`: a candidate's record."""


def uniform_counts(budget: Budget, iterations: int = 60) -> tuple[float, list[int]]:
    """The largest single keep ratio r in [min_keep, 1] whose rounded counts meet the target, and those counts."""
    ratio = budget.uniform_rest([], iterations)
    counts = budget.counts_at(ratio)
    if not budget.within(counts):
        # rounding can make the uniform floor miss a target the per-group minimum meets
        return ratio, list(budget.min_counts)
    return ratio, counts


def random_counts(budget: Budget, rng: np.random.Generator) -> list[int]:
    """One random candidate: uniform actions in [-1, 1], mapped and clipped group by group as the environment does."""
    counts: list[int] = []
    for _ in range(budget.n):
        counts.append(budget.step(counts, float(rng.uniform(-1.0, 1.0)))[0])
    return counts


def random_candidate(budget: Budget, rng: np.random.Generator) -> tuple[frozenset[int], list[int]]:
    """One random candidate as the environment draws it: a uniform action in [-1, 1] for each residual block of the
    space (dropped below 0, as `Budget.block_step` allows), then random channel counts under the budget of the
    blocks kept. Without blocks, the same draws as `random_counts`."""
    dropped: set[int] = set()
    for block in range(len(budget.space.blocks)):
        if budget.block_step(dropped, block, float(rng.uniform(-1.0, 1.0)))[0]:
            dropped.add(block)
    blocks = frozenset(dropped)
    return blocks, random_counts(budget.given(blocks), rng)


def shallow_blocks(blocks: Sequence[ResidualBlock]) -> frozenset[int]:
    """The residual blocks uniform pruning's shallower variant drops: the last block of every stage of two or more
    blocks but the last such stage, a stage being a run of consecutive blocks of one shape. On ResNet-20 that is
    bench/bench_depth.py's 1-1-0, the variant that beat uniform pruning by +0.82 points at equal latency."""
    stages: list[list[ResidualBlock]] = []
    for block in blocks:
        if stages and stages[-1][-1].shape == block.shape and stages[-1][-1].index == block.index - 1:
            stages[-1].append(block)
        else:
            stages.append([block])
    long = [stage for stage in stages if len(stage) >= 2]
    return frozenset(stage[-1].index for stage in long[:-1])


def uniform_baseline(budget: Budget, evaluate: Evaluate) -> dict:
    """Evaluate the uniform candidate (without the blocks `budget.dropped`); returns its record with
    `uniform_keep` (the common ratio)."""
    t0 = time.perf_counter()
    ratio, counts = uniform_counts(budget)
    record = dict(evaluate(counts, dropped=budget.dropped) if budget.dropped else evaluate(counts))
    record["uniform_keep"] = ratio
    return {"best": record, "evaluations": 1, "seconds": time.perf_counter() - t0}


def random_search(
    budget: Budget,
    evaluate: Evaluate,
    num_candidates: int,
    *,
    seed: int = 0,
    max_draws_factor: int = 20,
    on_candidate: Callable[[dict], None] | None = None,
) -> dict:
    """Random search with AMC clipping: `num_candidates` distinct candidates (fewer when the space is
    smaller than that), the best by reward. Returns {best, evaluations, rewards, seconds}."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    seen: set[tuple] = set()
    best: dict | None = None
    rewards: list[float] = []
    draws = 0
    while len(seen) < num_candidates and draws < max_draws_factor * max(num_candidates, 1):
        draws += 1
        dropped, counts = random_candidate(budget, rng)  # a group inside a dropped block is always whole
        key = (tuple(sorted(dropped)), *counts)
        if key in seen:
            continue
        seen.add(key)
        record = dict(evaluate(counts, dropped=dropped) if dropped else evaluate(counts))
        rewards.append(float(record["reward"]))
        if on_candidate is not None:
            on_candidate(record)
        if best is None or record["reward"] > best["reward"]:
            best = record
    return {
        "best": best,
        "evaluations": len(seen),
        "reward_mean": float(np.mean(rewards)) if rewards else None,
        "reward_max": float(np.max(rewards)) if rewards else None,
        "seconds": time.perf_counter() - t0,
    }

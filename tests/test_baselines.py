"""The baselines the agent must beat (`entropy_search.problem.baselines`): uniform and random search under
the same budget arithmetic as the environment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entropy_search.models import create_model
from entropy_search.problem import (
    Budget,
    PruningSpace,
    random_candidate,
    random_counts,
    random_search,
    shallow_blocks,
    uniform_baseline,
    uniform_counts,
)


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return PruningSpace(create_model("resnet20").eval(), torch.zeros(1, 3, 32, 32), round_to=4)


def test_baselines_meet_the_budget_with_the_same_arithmetic(resnet20):
    space = resnet20
    budget = Budget(space, 0.4, 0.1, 0.9)
    ratio, counts = uniform_counts(budget)
    assert space.macs_of_counts(counts) <= 0.4 * space.base_macs
    assert counts == [budget.count_of(g, ratio) for g in range(budget.n)]
    bigger = [budget.count_of(g, min(1.0, ratio + 0.02)) for g in range(budget.n)]
    assert bigger == counts or space.macs_of_counts(bigger) > 0.4 * space.base_macs  # the largest such ratio

    def fake_evaluate(c, dropped=()):
        blocks = space.check_dropped(dropped)
        return {"kept_channels": list(c), "dropped_blocks": space.dropped_names(blocks), "reward": -float(np.std(c)),
                "macs": space.macs_of_counts(c, blocks)}

    uniform = uniform_baseline(budget, fake_evaluate)
    assert uniform["evaluations"] == 1 and uniform["best"]["uniform_keep"] == ratio
    assert uniform["best"]["kept_channels"] == counts
    seen = []
    result = random_search(budget, fake_evaluate, 25, seed=3, on_candidate=seen.append)
    assert result["evaluations"] == 25 == len({(*r["kept_channels"], *r["dropped_blocks"]) for r in seen})
    assert all(0.9 * 0.4 * space.base_macs <= r["macs"] <= 0.4 * space.base_macs for r in seen)
    assert len({len(r["dropped_blocks"]) for r in seen}) > 1, "random search draws depth too"
    assert result["best"]["reward"] == max(r["reward"] for r in seen) == result["reward_max"]
    assert result["reward_mean"] == pytest.approx(np.mean([r["reward"] for r in seen]))
    again = random_search(budget, fake_evaluate, 25, seed=3)
    assert again["best"]["kept_channels"] == result["best"]["kept_channels"]  # seeded


def test_uniform_keeps_everything_when_the_target_allows_it(resnet20):
    budget = Budget(resnet20, 1.0, 0.1)
    assert uniform_counts(budget) == (1.0, [g.channels for g in resnet20.groups])


def test_random_depth_is_the_environments_clipping_of_random_block_actions(resnet20):
    budget = Budget(resnet20, 0.3, 0.1, 0.97)
    rng, replay = np.random.default_rng(4), np.random.default_rng(4)
    for _ in range(10):
        dropped, counts = random_candidate(budget, rng)
        expected: set[int] = set()
        for b in range(len(resnet20.blocks)):
            if budget.block_step(expected, b, float(replay.uniform(-1.0, 1.0)))[0]:
                expected.add(b)
        assert dropped == expected
        assert counts == random_counts(budget.given(dropped), replay)
        assert all(counts[g] == resnet20.groups[g].channels for g in resnet20.idle_groups(dropped))


def test_random_candidates_are_the_environments_clipping_of_random_actions(resnet20):
    budget = Budget(resnet20, 0.3, 0.1)
    rng, replay = np.random.default_rng(9), np.random.default_rng(9)
    for _ in range(10):
        counts = random_counts(budget, rng)
        expected: list[int] = []
        for g in range(budget.n):
            keep = budget.keep_of_action(float(replay.uniform(-1.0, 1.0)))
            expected.append(budget.clip(g, expected, budget.count_of(g, keep)))
        assert counts == expected and budget.macs(counts) <= budget.target_macs


def test_random_search_stops_when_the_space_has_fewer_candidates():
    space = PruningSpace(create_model("digits_cnn", width=4).eval(), torch.zeros(1, 1, 8, 8), round_to=4)
    budget = Budget(space, 1.0, 0.1)  # every group has one or two options: a handful of candidates in all
    calls = []
    result = random_search(budget, lambda c, dropped=(): calls.append((*c, *sorted(dropped))) or {"reward": 0.0},
                           1000, max_draws_factor=2)
    assert result["evaluations"] == len(calls) == len(set(calls)) < 1000
    empty = random_search(budget, lambda c: {"reward": 0.0}, 0)
    assert empty["best"] is None and empty["evaluations"] == 0 and empty["reward_mean"] is None


def test_uniform_pruning_has_a_shallower_variant(resnet20):
    """The last block of every stage of two or more blocks but the last (ResNet-20: bench_depth's 1-1-0), found from
    the blocks' shapes, pruned uniformly under the same budget."""
    shallow = shallow_blocks(resnet20.blocks)
    assert resnet20.dropped_names(shallow) == ["layer1.2", "layer2.2"]
    budget = Budget(resnet20, 0.4, 0.1)
    calls = []

    def evaluate(counts, dropped=()):
        calls.append(sorted(dropped))
        return {"kept_channels": list(counts), "macs": resnet20.macs_of_counts(counts, frozenset(dropped))}

    variant = uniform_baseline(budget.given(shallow), evaluate)["best"]
    full = uniform_baseline(budget, evaluate)["best"]
    assert calls == [sorted(shallow), []]
    assert variant["uniform_keep"] > full["uniform_keep"], "the blocks' MACs buy width"
    assert variant["macs"] <= 0.4 * resnet20.base_macs
    digits = PruningSpace(create_model("digits_cnn").eval(), torch.zeros(1, 1, 8, 8))
    assert shallow_blocks(digits.blocks) == frozenset(), "one stage of one block: no variant"

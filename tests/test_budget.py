"""The FLOPs budget (`entropy_search.problem.budget`): AMC's action clipping on rounded channel counts meets
the target by construction, uses it (with the floor), and rests on an exact quadratic form of the MACs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import space_of

from entropy_search.errors import ConfigError
from entropy_search.problem import Budget, MacsForm


def episode(budget: Budget, actions) -> tuple[list[int], list[float]]:
    """One candidate from one action per group, decided group by group (what the environment does)."""
    counts: list[int] = []
    desired_keep: list[float] = []
    for a in actions:
        count, keep, _ = budget.step(counts, float(a))
        desired_keep.append(keep)
        counts.append(count)
    return counts, desired_keep


@pytest.mark.parametrize(
    "name, round_to, targets",
    [
        ("digits_cnn", 1, (0.05, 0.2, 0.5, 0.9)),
        ("digits_cnn", 4, (0.1, 0.5)),
        ("resnet20", 1, (0.1, 0.33, 0.5)),
        ("resnet20", 8, (0.2, 0.5)),
        ("mobilenet_v2", 8, (0.2, 0.5)),
    ],
)
def test_budget_always_met_over_random_action_sequences(name, round_to, targets):
    rng = np.random.default_rng(0)
    space = space_of(name, round_to)
    for target in targets:
        for min_keep, floor in ((0.05, 0.0), (0.2, 0.9)):
            budget = Budget(space, target, min_keep, floor)
            budget.check()
            above_floor = 0
            n = budget.n
            sequences = [np.ones(n), -np.ones(n), np.full(n, 5.0), np.full(n, -7.0)]
            sequences += [rng.uniform(-1, 1, n) for _ in range(40)]
            sequences += [rng.choice([-1.0, 1.0], n) for _ in range(10)]
            sequences += [rng.normal(0, 3, n) for _ in range(10)]  # unclipped Gaussian actions
            for actions in sequences:
                counts, desired_keep = episode(budget, actions)
                keep = space.counts_to_keep(counts)
                macs = space.macs_of_counts(counts)
                assert macs <= target * space.base_macs, (name, target, actions)
                assert macs == space.macs(keep) == budget.macs(counts)  # analytic count of the rounded candidate
                assert space.kept_channels(keep) == counts
                assert all(min_keep - 1e-9 <= k <= 1.0 for k in desired_keep)
                assert all(0 < k <= 1 for k in keep)
                above_floor += macs >= floor * target * space.base_macs
            # the floor is soft (rounding can make it unreachable) but met almost always
            assert above_floor >= (len(sequences) if round_to == 1 else 0.9 * len(sequences)), (name, target)


def test_clipping_keeps_as_much_as_the_budget_allows():
    """With 'keep everything' actions each group keeps the largest count that leaves the target reachable."""
    space = space_of("resnet20")
    budget = Budget(space, 0.5, 0.1)
    counts, _ = episode(budget, np.ones(budget.n))
    for g in range(budget.n):
        opts = budget.options[g].tolist()
        i = opts.index(counts[g])
        if i + 1 < len(opts):
            trial = counts[:g] + [opts[i + 1]] + budget.min_counts[g + 1:]
            assert space.macs_of_counts(trial) > budget.target_macs
    assert budget.macs_ratio(counts) > 0.45  # the budget is used, not wasted


def test_floor_makes_candidates_use_the_budget():
    """With the floor, even 'prune everything' actions give a network of about the target's cost."""
    space = space_of("resnet20")
    for floor in (0.5, 0.9):
        budget = Budget(space, 0.5, 0.1, floor)
        counts, _ = episode(budget, -np.ones(budget.n))
        assert floor * 0.5 <= budget.macs_ratio(counts) <= 0.5
    budget = Budget(space, 0.5, 0.1, 0.0)
    counts, _ = episode(budget, -np.ones(budget.n))
    assert counts == budget.min_counts  # AMC's one-sided clipping


def test_nan_action_is_treated_as_min_keep():
    budget = Budget(space_of("digits_cnn"), 0.5, 0.1)
    assert budget.keep_of_action(float("nan")) == pytest.approx(0.1)
    counts, _ = episode(budget, [float("nan")] * budget.n)
    assert counts == budget.min_counts


def test_actions_map_linearly_onto_keep_ratios():
    budget = Budget(space_of("digits_cnn"), 0.5, 0.2)
    assert budget.keep_of_action(-1.0) == pytest.approx(0.2)
    assert budget.keep_of_action(1.0) == pytest.approx(1.0)
    assert budget.keep_of_action(0.0) == pytest.approx(0.6)
    assert budget.keep_of_action(0.5) == pytest.approx(0.8)
    assert budget.keep_of_action(7.0) == pytest.approx(1.0) and budget.keep_of_action(-7.0) == pytest.approx(0.2)


def test_an_absolute_step_is_the_action_mapped_rounded_and_clipped():
    """`step` in the default (AMC's) action space: keep_of_action, then the space's rounding, then `clip`."""
    budget = Budget(space_of("resnet20", 4), 0.4, 0.1, 0.5)
    assert budget.action_space == "absolute"
    rng = np.random.default_rng(2)
    for _ in range(20):
        counts: list[int] = []
        for g, a in enumerate(rng.uniform(-1.5, 1.5, budget.n)):
            count, keep, clipped = budget.step(counts, float(a))
            desired = budget.count_of(g, budget.keep_of_action(float(a)))
            assert keep == budget.keep_of_action(float(a)) == budget.desired_keep(g, counts, float(a))
            assert count == budget.clip(g, counts, desired) and clipped == (count != desired)
            counts.append(count)


def test_options_are_the_rounded_counts_between_min_keep_and_full():
    space = space_of("resnet20", 8)
    budget = Budget(space, 0.5, 0.3)
    for g, group in enumerate(budget.groups):
        opts = budget.options[g].tolist()
        assert opts == sorted(set(opts))
        assert opts[0] == budget.min_counts[g] == space.round_count(0.3, group.channels)
        assert opts[-1] == group.channels
        assert all(c % 8 == 0 or c == group.channels for c in opts)
        assert budget.count_of(g, 0.5) == space.round_count(0.5, group.channels)
    assert budget.min_macs == space.macs_of_counts(budget.min_counts)
    assert budget.full_counts == [g.channels for g in budget.groups]


def test_unreachable_target_is_a_config_error():
    space = space_of("digits_cnn")
    budget = Budget(space, 0.005, 0.5)
    assert not budget.feasible()
    with pytest.raises(ConfigError, match=r"search.flops_target: 0.005 cannot be met.*min_keep=0.5"):
        budget.check()
    Budget(space, 0.5, 0.1).check()


@pytest.mark.parametrize("name, round_to", [("digits_cnn", 1), ("resnet20", 8), ("mobilenet_v2", 8)])
def test_macs_form_is_the_exact_mac_count(name, round_to):
    """The quadratic form equals the space's layer-by-layer count, for whole candidates and along one group."""
    space = space_of(name, round_to)
    form = MacsForm(space)
    assert form.exact
    rng = np.random.default_rng(1)
    full = [g.channels for g in space.groups]
    for _ in range(20):
        counts = [int(rng.integers(1, c + 1)) for c in full]
        assert form(counts) == space.macs_of_counts(counts)
        g = int(rng.integers(0, len(full)))
        values = np.arange(1, full[g] + 1)
        expected = [space.macs_of_counts(counts[:g] + [int(v)] + counts[g + 1:]) for v in values]
        assert form.along(g, counts, values).tolist() == expected
    assert form(full) == space.base_macs


def test_macs_form_falls_back_to_the_space_when_not_exact():
    space = space_of("digits_cnn")
    form = MacsForm(space)
    form.exact = False  # what an exotic layer that is not quadratic in the counts leads to
    form.B[:] = 0  # the coefficients are no longer used
    counts = [3, 5, 7, 9][: len(space.groups)]
    assert form(counts) == space.macs_of_counts(counts)
    values = np.array([1, 2, 3])
    assert form.along(0, counts, values).tolist() == [space.macs_of_counts([int(v)] + counts[1:]) for v in values]


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2"])
def test_the_budget_of_a_shallower_candidate_leaves_its_dropped_blocks_out(name):
    """`given(dropped)`: the same target for candidates without those blocks, its MAC form exact, its groups inside
    a dropped block kept whole; `block_step` drops a block only while the floor stays reachable."""
    space = space_of(name, 1)
    budget = Budget(space, 0.3, 0.1, 0.97)
    rng = np.random.default_rng(2)
    for _ in range(5):
        dropped = frozenset(int(b) for b in np.nonzero(rng.random(len(space.blocks)) < 0.5)[0])
        shallow = budget.given(dropped)
        assert shallow is budget.given(set(dropped)) and shallow.target == budget.target
        assert shallow.macs.exact and shallow.idle == frozenset(space.idle_groups(dropped))
        identified = MacsForm(space, dropped=dropped)  # the form derived from the blocks' parts is the same
        assert shallow.macs.k0 == identified.k0 and np.array_equal(shallow.macs.a, identified.a)
        assert np.array_equal(shallow.macs.B, identified.B) and shallow.options is budget.options
        for _ in range(5):
            counts, _ = episode(shallow, rng.uniform(-1, 1, budget.n))
            assert shallow.macs(counts) == space.macs_of_counts(counts, dropped) <= budget.target
            assert all(counts[g] == space.groups[g].channels for g in shallow.idle)
    assert budget.block_step(set(), 0, 0.0) == (False, False) and budget.block_step(set(), 0, -0.1) == (True, False)
    drops: set[int] = set()
    for b in range(len(space.blocks)):  # drop every block the floor allows
        drop, overridden = budget.block_step(drops, b, -1.0)
        whole = budget.given(drops | {b})
        assert drop == (whole.cost(whole.full_counts) >= budget.floor) and overridden == (not drop)
        drops |= {b} if drop else set()
    starving = Budget(space, 0.9, 0.1, 0.99)  # at 90% of the MACs the floor cannot lose every block
    dropped_all = set()
    for b in range(len(space.blocks)):
        if starving.block_step(dropped_all, b, -1.0)[0]:
            dropped_all.add(b)
    assert len(dropped_all) < len(space.blocks)

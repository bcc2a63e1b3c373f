"""Rewards: values, dispatch by name, bad measurements."""

from __future__ import annotations

import math

import pytest
import torch

from entropy_search.errors import EntropySearchError
from entropy_search.problem.rewards import (
    REWARDS,
    accuracy_flops_reward,
    accuracy_reward,
    compute_reward,
    entropy_reward,
    required_measurements,
)

MEASURED = {"entropy": 2.5, "accuracy": 0.9, "macs": 125_750_000, "params": 850_000}


def test_values():
    assert entropy_reward(2.5) == -2.5
    assert accuracy_reward(0.9) == 0.9
    assert accuracy_flops_reward(0.9, 1e6) == pytest.approx(-0.1 * math.log(1e6))
    assert accuracy_flops_reward(1.0, 1e6) == 0.0
    assert entropy_reward(torch.tensor(1.5)) == -1.5  # a 0-d tensor is a number


def test_ordering_matches_intent():
    """Lower entropy, higher accuracy, fewer MACs at equal error: all give a higher reward."""
    assert entropy_reward(1.0) > entropy_reward(2.0)
    assert accuracy_reward(0.95) > accuracy_reward(0.9)
    assert accuracy_flops_reward(0.9, 1e6) > accuracy_flops_reward(0.9, 1e8)
    assert accuracy_flops_reward(0.95, 1e8) > accuracy_flops_reward(0.9, 1e8)


def test_every_configurable_reward_is_computable():
    """`search.reward` accepts exactly the rewards `compute_reward` knows."""
    from typing import get_args

    from entropy_search.config import SearchSettings

    assert set(REWARDS) == set(get_args(SearchSettings.model_fields["reward"].annotation))
    assert {"entropy", "accuracy", "accuracy_flops"} <= set(REWARDS)


def test_compute_reward_by_name():
    assert compute_reward("entropy", MEASURED) == -2.5
    assert compute_reward("accuracy", MEASURED) == 0.9
    assert compute_reward("accuracy_flops", MEASURED) == pytest.approx(-0.1 * math.log(125_750_000))
    assert required_measurements("accuracy_flops") == ("accuracy", "macs")
    assert isinstance(compute_reward("entropy", {"entropy": 1}), float)


@pytest.mark.parametrize(
    "name, measurements, match",
    [
        ("fitness", MEASURED, "unknown reward"),
        ("entropy", {"accuracy": 0.9}, "'entropy'"),
        ("accuracy_flops", {"accuracy": 0.9}, "'macs'"),
        ("accuracy", {"accuracy": None}, "'accuracy'"),
        ("accuracy", {"accuracy": 93.5}, r"\[0, 1\]"),
        ("accuracy", {"accuracy": -0.1}, r"\[0, 1\]"),
        ("entropy", {"entropy": float("nan")}, "finite"),
        ("entropy", {"entropy": "low"}, "number"),
        ("entropy", {"entropy": True}, "finite number"),
        ("accuracy_flops", {"accuracy": 0.9, "macs": 0}, "positive"),
        ("accuracy_flops", {"accuracy": 0.9, "macs": float("inf")}, "finite"),
    ],
)
def test_bad_measurements(name, measurements, match):
    with pytest.raises(EntropySearchError, match=match):
        compute_reward(name, measurements)


def test_proxy_agreement_ranks_candidates_like_accuracy():
    from entropy_search.problem.rewards import proxy_agreement

    aligned = [{"entropy": 3.0 - a, "accuracy": a, "reward": -(3.0 - a)} for a in (0.1, 0.5, 0.7, 0.9)]
    got = proxy_agreement(aligned)
    assert got == {"candidates": 4, "entropy_reward_vs_accuracy": pytest.approx(1.0), "reward_vs_accuracy": pytest.approx(1.0)}
    opposite = [{"entropy": a, "accuracy": a, "reward": a} for a in (0.1, 0.5, 0.7, 0.9)]
    got = proxy_agreement(opposite)
    assert got["entropy_reward_vs_accuracy"] == pytest.approx(-1.0) and got["reward_vs_accuracy"] == pytest.approx(1.0)
    # too few, unlabeled or constant: no number rather than a made-up one
    assert proxy_agreement(aligned[:2])["entropy_reward_vs_accuracy"] is None
    assert proxy_agreement([{"entropy": 1.0, "accuracy": None, "reward": -1.0}] * 5)["candidates"] == 0
    assert proxy_agreement([{"entropy": e, "accuracy": 0.5, "reward": -e} for e in (1, 2, 3)])["reward_vs_accuracy"] is None

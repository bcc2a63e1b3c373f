"""Rewards of a candidate pruned network: pure functions of its measurements (DESIGN.md, "Reward").

- ``entropy`` (the paper's, label-free): minus the network's mean spatial entropy (nats) over the
  kept channels of the measured layers; lower entropy is better.
- ``accuracy`` (AMC's R_err): held-out top-1 accuracy in [0, 1] (a split of the training set,
  never the test set).
- ``accuracy_flops`` (AMC's R_FLOPs): ``-(1 - accuracy) * log(macs)``, MACs of one forward pass.

`compute_reward` picks one by name from a candidate's measurements dict, which may hold more keys
(every candidate records entropy, accuracy, MACs, ... whatever the reward).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping

from .errors import EntropySearchError

__all__ = ["REWARDS", "accuracy_flops_reward", "accuracy_reward", "compute_reward", "entropy_reward", "required_measurements"]


def entropy_reward(entropy: float) -> float:
    """Minus the spatial entropy (nats): the search minimises entropy."""
    return -_finite("entropy", entropy)


def accuracy_reward(accuracy: float) -> float:
    """Held-out top-1 accuracy as a fraction in [0, 1] (AMC's R_err up to a constant)."""
    return _accuracy(accuracy)


def accuracy_flops_reward(accuracy: float, macs: float) -> float:
    """AMC's R_FLOPs: ``-(1 - accuracy) * log(macs)``; error weighted by the log of the compute."""
    macs = _finite("macs", macs)
    if macs <= 0:
        raise EntropySearchError(f"measurement 'macs' must be positive, got {macs!r}")
    return -(1.0 - _accuracy(accuracy)) * math.log(macs)


REWARDS: dict[str, Callable[..., float]] = {
    "entropy": entropy_reward,
    "accuracy": accuracy_reward,
    "accuracy_flops": accuracy_flops_reward,
}


def required_measurements(name: str) -> tuple[str, ...]:
    """The measurement keys reward `name` reads (its function's parameter names)."""
    return tuple(inspect.signature(_reward(name)).parameters)


def compute_reward(name: str, measurements: Mapping[str, float]) -> float:
    """The reward `name` of a candidate from its measurements (extra keys are ignored)."""
    fn = _reward(name)
    needed = required_measurements(name)
    missing = [k for k in needed if k not in measurements or measurements[k] is None]
    if missing:
        raise EntropySearchError(
            f"reward {name!r} needs measurement(s) {', '.join(map(repr, missing))}; got {sorted(measurements)}"
        )
    return float(fn(**{k: measurements[k] for k in needed}))


def _reward(name: str) -> Callable[..., float]:
    if name not in REWARDS:
        raise EntropySearchError(f"unknown reward {name!r}; known: {', '.join(REWARDS)}")
    return REWARDS[name]


def _finite(key: str, value: float) -> float:
    """`value` as a finite float, else a clear error naming the measurement."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise EntropySearchError(f"measurement {key!r} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise EntropySearchError(f"measurement {key!r} must be a finite number, got {value!r}")
    return number


def _accuracy(accuracy: float) -> float:
    acc = _finite("accuracy", accuracy)
    if not 0.0 <= acc <= 1.0:
        raise EntropySearchError(f"measurement 'accuracy' must be a fraction in [0, 1], got {accuracy!r}")
    return acc

"""Rewards of a candidate pruned network: pure functions of its measurements (docs/design.md, "Rewards").

- ``entropy`` (the paper's, label-free): minus the network's mean spatial entropy (nats) over the
  kept channels of the measured layers; lower entropy is better.
- ``accuracy`` (AMC's R_err): held-out top-1 accuracy in [0, 1] (a split of the training set,
  never the test set).
- ``accuracy_flops`` (AMC's R_FLOPs): ``-(1 - accuracy) * log(macs)``, MACs of one forward pass.
- ``agreement`` (label-free, the default): the share of images on which the candidate's top-1 class is the
  unpruned network's: held-out accuracy with the unpruned network's predictions as the labels.
- ``kl`` (label-free): minus KL(p_unpruned || p_candidate) of the softmax outputs on the same images.
- ``feature`` (label-free): minus the relative error of the classifier's input features.
- ``entropy_normalized`` (label-free, a study): minus the spatial entropy with each map's entropy divided
  by the most its size and level count allow.

`compute_reward` picks one by name from a candidate's measurements dict, which may hold more keys
(every candidate records entropy, accuracy, MACs, ... whatever the reward).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence

from scipy.stats import spearmanr

from ..errors import EntropySearchError

__all__ = [
    "LABEL_FREE_REWARDS",
    "REWARDS",
    "accuracy_flops_reward",
    "accuracy_reward",
    "agreement_reward",
    "choose_default_reward",
    "collapse_rate",
    "compute_reward",
    "entropy_normalized_reward",
    "entropy_reward",
    "feature_reward",
    "kl_reward",
    "proxy_agreement",
    "required_measurements",
]


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


def entropy_normalized_reward(entropy_normalized: float) -> float:
    """Minus the spatial entropy with each map's entropy divided by the most its size allows (a study of the
    paper's reward without the cap small maps put on it)."""
    return -_finite("entropy_normalized", entropy_normalized)


def kl_reward(kl: float) -> float:
    """Minus the KL divergence (nats) from the unpruned network's softmax to the candidate's on the same
    unlabeled images: how much of the network's function is left, without labels."""
    value = _finite("kl", kl)
    if value < 0:
        raise EntropySearchError(f"measurement 'kl' must be >= 0, got {kl!r}")
    return -value


def agreement_reward(agreement: float) -> float:
    """The share of images whose top-1 class is the unpruned network's, in [0, 1]: how much of the network's
    decisions is left, without labels (it ranks candidates as held-out accuracy does where the unpruned network
    is accurate; bench/RESULTS.md, "Choosing the default reward")."""
    value = _finite("agreement", agreement)
    if not 0.0 <= value <= 1.0:
        raise EntropySearchError(f"measurement 'agreement' must be a fraction in [0, 1], got {agreement!r}")
    return value


def feature_reward(feature_error: float) -> float:
    """Minus the relative error of the classifier's input features against the unpruned network's (label-free)."""
    value = _finite("feature_error", feature_error)
    if value < 0:
        raise EntropySearchError(f"measurement 'feature_error' must be >= 0, got {feature_error!r}")
    return -value


REWARDS: dict[str, Callable[..., float]] = {
    "entropy": entropy_reward,
    "accuracy": accuracy_reward,
    "accuracy_flops": accuracy_flops_reward,
    "kl": kl_reward,
    "agreement": agreement_reward,
    "feature": feature_reward,
    "entropy_normalized": entropy_normalized_reward,
}

#: Rewards that need no labels (the paper's spatial entropy, and the comparisons with the unpruned network).
LABEL_FREE_REWARDS = ("entropy", "agreement", "kl", "feature", "entropy_normalized")


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


def proxy_agreement(records: Sequence[Mapping[str, float | None]]) -> dict[str, float | int | None]:
    """How well the label-free reward ranks candidates as held-out accuracy does: Spearman rank correlations
    over the evaluated candidates (1 = the same order, 0 = none, -1 = the opposite) of the entropy reward
    (minus entropy) and of the search's own reward with held-out accuracy. None where fewer than 3
    candidates have both numbers or one of them is constant."""
    def rho(xs: list[float], ys: list[float]) -> float | None:
        if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
            return None
        value = float(spearmanr(xs, ys).statistic)
        return value if math.isfinite(value) else None

    both = [r for r in records if r.get("accuracy") is not None and r.get("entropy") is not None]
    rewarded = [r for r in records if r.get("accuracy") is not None and r.get("reward") is not None]
    return {
        "candidates": len(both),
        "entropy_reward_vs_accuracy": rho([-float(r["entropy"]) for r in both], [float(r["accuracy"]) for r in both]),
        "reward_vs_accuracy": rho([float(r["reward"]) for r in rewarded], [float(r["accuracy"]) for r in rewarded]),
    }


def choose_default_reward(spearman: Mapping[str, Mapping[str, float | None]], *, threshold: float = 0.6,
                          candidates: Sequence[str] = LABEL_FREE_REWARDS) -> str | None:
    """The protocol's choice of the default reward (docs/design.md, "Rewards"): `spearman[case][reward]` is the
    rank correlation of a label-free reward with held-out accuracy on a development case. A reward qualifies
    when it reaches `threshold` on every case; the paper's `entropy` wins if it qualifies, else the qualifying
    reward with the best worst case (ties: the order of `candidates`). None when no reward qualifies."""
    if not spearman:
        return None

    def worst(reward: str) -> float:
        values = [case.get(reward) for case in spearman.values()]
        return min(float(v) if v is not None and math.isfinite(float(v)) else -math.inf for v in values)

    qualified = [r for r in candidates if worst(r) >= threshold]
    if not qualified:
        return None
    if "entropy" in qualified:
        return "entropy"
    return max(qualified, key=lambda r: (worst(r), -list(candidates).index(r)))


def collapse_rate(accuracies: Sequence[float | None], num_classes: int, *, factor: float = 2.0) -> float | None:
    """Share of candidates that collapsed: held-out accuracy under `factor` x chance (1 / num_classes).
    None when no candidate has an accuracy."""
    values = [float(a) for a in accuracies if a is not None]
    if not values:
        return None
    return sum(a < factor / num_classes for a in values) / len(values)

"""Evaluating a candidate (one keep ratio per group) without surgery: everything the reward and the
records need, from one forward pass of a fixed batch (docs/design.md, "Evaluating a candidate").

`CandidateEvaluator` measures; `CandidateCache` is the one way a candidate is evaluated with the
search's cache (keyed by kept channel counts) and given its reward, wherever it runs: in an env runner,
on the driver for the baselines, or in a benchmark.

The default path runs the original modules with only the kept channels' weights (`PruningSpace.sliced`),
so a candidate costs about what the pruned network's forward costs; `masked` (full cost) and `pruned`
(deep copy + Torch-Pruning, ~0.1 s of Python per candidate) compute the same numbers and exist for
checking and comparison.

With `calibration` images (a fixed batch of the training split) each candidate's BN statistics are
re-estimated before it is measured (`adaptive_bn`): the candidate is judged as the network it is, not
as the baseline's statistics applied to a different network.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Iterable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from ..errors import EntropySearchError
from ..jsonio import plain
from .adaptive_bn import recalibrated_batchnorm
from .blocks import block_fields
from .entropy import EntropyProbe
from .rewards import compute_reward
from .space import PruningSpace

log = logging.getLogger(__name__)

EVAL_MODES = ("auto", "sliced", "masked", "pruned")
#: What `auto` picks on each device: the faster path measured there (bench/RESULTS.md: on the CPU slicing
#: is within a few % of the pruned network's forward; on an H200 the ~300 small launches of slicing
#: cost more than masking for ResNet-56).
AUTO_MODE = {"cpu": "sliced", "cuda": "masked"}


class CandidateEvaluator:
    """Measures candidates of `space` on a fixed batch `x` (labels `y` optional, for held-out accuracy)."""

    def __init__(
        self,
        space: PruningSpace,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        entropy_layers: str | Sequence[str] = "bn",
        bins: int = 16,
        method: str = "cooccurrence",
        sample: float | None = None,
        seed: int = 0,
        mode: str = "auto",
        chunk_size: int = 1024,
        calibration: torch.Tensor | None = None,
    ) -> None:
        if mode not in EVAL_MODES:
            raise EntropySearchError(f"unknown evaluation mode {mode!r}; known: {', '.join(EVAL_MODES)}")
        space.check_input(x)
        if y is not None and len(y) != len(x):
            raise EntropySearchError(f"{len(x)} images but {len(y)} labels in the evaluation batch")
        self.model = space.model.eval()
        device = next(self.model.parameters()).device
        if mode == "auto":
            mode = AUTO_MODE.get(device.type, "sliced")
        self.space, self.mode, self.chunk_size = space, mode, int(chunk_size)
        self.x = x.to(device)
        self.y = y.to(device) if y is not None else None
        if calibration is not None:
            space.check_input(calibration)
        self.calibration = calibration.to(device) if calibration is not None and len(calibration) else None
        self.entropy_options = dict(layers=entropy_layers, bins=bins, method=method, sample=sample, seed=seed)
        self.probe = EntropyProbe(self.model, **self.entropy_options)
        self.classifier_name = space.classifier_name
        # the unpruned network's outputs on the same images, once: what the label-free comparisons measure against
        with torch.no_grad():
            logits, features = self._run(self.model, dict(self.model.named_modules()).get(self.classifier_name))
        self.reference_log_probs = torch.log_softmax(logits.float(), dim=1)
        self.reference_features = features

    def evaluate(self, keep: Sequence[float], ranking: str | None = None, dropped: Collection[int | str] = ()) -> dict:
        """Entropy over kept channels, held-out accuracy (None without labels), MACs, params, kept channels;
        the channels kept are those the space ranks first (`ranking`: another ranking of the space); `dropped`:
        the residual blocks the candidate drops."""
        keep = self.space.check_keep(keep)
        counts = self.space.kept_channels(keep)
        blocks = self.space.check_dropped(dropped)
        start = time.perf_counter()
        measured = self._forward(keep, ranking, blocks)
        seconds = time.perf_counter() - start
        macs, params = self.space.macs_of_counts(counts, blocks), self.space.params_of_counts(counts, blocks)
        return {
            "keep": keep,
            "kept_channels": counts,
            **block_fields(self.space, blocks),
            **measured,
            "macs": macs,
            "params": params,
            "macs_ratio": macs / self.space.base_macs,
            "params_ratio": params / self.space.base_params,
            "eval_seconds": seconds,
        }

    def _forward(self, keep: list[float], ranking: str | None = None, dropped: frozenset[int] = frozenset()) -> dict:
        if self.mode == "pruned":
            model = self.space.prune(keep, ranking, dropped).eval()
            probe = EntropyProbe(model, **self.entropy_options)
            context = nullcontext(model)
        else:
            probe = self.probe
            probe.set_kept(self.space.kept_by_module(keep, ranking) if self.mode == "masked" else None)
            apply = self.space.sliced if self.mode == "sliced" else self.space.masked
            context = apply(keep, ranking, dropped)
        probe.reset()
        with torch.no_grad(), context as model, recalibrated_batchnorm(model, self.calibration), probe:
            logits, features = self._run(model, dict(model.named_modules()).get(self.classifier_name))
        if self.mode != "masked" and features is not None and features.shape[1] != self.reference_features.shape[1]:
            kept = self.space.classifier_input_indices(keep, ranking)
            if kept is not None:  # the candidate's features in the unpruned network's coordinates, zeros elsewhere
                full = features.new_zeros(features.shape[0], self.reference_features.shape[1])
                features = full.index_copy_(1, kept.to(features.device), features)
        measured = {
            "entropy": probe.value(),
            "entropy_normalized": probe.normalized_value(),
            "accuracy": int((logits.argmax(1) == self.y).sum()) / len(self.y) if self.y is not None else None,
            **reference_comparison(self.reference_log_probs, self.reference_features, logits, features),
        }
        broken = [name for name, value in (("outputs", float(logits.float().abs().max())),
                                           ("entropy", measured["entropy"])) if not math.isfinite(value)]
        return self._computes_nothing(broken) if broken else measured

    def _computes_nothing(self, broken: list[str]) -> dict:
        """The measurements of a candidate whose outputs or activations are NaN or inf: those of a network that
        computes nothing (accuracy 0, a uniform softmax, zero features, maximal spatial entropy), so every
        reward ranks it last and the search goes on; `nonfinite` says what was not finite."""
        log.warning("a candidate's %s are not finite (NaN or inf): measured as a network that computes nothing",
                    " and ".join(broken))
        classes = self.reference_log_probs.shape[1]
        p0 = self.reference_log_probs.exp()
        bins, method = self.entropy_options["bins"], self.entropy_options["method"]
        most = {"cooccurrence": 2 * math.log(bins), "histogram": math.log(bins)}.get(
            method, math.log(self.x.shape[-1] * self.x.shape[-2]))
        return {
            "entropy": most,
            "entropy_normalized": 1.0,
            "accuracy": 0.0 if self.y is not None else None,
            "kl": float((p0 * (self.reference_log_probs + math.log(classes))).sum(1).mean().clamp_min(0.0)),
            "agreement": 0.0,
            "feature_error": 1.0 if self.reference_features is not None else None,
            "nonfinite": " and ".join(broken),
        }

    def _run(self, model: nn.Module, classifier: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of `model` on the evaluation batch and the input of its classifier (the penultimate
        features, flattened per image; None when the classifier is not found)."""
        captured: list[torch.Tensor] = []
        handle = None
        if classifier is not None:
            handle = classifier.register_forward_pre_hook(lambda _m, args: captured.append(args[0].flatten(1)))
        try:
            logits = torch.cat([model(self.x[i : i + self.chunk_size]) for i in range(0, len(self.x), self.chunk_size)])
        finally:
            if handle is not None:
                handle.remove()
        return logits, (torch.cat(captured).float() if captured else None)


def reference_comparison(reference_log_probs: torch.Tensor, reference_features: torch.Tensor | None,
                         logits: torch.Tensor, features: torch.Tensor | None) -> dict:
    """How far a candidate's outputs are from the unpruned network's on the same images (no labels):

    - ``kl``: mean over images of KL(p_unpruned || p_candidate) = sum_c p0_c (log p0_c - log p_c), nats;
    - ``agreement``: share of images whose top-1 class is the unpruned network's;
    - ``feature_error``: ||F - F0|| / ||F0|| (Frobenius) of the classifier's input features, the candidate's
      pruned features counted as zeros.
    """
    log_probs = torch.log_softmax(logits.float(), dim=1)
    kl = (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(1).mean()
    out = {
        "kl": float(kl.clamp_min(0.0)),
        "agreement": float((log_probs.argmax(1) == reference_log_probs.argmax(1)).float().mean()),
        "feature_error": None,
    }
    if reference_features is not None and features is not None and features.shape == reference_features.shape:
        norm = float(reference_features.norm())
        out["feature_error"] = float((features - reference_features).norm()) / norm if norm > 0 else None
    return out


class SimulatedEvaluator:
    """Benchmarks only (`search.simulate_eval_seconds`): sleeps as long as an evaluation would take and
    returns smooth synthetic measurements, so the RL machinery can be timed without a network's cost."""

    def __init__(self, space: PruningSpace, seconds: float) -> None:
        self.space, self.seconds = space, float(seconds)
        self.calibration = None

    def evaluate(self, keep: Sequence[float], ranking: str | None = None, dropped: Collection[int | str] = ()) -> dict:
        """Synthetic measurements of the counts `keep` gives (which channels, `ranking`, changes nothing; a dropped
        block costs nothing)."""
        keep = self.space.check_keep(keep)
        blocks = self.space.check_dropped(dropped)
        t0 = time.perf_counter()
        time.sleep(self.seconds)
        weights = np.linspace(1.0, 2.0, len(keep))
        counts = self.space.kept_channels(keep)
        macs, params = self.space.macs_of_counts(counts, blocks), self.space.params_of_counts(counts, blocks)
        return {
            "keep": keep,
            "kept_channels": counts,
            **block_fields(self.space, blocks),
            "entropy": float(np.dot(weights, keep) / weights.sum()) + 0.1 * float(np.std(keep)),
            "entropy_normalized": float(np.mean(keep)),
            "accuracy": float(0.5 + 0.5 * np.mean(np.sqrt(keep))),
            "agreement": float(0.5 + 0.5 * np.mean(np.sqrt(keep))),
            "kl": float(np.mean(1.0 - np.sqrt(keep))),
            "feature_error": float(np.mean(1.0 - np.asarray(keep))),
            "macs": macs,
            "params": params,
            "macs_ratio": macs / self.space.base_macs,
            "params_ratio": params / self.space.base_params,
            "eval_seconds": time.perf_counter() - t0,
            "simulated": True,
        }


#: Keys of a candidate record that describe one episode, not the candidate (kept out of the cache).
EPISODE_KEYS = frozenset({"cache_hit", "actions", "desired_keep", "worker", "episode", "iteration", "time", "source",
                          "clipped", "id"})


def cache_entry(record: dict) -> dict:
    """The candidate's own measurements of a record (episode keys dropped)."""
    return {k: v for k, v in record.items() if k not in EPISODE_KEYS}


class CandidateCache:
    """Evaluate candidates given by their kept channel counts, each at most once, with their reward.

    `evaluate(counts)` returns (record, cache_hit): the evaluator's measurements as plain JSON values,
    the reward, `kept_channels` and `keep`; `evaluate(counts, ranking)` the candidate that keeps the channels
    another ranking of the space puts first (a peer recipe's), with `ranking` in its record. `add(records)` takes candidates evaluated elsewhere
    (another worker, a checkpoint). `enabled=False` evaluates every time (for measuring the evaluator).
    """

    def __init__(self, space: PruningSpace, evaluator: CandidateEvaluator | SimulatedEvaluator, reward: str,
                 *, enabled: bool = True) -> None:
        self.space, self.evaluator, self.reward, self.enabled = space, evaluator, reward, enabled
        self.records: dict[tuple, dict] = {}
        self.stats = {"evaluations": 0, "cache_hits": 0, "eval_seconds": 0.0}

    def evaluate(self, counts: Sequence[int], ranking: str | None = None,
                 dropped: Collection[int | str] = ()) -> tuple[dict, bool]:
        blocks = self.space.check_dropped(dropped)
        idle = set(self.space.idle_groups(blocks))  # inside a dropped block: recorded whole, one candidate
        counts = [g.channels if i in idle else int(c) for i, (g, c) in enumerate(zip(self.space.groups, counts))]
        key = candidate_key(counts, ranking, self.space.dropped_names(blocks))
        if self.enabled and key in self.records:
            self.stats["cache_hits"] += 1
            return dict(self.records[key]), True
        keep = self.space.counts_to_keep(counts)
        record = plain(self.evaluator.evaluate(keep, ranking, blocks))
        record["reward"] = float(compute_reward(self.reward, record))
        record["kept_channels"] = counts
        record["keep"] = [float(k) for k in keep]
        if ranking is not None:
            record["ranking"] = ranking
        self.stats["evaluations"] += 1
        self.stats["eval_seconds"] += float(record.get("eval_seconds") or 0.0)
        if self.enabled:
            self.records[key] = record
        return dict(record), False

    def add(self, records: Iterable[dict]) -> int:
        """Add candidates evaluated elsewhere; returns how many were new."""
        added = 0
        for rec in records:
            key = record_key(rec)
            if key not in self.records:
                self.records[key] = cache_entry(rec)
                added += 1
        return added

    def __len__(self) -> int:
        return len(self.records)


def record_key(record: dict) -> tuple:
    """The cache key of a candidate record (`candidate_key` of its counts, ranking and dropped blocks)."""
    return candidate_key(record["kept_channels"], record.get("ranking"), record.get("dropped_blocks") or [])


def candidate_key(counts: Sequence[int], ranking: str | None, dropped: Sequence[str]) -> tuple:
    """What identifies a candidate in the cache: its channel counts, the ranking that picks the channels, the
    blocks it drops."""
    key = tuple(int(c) for c in counts)
    return (ranking, *key, *dropped) if ranking is not None or dropped else key

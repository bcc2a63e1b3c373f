"""Evaluating a candidate (one keep ratio per group) without surgery: everything the reward and the
records need, from one forward pass of a fixed batch.

The default path runs the original modules with only the kept channels' weights (`PruningSpace.sliced`),
so a candidate costs about what the pruned network's forward costs; `masked` (full cost) and `pruned`
(deep copy + Torch-Pruning, ~0.1 s of Python per candidate) compute the same numbers and exist for
checking and comparison.

With `calibration` images (a fixed batch of the training split) each candidate's BN statistics are
re-estimated before it is measured (`adaptive_bn`): the candidate is judged as the network it is, not
as the baseline's statistics applied to a different network.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from .adaptive_bn import recalibrated_batchnorm
from .entropy import EntropyProbe
from .errors import EntropySearchError
from .space import PruningSpace

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

    def evaluate(self, keep: Sequence[float]) -> dict:
        """Entropy over kept channels, held-out accuracy (None without labels), MACs, params, kept channels."""
        keep = self.space.check_keep(keep)
        counts = self.space.kept_channels(keep)
        start = time.perf_counter()
        entropy, accuracy = self._forward(keep)
        seconds = time.perf_counter() - start
        macs, params = self.space.macs_of_counts(counts), self.space.params_of_counts(counts)
        return {
            "keep": keep,
            "kept_channels": counts,
            "entropy": entropy,
            "accuracy": accuracy,
            "macs": macs,
            "params": params,
            "macs_ratio": macs / self.space.base_macs,
            "params_ratio": params / self.space.base_params,
            "eval_seconds": seconds,
        }

    def _forward(self, keep: list[float]) -> tuple[float, float | None]:
        if self.mode == "pruned":
            model = self.space.prune(keep).eval()
            probe = EntropyProbe(model, **self.entropy_options)
            context = nullcontext(model)
        else:
            probe = self.probe
            probe.set_kept(self.space.kept_by_module(keep) if self.mode == "masked" else None)
            context = self.space.sliced(keep) if self.mode == "sliced" else self.space.masked(keep)
        probe.reset()
        correct = 0
        with torch.no_grad(), context as model, recalibrated_batchnorm(model, self.calibration), probe:
            for i in range(0, len(self.x), self.chunk_size):
                logits = model(self.x[i : i + self.chunk_size])
                if self.y is not None:
                    correct += int((logits.argmax(1) == self.y[i : i + self.chunk_size]).sum())
        accuracy = correct / len(self.x) if self.y is not None else None
        return probe.value(), accuracy

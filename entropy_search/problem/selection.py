"""The final stage's choice of the network delivered to the user (docs/design.md, "The final stage").

The search's top-k, the best random-search candidate and the uniform candidate, all under the same budget,
go through successive halving on short fine-tunes judged by held-out accuracy (never the test split):
every finalist is pruned for real, its BN statistics re-estimated, fine-tuned for `rung_steps` SGD steps
and measured; the best 1/eta continue with eta times more steps, until one is left. Held-out accuracy
decides (held-out cross-entropy is recorded next to it); equal accuracies (a small held-out split moves in
steps of one image) are decided by the order of preference, which puts the uniform candidate first: another
finalist has to do better than uniform pruning to be delivered instead of it. (Breaking ties by the lower
cross-entropy instead delivered a worse network than uniform in one quickstart trial: bench/RESULTS.md.) The user then gets
the survivor, fully fine-tuned, so a search never hands back a network that short fine-tunes judged worse
than uniform pruning.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Subset

from ..data import DataSplits
from ..errors import EntropySearchError
from ..train import accuracy_and_loss, train
from .adaptive_bn import recalibrate_batchnorm
from .evaluate import record_key
from .space import PruningSpace


def finalist_records(uniform: dict | None, top_k: Sequence[dict], random: dict | None,
                     peers: Sequence[tuple[str, dict]] = ()) -> dict[str, dict]:
    """The final stage's finalists, {label: candidate record}, in the order of preference that settles ties: the
    uniform candidate (the known-safe choice; None when the final stage is off), the agent's top-k (`top1`, ...),
    random search's best and the other baselines (uniform pruning's shallower variant, Torch-Pruning's recipes:
    (name, record)). A network (its kept channels, which (a recipe's ranking) and its dropped blocks) that two of
    them share enters once, under the first label."""
    finalists: dict[tuple, tuple[str, dict]] = {}
    ranked = [("uniform", uniform), *((f"top{rank + 1}", r) for rank, r in enumerate(top_k)), ("random", random),
              *peers]
    for label, record in ranked:
        if record is not None:
            finalists.setdefault(record_key(record), (label, record))
    return {label: record for label, record in finalists.values()}


def successive_halving(
    space: PruningSpace,
    splits: DataSplits,
    finalists: Sequence[tuple[str, Sequence[float], str | None, Sequence[str]]],
    *,
    calibration: torch.Tensor | None,
    rung_steps: int,
    eta: int = 2,
    batch_size: int = 128,
    lr: float = 0.01,
    seed: int = 0,
    device: str = "auto",
) -> dict:
    """Successive halving over `finalists` ((label, keep ratios, ranking of the space's channels or None, dropped
    blocks), in
    order of preference for ties).

    Returns {"winner": label, "rungs": [{"steps", "heldout_accuracy": {label: acc}, "heldout_loss": {label: loss},
    "continue": [...], "eliminated": [...]}], "seconds"}; each rung's steps are cumulative (a survivor keeps
    training)."""
    if not finalists:
        raise EntropySearchError("successive halving needs at least one finalist")
    if eta < 2 or rung_steps < 1:
        raise EntropySearchError(f"successive halving needs eta >= 2 and rung_steps >= 1, got {eta} and {rung_steps}")
    if len(splits.heldout) == 0:
        raise EntropySearchError(f"the held-out split of {splits.name} is empty: the final stage has nothing to judge by")
    t0 = time.perf_counter()
    if len(finalists) == 1:
        return {"winner": finalists[0][0], "rungs": [], "seconds": 0.0}
    models = {}
    for label, keep, ranking, dropped in finalists:
        pruned = space.prune(keep, ranking, dropped)
        if calibration is not None:
            recalibrate_batchnorm(pruned, calibration)
        models[label] = pruned
    alive = [label for label, *_ in finalists]
    rungs: list[dict] = []
    steps_done, rung = 0, 0
    rng = np.random.default_rng(seed)
    while True:
        steps = rung_steps * eta**rung
        images = _subset(len(splits.train), (steps - steps_done) * batch_size, rng)
        scores, losses = {}, {}
        for label in alive:
            train(models[label], Subset(splits.train, images), epochs=1, lr=lr, batch_size=batch_size, seed=seed + rung,
                  progress=False, device=device)
            scores[label], losses[label] = accuracy_and_loss(models[label], splits.heldout, device=device)
        keep_n = max(1, math.ceil(len(alive) / eta)) if len(alive) > 1 else 1
        ranked = sorted(alive, key=lambda lb: -scores[lb])  # stable: ties keep the order of preference
        survivors, eliminated = ranked[:keep_n], ranked[keep_n:]
        rungs.append({"steps": steps, "heldout_accuracy": scores, "heldout_loss": losses, "continue": survivors,
                      "eliminated": eliminated})
        steps_done, rung = steps, rung + 1
        alive = [lb for lb in alive if lb in survivors]
        if len(alive) == 1:
            return {"winner": alive[0], "rungs": rungs, "seconds": time.perf_counter() - t0}


def _subset(n: int, wanted: int, rng: np.random.Generator) -> list[int]:
    """`wanted` indices of a data set of `n` items, as whole shuffled passes over it plus a partial one."""
    out: list[int] = []
    while len(out) < wanted:
        out.extend(rng.permutation(n)[: wanted - len(out)].tolist())
    return out


def paired_p_value(challenger: torch.Tensor, reference: torch.Tensor) -> float:
    """One-sided exact McNemar test on the same images: the probability, if the two networks were equally
    accurate, that the challenger wins at least as many of the images on which they disagree as it did.
    `challenger` and `reference` are per-image correctness (bool) on the same images, in the same order."""
    if challenger.shape != reference.shape:
        raise EntropySearchError(f"paired comparison needs the same images, got {tuple(challenger.shape)} and {tuple(reference.shape)}")
    wins = int((challenger & ~reference).sum())
    losses = int((reference & ~challenger).sum())
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def guarded_choice(labels: Sequence[str], correct: dict[str, torch.Tensor], *, reference: str | None,
                   significance: float) -> tuple[str, dict[str, float]]:
    """The finalist to deliver, judged by held-out correctness after fine-tuning (docs/design.md, "The final
    stage"): `guarded_winner` over the finalists' held-out accuracies and their paired p-values against
    `reference` (uniform pruning, the known-safe choice).

    Returns (winner, {label: p-value against the reference}) (no p-values without a reference)."""
    accuracy = {lb: int(correct[lb].sum()) / max(1, correct[lb].numel()) for lb in labels}
    p_values = ({lb: paired_p_value(correct[lb], correct[reference]) for lb in labels if lb != reference}
                if reference in accuracy else {})
    return guarded_winner(accuracy, p_values, reference=reference, significance=significance), p_values


def guarded_winner(accuracy: dict[str, float], p_values: dict[str, float], *, reference: str | None,
                   significance: float) -> str:
    """The guarded rule on recorded figures (a result.json's final-stage rung holds both): `reference` unless
    another finalist is more accurate and beats it with p-value < `significance`; among those that do, the most
    accurate, equal accuracies going to the earlier label (the order of `accuracy`). Without a reference: the
    most accurate."""
    if not accuracy:
        raise EntropySearchError("the final stage needs at least one finalist")
    labels = list(accuracy)
    if reference is None or reference not in accuracy:
        return max(labels, key=lambda lb: accuracy[lb])
    better = [lb for lb in labels if lb != reference and accuracy[lb] > accuracy[reference]
              and p_values[lb] < significance]
    return max(better, key=lambda lb: accuracy[lb]) if better else reference

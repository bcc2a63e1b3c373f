"""The final stage's choice of the network delivered to the user (docs/design.md, "The final stage").

The finalists (the uniform candidate, the agent's top-k, random search's and Torch-Pruning's best, all under the
same budget) are judged by held-out accuracy (never the test split), uniform pruning first in the order of
preference: another finalist has to beat uniform pruning, significantly on the same images (`guarded_choice`,
exact McNemar), to be delivered instead of it. `selection.method: full` judges each after its full fine-tune;
`halving` runs successive halving on short fine-tunes: every finalist is pruned for real, its BN statistics
re-estimated, fine-tuned for `rung_steps` SGD steps and measured; the best 1/eta continue with eta times more
steps, uniform pruning always among them, and at the last rung the same guarded rule decides. Only the network
delivered is then fine-tuned in full. (Breaking ties by the lower cross-entropy instead delivered a worse
network than uniform in one quickstart trial: bench/RESULTS.md.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Subset

from ..data import DataSplits
from ..errors import EntropySearchError
from ..train import correct_and_loss, train
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


#: A finalist of the final stage: (label, keep ratios, ranking of the space's channels or None, dropped blocks).
Finalist = tuple[str, Sequence[float], str | None, Sequence[str]]


def halving_rung_count(n: int, eta: int) -> int:
    """Rungs successive halving takes to bring `n` finalists down to one (each keeps ceil(alive / eta))."""
    rungs = 0
    while n > 1:
        n, rungs = math.ceil(n / eta), rungs + 1
    return rungs


def short_finetune_rungs(
    space: PruningSpace,
    splits: DataSplits,
    finalist: Finalist,
    *,
    calibration: torch.Tensor | None,
    rung_steps: int,
    eta: int,
    rungs: int,
    batch_size: int = 128,
    lr: float = 0.01,
    seed: int = 0,
    device: str = "auto",
) -> Iterator[tuple[int, float, float, torch.Tensor]]:
    """One finalist through the rungs of successive halving: pruned for real, BN re-estimated on `calibration`,
    then at rung r trained on to `rung_steps * eta**r` SGD steps in all and measured on the held-out split.
    Yields (steps, held-out accuracy, held-out loss, held-out correctness per image) per rung; whoever drives it
    (the driver's loop, a Tune trial under ASHA) stops when the finalist is eliminated. Every finalist sees the
    same images at the same rung."""
    _, keep, ranking, dropped = finalist
    model = space.prune(keep, ranking, dropped)
    if calibration is not None:
        recalibrate_batchnorm(model, calibration)
    done = 0
    for rung in range(rungs):
        steps = rung_steps * eta**rung
        images = _subset(len(splits.train), (steps - done) * batch_size, np.random.default_rng([seed, rung]))
        train(model, Subset(splits.train, images), epochs=1, lr=lr, batch_size=batch_size, seed=seed + rung,
              progress=False, device=device)
        correct, loss = correct_and_loss(model, splits.heldout, device=device)
        done = steps
        yield steps, int(correct.sum()) / len(correct), loss, correct


def halving_result(histories: dict[str, Sequence[tuple[int, float, float]]], last_correct: dict[str, torch.Tensor],
                   *, reference: str | None, significance: float) -> dict:
    """The rungs and the winner of successive halving from what each finalist measured ({label: [(steps,
    held-out accuracy, held-out loss), ...]}, labels in the order of preference) and the held-out correctness of
    those that reached the last rung (`last_correct`): at each rung, who was measured, who went on to the next one
    and who stopped there; at the last rung `guarded_choice` against `reference` (uniform pruning, kept to the
    last rung) at `significance` picks the winner. The same for the driver's loop and for Tune's ASHA, whose
    promotions are its own."""
    milestones = sorted({steps for history in histories.values() for steps, *_ in history})
    if not milestones:
        return {"winner": next(iter(histories)), "rungs": []}
    at = {label: {steps: (acc, loss) for steps, acc, loss in history} for label, history in histories.items()}
    last = [label for label in histories if milestones[-1] in at[label]]
    winner, p_values = guarded_choice(last, last_correct, reference=reference if reference in last else None,
                                      significance=significance)
    rungs = []
    for i, steps in enumerate(milestones):
        measured = [label for label in histories if steps in at[label]]
        going_on = ([winner] if i == len(milestones) - 1 else
                    [label for label in measured if milestones[i + 1] in at[label]])
        rungs.append({"steps": steps, "heldout_accuracy": {lb: at[lb][steps][0] for lb in measured},
                      "heldout_loss": {lb: at[lb][steps][1] for lb in measured}, "continue": going_on,
                      "eliminated": [lb for lb in measured if lb not in going_on]})
    rungs[-1].update({"p_value_vs_uniform": p_values, "significance": significance})
    return {"winner": winner, "rungs": rungs}


def halving_survivors(rung: dict, count: int, *, reference: str | None) -> list[str]:
    """The finalists that successive halving hands to the full fine-tune (`selection.survivors`): the `count` most
    accurate at its last rung (`rung`, as `halving_result` records it; equal accuracies go to the earlier label)
    and `reference`, in the rung's order. Short fine-tunes rank by how fast a network recovers, which is not always
    how well it ends (docs/design.md, "The final stage"), so the guarded rule decides on full fine-tunes."""
    accuracy = rung["heldout_accuracy"]
    best = sorted((lb for lb in accuracy if lb != reference), key=lambda lb: -accuracy[lb])[:count]
    return [lb for lb in accuracy if lb in best or lb == reference]


def successive_halving(
    space: PruningSpace,
    splits: DataSplits,
    finalists: Sequence[Finalist],
    *,
    calibration: torch.Tensor | None,
    rung_steps: int,
    eta: int = 2,
    reference: str | None = None,
    significance: float = 1.0,
    batch_size: int = 128,
    lr: float = 0.01,
    seed: int = 0,
    device: str = "auto",
) -> dict:
    """Successive halving over `finalists` (in order of preference for ties), one finalist after another in this
    process: at each rung every finalist still in (`short_finetune_rungs`), then the best ceil(alive / eta) go on,
    and `reference` with them; at the last rung the guarded rule (`halving_result`).

    Returns {"winner": label, "rungs": [{"steps", "heldout_accuracy": {label: acc}, "heldout_loss": {label: loss},
    "continue": [...], "eliminated": [...]}], "seconds"}; each rung's steps are cumulative (a survivor keeps
    training)."""
    check_halving(splits, finalists, rung_steps=rung_steps, eta=eta)
    t0 = time.perf_counter()
    rungs = halving_rung_count(len(finalists), eta)
    runs = {f[0]: short_finetune_rungs(space, splits, f, calibration=calibration, rung_steps=rung_steps, eta=eta,
                                       rungs=rungs, batch_size=batch_size, lr=lr, seed=seed, device=device)
            for f in finalists}
    histories: dict[str, list[tuple[int, float, float]]] = {label: [] for label in runs}
    correct: dict[str, torch.Tensor] = {}
    alive = list(runs)
    for rung in range(rungs):
        for label in alive:
            steps, accuracy, loss, correct[label] = next(runs[label])
            histories[label].append((steps, accuracy, loss))
        if rung < rungs - 1:
            ranked = sorted(alive, key=lambda lb: -histories[lb][-1][1])  # stable: ties keep the order of preference
            going_on = set(ranked[:math.ceil(len(alive) / eta)]) | ({reference} & set(alive))
            alive = [lb for lb in alive if lb in going_on]
    last = {label: correct[label] for label in alive if label in correct}  # none with one finalist
    return {**halving_result(histories, last, reference=reference, significance=significance),
            "seconds": time.perf_counter() - t0}


def check_halving(splits: DataSplits, finalists: Sequence[Finalist], *, rung_steps: int, eta: int) -> None:
    """EntropySearchError unless successive halving can run: a finalist, eta >= 2, a rung of steps, held-out
    images to judge by."""
    if not finalists:
        raise EntropySearchError("successive halving needs at least one finalist")
    if eta < 2 or rung_steps < 1:
        raise EntropySearchError(f"successive halving needs eta >= 2 and rung_steps >= 1, got {eta} and {rung_steps}")
    if len(splits.heldout) == 0:
        raise EntropySearchError(f"the held-out split of {splits.name} is empty: the final stage has nothing to judge by")


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

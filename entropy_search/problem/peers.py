"""Torch-Pruning's own recipes as baselines: what a user who runs no search would do (docs/design.md,
"Baselines").

A recipe is Torch-Pruning's `MetaPruner` with global pruning (isomorphic pruning too, where the installed version
offers it) and one of its importances, run on a copy of the network (`peer_network`). `peer_baseline` finds the
pruning ratio by bisection so that the network's cost (MACs, or the latency table's prediction: the search's
budget) is within `tolerance` below the target. Torch-Pruning decides how many channels each group keeps
(`PruningSpace.counts_of`) and which: the space ranks each group's channels by the recipe's importance
(`PruningSpace.add_ranking`), so the recipe's network is a candidate like any other, evaluated, fine-tuned, judged
by the final stage and exported the same way, and `peer_baseline` checks that this candidate computes what
Torch-Pruning's own network computes before it is recorded.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from ..errors import EntropySearchError
from .budget import Budget
from .space import PruningSpace

Evaluate = Callable[[Sequence[int], str], dict]


@dataclass(frozen=True)
class PeerRecipe:
    """One of Torch-Pruning's recipes, as its documentation shows it."""

    description: str
    importance: Callable[[], tp.importance.Importance]
    isomorphic: bool = False
    gradients: bool = False
    """Whether the importance reads gradients: one backward pass on the recipe's batch of training images first."""


#: The recipes `baselines.peers` may name.
PEER_RECIPES: dict[str, PeerRecipe] = {
    "tp_magnitude": PeerRecipe("Torch-Pruning global pruning, L1 magnitude (GroupMagnitudeImportance(p=1))",
                               lambda: tp.importance.GroupMagnitudeImportance(p=1)),
    "tp_taylor": PeerRecipe("Torch-Pruning global pruning, first-order Taylor (GroupTaylorImportance)",
                            tp.importance.GroupTaylorImportance, gradients=True),
    "tp_isomorphic": PeerRecipe("Torch-Pruning isomorphic pruning, L1 magnitude (ECCV 2024)",
                                lambda: tp.importance.GroupMagnitudeImportance(p=1), isomorphic=True),
}


def offered(name: str) -> bool:
    """Whether the installed Torch-Pruning offers recipe `name` (isomorphic pruning came with version 1.4)."""
    return not PEER_RECIPES[name].isomorphic or "isomorphic" in inspect.signature(tp.pruner.MetaPruner).parameters


def _backward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """The gradients of the cross-entropy on `batch` in the parameters (eval mode: BN statistics untouched)."""
    if batch is None:
        raise EntropySearchError("a Taylor recipe needs a batch of labelled training images")
    device = next(model.parameters()).device
    x, y = batch
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()


def peer_network(space: PruningSpace, name: str, ratio: float,
                 batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """Torch-Pruning's own network for recipe `name` at pruning ratio `ratio`: `MetaPruner` with global pruning
    on a copy of the space's network, the space's ignored layers and channel rounding; the original is
    untouched."""
    recipe = PEER_RECIPES[name]
    model = copy.deepcopy(space.model).eval()
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    if recipe.gradients:
        _backward(model, batch)
    options = {"isomorphic": True} if recipe.isomorphic else {}
    with torch.enable_grad():  # Torch-Pruning traces the network with autograd
        pruner = tp.pruner.MetaPruner(model, space.example_input.to(device), importance=recipe.importance(),
                                      global_pruning=True, pruning_ratio=float(ratio),
                                      ignored_layers=[modules[n] for n in space.ignored_layers],
                                      round_to=space.round_to if space.round_to > 1 else None, **options)
        pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def rank_like(space: PruningSpace, name: str, batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Give the space recipe `name`'s ranking of each group's channels (under that name)."""
    recipe = PEER_RECIPES[name]
    if recipe.gradients:
        _backward(space.model, batch)
    try:
        space.add_ranking(name, recipe.importance())
    finally:
        space.model.zero_grad(set_to_none=True)


def peer_baseline(space: PruningSpace, budget: Budget, name: str, evaluate: Evaluate,
                  batch: tuple[torch.Tensor, torch.Tensor] | None = None, *, tolerance: float = 0.03,
                  steps: int = 24) -> dict:
    """Recipe `name` brought to the budget: the pruning ratio bisected until the network's cost is within
    `tolerance` below the target (at most `steps` networks pruned), the space's candidate checked to compute what
    Torch-Pruning's network computes, and evaluated. Returns {best: its record (with `recipe`, `pruning_ratio`,
    `cost_ratio`), evaluations, pruning_ratio, steps, seconds}; EntropySearchError when no ratio meets the budget."""
    t0 = time.perf_counter()
    rank_like(space, name, batch)
    lo, hi = 0.0, 1.0  # lo: over the target (or nothing pruned); hi: within it, or a group emptied
    found: tuple[float, list[int], float, nn.Module] | None = None
    done = 0
    while done < steps:
        ratio = (lo + hi) / 2
        done += 1
        network, counts = _counts_at(space, name, ratio, batch)
        cost = budget.cost(counts) if counts is not None else None
        if cost is None or cost > budget.target * (1 + 1e-9):
            if cost is None:
                hi = ratio
            else:
                lo = ratio
            continue
        hi = ratio
        if found is None or cost > found[2]:
            found = (ratio, counts, cost, network)
        if cost >= budget.target * (1 - tolerance / 3):
            break
    if found is None:
        raise EntropySearchError(f"{name}: no pruning ratio of {PEER_RECIPES[name].description} meets the budget "
                                 f"without emptying a channel group")
    ratio, counts, cost, network = found
    check_same_network(space, name, network, counts, batch)
    record = dict(evaluate(counts, name))
    record.update(recipe=name, pruning_ratio=ratio, cost_ratio=cost / budget.base_cost,
                  within_tolerance=cost >= budget.target * (1 - tolerance))
    return {"best": record, "evaluations": 1, "pruning_ratio": ratio, "steps": done,
            "seconds": time.perf_counter() - t0}


def _counts_at(space: PruningSpace, name: str, ratio: float, batch) -> tuple[nn.Module | None, list[int] | None]:
    """Recipe `name`'s network at `ratio` and the channels each group keeps in it; (None, None) when it empties a
    group."""
    try:
        network = peer_network(space, name, ratio, batch)
        counts = space.counts_of(network)
    except (RuntimeError, ValueError, IndexError):  # Torch-Pruning removing every channel of a layer
        return None, None
    return (network, counts) if min(counts) > 0 else (None, None)


def check_same_network(space: PruningSpace, name: str, theirs: nn.Module, counts: Sequence[int], batch) -> None:
    """EntropySearchError unless the space's candidate (`counts`, ranked by recipe `name`) computes what
    Torch-Pruning's own network `theirs` computes, on the example input and the recipe's batch."""
    ours = space.prune(space.counts_to_keep(counts), ranking=name).eval()
    device = next(theirs.parameters()).device
    x = space.example_input if batch is None else torch.cat([space.example_input, batch[0][:8]])
    with torch.no_grad():
        a, b = theirs(x.to(device)), ours.to(device)(x.to(device))
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        raise EntropySearchError(f"{name}: the space's candidate does not compute what Torch-Pruning's network "
                                 f"computes (largest difference {float((a - b).abs().max()):.3g}); not used as a baseline")

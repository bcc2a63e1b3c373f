"""The exactness guard: before a search ranks candidates evaluated without surgery (sliced or masked), one random
candidate under its budget is also pruned for real and both computations are compared on the evaluation images.
A mismatch stops the search with the channel groups (and residual blocks) that cause it named, so a silent wrong
answer cannot reach a user even on an architecture no test has seen (docs/design.md, "The exactness guard")."""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence

import numpy as np
import torch

from ..errors import EntropySearchError
from .baselines import random_candidate
from .budget import Budget
from .space import EXACT_TOLERANCE, PruningSpace, output_difference


def relative_difference(space: PruningSpace, x: torch.Tensor, keep: Sequence[float], dropped: Collection[int] = (),
                        *, mode: str) -> float:
    """How far the candidate computed the evaluator's way (`mode`: sliced or masked) is from the physically pruned
    network, on the images `x` (the space's model in eval mode: the baseline's BN statistics); outputs that are not
    finite must be so in the same places on both, and only the finite ones are compared."""
    apply = space.sliced if mode == "sliced" else space.masked
    with torch.no_grad():
        pruned = space.prune(keep, dropped=dropped).eval().to(x.device)
        expected = pruned(x)
        with apply(keep, None, dropped) as model:
            got = model(x)
    return output_difference(got, expected)


def check_exact(space: PruningSpace, budget: Budget, x: torch.Tensor, *, mode: str, seed: int,
                tolerance: float = EXACT_TOLERANCE) -> dict:
    """Compare one seeded random candidate under `budget` computed the evaluator's way with its pruned network on
    `x`; {keep, dropped_blocks, relative_difference, seconds} when they agree within `tolerance`, else an
    EntropySearchError naming each group (and block) that differs when pruned alone."""
    t0 = time.perf_counter()
    dropped, counts = random_candidate(budget, np.random.default_rng(seed))
    keep = space.counts_to_keep(counts)
    difference = relative_difference(space, x, keep, dropped, mode=mode)
    out = {"mode": mode, "keep": keep, "dropped_blocks": space.dropped_names(dropped),
           "relative_difference": difference, "tolerance": tolerance}
    if difference <= tolerance:
        return {**out, "seconds": time.perf_counter() - t0}
    full = [1.0] * len(space.groups)
    culprits = [f"group {g.index} ({g.name}, keeping {counts[g.index]} of {g.channels})"
                for g in space.groups if keep[g.index] < 1.0
                and relative_difference(space, x, [*full[:g.index], keep[g.index], *full[g.index + 1:]], (),
                                        mode=mode) > tolerance]
    culprits += [f"residual block {name} (dropped)" for index, name in zip(sorted(dropped), space.dropped_names(dropped))
                 if relative_difference(space, x, full, {index}, mode=mode) > tolerance]
    where = "; ".join(culprits) if culprits else "only the whole candidate (no group alone)"
    raise EntropySearchError(
        f"the {mode} evaluation of this network does not compute what its pruned network computes (relative "
        f"difference {difference:.2g} on a random candidate, more than {tolerance:g}): {where}. The search would rank "
        "one function and deliver another; run it with search.eval_mode: pruned (exact, slower), and please report "
        "the architecture")

"""The budget of a search and AMC's action clipping on rounded channel counts (docs/design.md, "Budget").

A candidate's MACs are an exact quadratic form of its kept channel counts (`MacsForm`): a conv's cost is
kept inputs x kept outputs. `Budget.clip` picks each group's count, in forward order, so that the
target stays reachable with every later group at its minimum (AMC's clipping): the budget is met by
construction, never by penalty. With `flops_floor` > 0 the clipping is two-sided, so that candidates
also spend the budget and rewards compare networks of about the same cost. The cost is the MAC count by
default, or any model with the same interface (a call on counts, `along`, `base`, `kind`, `unit`): a latency
budget's `LatencyTable` (docs/design.md, "Latency budget").
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Collection, Sequence

import numpy as np

from ..errors import ConfigError
from .space import PruningSpace


class MacsForm:
    """MACs as an exact quadratic form of the kept channel counts: ``k0 + a.c + c^T B c`` (B upper triangular).

    A conv/linear layer's MACs are its output positions times its kept weights, the product of (at most)
    an output and an input count, so the space's MAC count is a polynomial of degree two in the counts.
    Its coefficients are identified once from `space.macs_of_counts` (1 + 2n + n(n-1)/2 calls) and
    checked on random counts; where the check fails (an exotic layer), every call goes to
    `space.macs_of_counts`. This makes the budget clipping O(n) numpy work per step instead of
    a Python loop over every layer for every tried count.
    """

    kind = "macs"
    unit = "MACs"

    def __init__(self, space: PruningSpace, *, dropped: frozenset[int] = frozenset(), check_points: int = 8,
                 seed: int = 0, coefficients: tuple[int, np.ndarray, np.ndarray] | None = None) -> None:
        """`dropped`: the residual blocks the candidates drop (their layers cost nothing); `base` stays the
        unpruned network's MACs. `coefficients` (k0, a, B), when known (`without`), are checked instead of
        identified."""
        self.space, self.dropped = space, frozenset(dropped)
        self._block_parts: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        self.k0, self.a, self.B = coefficients if coefficients is not None else self._identify()
        self.exact = True
        rng = np.random.default_rng(seed)
        full = [grp.channels for grp in space.groups]
        points = [full] + [[int(rng.integers(1, c + 1)) for c in full] for _ in range(check_points)]
        self.exact = all(self(p) == space.macs_of_counts(p, self.dropped) for p in points)
        self.base = int(space.base_macs)

    def _identify(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(k0, a, B) from 1 + 2n + n(n-1)/2 calls of `space.macs_of_counts`."""
        n = len(self.space.groups)

        def f(counts: Sequence[int]) -> int:
            return self.space.macs_of_counts(counts, self.dropped)

        zero = [0] * n
        k0 = f(zero)
        a = np.zeros(n, dtype=np.int64)
        B = np.zeros((n, n), dtype=np.int64)
        single = []
        for g in range(n):
            e1, e2 = list(zero), list(zero)
            e1[g], e2[g] = 1, 2
            f1, f2 = f(e1), f(e2)
            q = (f2 - 2 * f1 + k0) // 2
            B[g, g] = q
            a[g] = f1 - k0 - q
            single.append(f1)
        for g in range(n):
            for h in range(g + 1, n):
                e = list(zero)
                e[g] = e[h] = 1
                B[g, h] = f(e) - single[g] - single[h] + k0
        return int(k0), a, B

    def without(self, dropped: frozenset[int]) -> MacsForm:
        """The form of candidates that drop the residual blocks `dropped` (this form keeping every block): a MAC
        count is additive over layers, so it is this form minus the part of each outermost dropped block, each
        part identified once (this form minus the form with that block alone dropped). Checked like any form;
        identified from the space when this one is not exact."""
        if self.dropped or not self.exact:
            return MacsForm(self.space, dropped=dropped)
        k0, a, B = self.k0, self.a.copy(), self.B.copy()
        for b in self.space.outermost_blocks(dropped):
            if b not in self._block_parts:
                alone = MacsForm(self.space, dropped=frozenset({b}))
                self._block_parts[b] = (self.k0 - alone.k0, self.a - alone.a, self.B - alone.B)
            part = self._block_parts[b]
            k0, a, B = k0 - part[0], a - part[1], B - part[2]
        return MacsForm(self.space, dropped=dropped, coefficients=(k0, a, B))

    def __call__(self, counts: Sequence[int]) -> int:
        if not self.exact:
            return int(self.space.macs_of_counts(list(counts), self.dropped))
        c = np.asarray(counts, dtype=np.int64)
        return int(self.k0 + self.a @ c + c @ (self.B @ c))

    def along(self, g: int, counts: Sequence[int], values: np.ndarray) -> np.ndarray:
        """MACs for every value of group g's count in `values`, the other counts fixed."""
        if not self.exact:
            trial = list(counts)
            out = []
            for v in values:
                trial[g] = int(v)
                out.append(self.space.macs_of_counts(trial, self.dropped))
            return np.asarray(out, dtype=np.int64)
        c = np.asarray(counts, dtype=np.int64).copy()
        c[g] = 0
        rest = self.k0 + self.a @ c + c @ (self.B @ c)
        linear = self.a[g] + self.B[g, :] @ c + self.B[:, g] @ c
        v = np.asarray(values, dtype=np.int64)
        return rest + linear * v + self.B[g, g] * v * v


#: How many budgets of shallower candidates `Budget.given` keeps (the most recently asked).
GIVEN_KEPT = 256

#: How an action in [-1, 1] becomes a desired keep ratio (docs/design.md, "Budget").
ACTION_SPACES = ("relative", "absolute")


def count_options(space: PruningSpace, min_keep: float) -> list[np.ndarray]:
    """The possible channel counts of each group, ascending: the space's one rounding rule over [min_keep, 1]."""
    out = []
    for group in space.groups:
        c = group.channels
        ratios = sorted({min(1.0, max(min_keep, i / c)) for i in range(1, c + 1)} | {min_keep})
        out.append(np.asarray(sorted({int(space.round_count(float(k), c)) for k in ratios}), dtype=np.int64))
    return out


class Budget:
    """AMC action clipping on rounded channel counts for one pruning space and target (a ratio of the unpruned
    network's MACs, or of another cost such as a `LatencyTable`'s predicted latency, given as `cost`).

    `action_space` "absolute" maps an action linearly to a keep ratio in [min_keep, 1] (AMC's); "relative"
    scales the uniform keep ratio that the remaining budget allows the groups still to decide by
    2**(action * action_spread), so that action 0 everywhere gives the uniform solution and random actions
    stay around it instead of spending the budget early and starving the last groups."""

    def __init__(self, space: PruningSpace, flops_target: float, min_keep: float, flops_floor: float = 0.0,
                 *, action_space: str = "absolute", action_spread: float = 1.0, cost=None,
                 target_key: str = "search.flops_target", min_keep_key: str = "search.min_keep",
                 dropped: frozenset[int] = frozenset(),
                 macs: MacsForm | None = None, options: list[np.ndarray] | None = None) -> None:
        """`dropped`, `macs` and `options` are `given`'s: a budget of the same space and target for candidates
        without some residual blocks, with their MAC form and the (shared) count options."""
        if action_space not in ACTION_SPACES:
            raise ConfigError(f"search.action_space: {action_space!r}; known: {', '.join(ACTION_SPACES)}")
        self.action_space = action_space
        self.action_spread = float(action_spread)
        self.space = space
        self.flops_target = float(flops_target)
        self.flops_floor = float(flops_floor)
        self.min_keep = float(min_keep)
        self.groups = list(space.groups)
        self.n = len(self.groups)
        self.base_macs = int(space.base_macs)
        self.full_counts = [g.channels for g in self.groups]
        self._channels = np.asarray(self.full_counts, dtype=np.int64)
        self.dropped = frozenset(dropped)
        """The residual blocks dropped in the candidates this budget clips (`given` makes one per set)."""
        self.idle = frozenset(space.idle_groups(self.dropped))
        """Groups inside a dropped block: kept whole (their count changes nothing), never clipped."""
        self.macs = macs if macs is not None else MacsForm(space, dropped=self.dropped)
        self.cost = self.macs if cost is None else cost
        """What the target limits: the MAC count (default) or a latency table's predicted milliseconds."""
        self._given: OrderedDict[frozenset[int], Budget] = OrderedDict()  # `given`'s, the most recent last
        self._root = self  # the budget that keeps every block, which `given` asks
        self.kind = self.cost.kind
        self.target_key = target_key
        self.min_keep_key = min_keep_key  # how the user set min_keep, for messages (a config key or a CLI flag)
        self.base_cost = float(self.cost.base)
        self.target = self.flops_target * self.base_cost
        self.floor = self.flops_floor * self.target
        self.target_macs = self.target if self.kind == "macs" else None
        self.floor_macs = self.floor if self.kind == "macs" else None
        self.options = options if options is not None else count_options(space, self.min_keep)
        self.min_counts = [c if g in self.idle else int(opts[0]) for g, (c, opts) in
                           enumerate(zip(self.full_counts, self.options))]
        self.min_macs = space.macs_of_counts(self.min_counts, self.dropped)
        self.min_cost = self.cost(self.min_counts)

    def given(self, dropped: Collection[int]) -> Budget:
        """The same budget (target, floor, actions) for candidates that drop the residual blocks `dropped`: their
        cost leaves those blocks out (the MAC form of the budget that keeps every block, minus the blocks' parts).
        The last `GIVEN_KEPT` are kept: an episode asks for one per candidate, and a network of many blocks has
        more sets than a search visits."""
        dropped = self.space.check_dropped(dropped)
        if dropped == self.dropped:
            return self
        if self._root is not self:
            return self._root.given(dropped)
        if dropped in self._given:
            self._given.move_to_end(dropped)
            return self._given[dropped]
        macs = self.macs.without(dropped)
        cost = None
        if self.kind != "macs":  # a latency table's prediction without those blocks
            outer = self.space.dropped_names(self.space.outermost_blocks(dropped))
            cost = self.cost.without(outer, frozenset(self.space.idle_groups(dropped)), macs)
        shallower = Budget(self.space, self.flops_target, self.min_keep, self.flops_floor,
                           action_space=self.action_space, action_spread=self.action_spread, cost=cost,
                           target_key=self.target_key, min_keep_key=self.min_keep_key, dropped=dropped, macs=macs,
                           options=self.options)
        shallower._root = self
        self._given[dropped] = shallower
        if len(self._given) > GIVEN_KEPT:
            self._given.popitem(last=False)
        return self._given[dropped]

    def block_step(self, dropped: Collection[int], block: int, action: float) -> tuple[bool, bool]:
        """Whether residual block `block` is dropped, the blocks `dropped` being dropped already, from an action in
        [-1, 1]: dropped when the action is below 0 (NaN too), unless the floor (`flops_floor`) could then no longer
        be reached with every group at full width. Returns (drop, whether the budget overrode the action)."""
        if float(action) >= 0.0:
            return False, False
        if self.floor <= 0:
            return True, False
        shallower = self.space.check_dropped(set(dropped) | {block})
        if self.kind == "macs":  # the space's own count: no budget built for every partial set of an episode
            most = self.space.macs_of_counts(self.full_counts, shallower)
        else:
            most = self.given(shallower).cost(self.full_counts)
        reachable = most >= self.floor
        return reachable, not reachable

    def count_of(self, g: int, keep: float) -> int:
        """Channels group `g` keeps at ratio `keep`, by the space's one rounding rule."""
        return int(self.space.round_count(float(keep), self.groups[g].channels))

    def within(self, counts: Sequence[int]) -> bool:
        """Whether a candidate's cost is within the target (a float cost with a rounding margin)."""
        cost = self.cost(counts)
        return cost <= self.target if self.kind == "macs" else cost <= self.target * (1 + 1e-9)

    def feasible(self) -> bool:
        return self.min_cost <= self.target * (1 + 1e-9)

    def check(self) -> None:
        """ConfigError when the target cannot be met even with every group at min_keep."""
        if self.feasible():
            return
        floor = self.min_cost / self.base_cost
        if self.kind == "macs":
            raise ConfigError(
                f"{self.target_key}: {self.flops_target:g} cannot be met: with every channel group at "
                f"min_keep={self.min_keep:g} the network still has {floor:.3f} of its MACs (layers that are never "
                f"pruned, rounding to {self.space.round_to}); raise {self.target_key} above {floor:.3f} "
                f"or lower {self.min_keep_key}"
            )
        shown = (f"{self.target:.4g} {self.cost.unit}" if self.target_key.endswith("_ms") else f"{self.flops_target:g}")
        raise ConfigError(
            f"{self.target_key}: {shown} cannot be met: with every channel group at min_keep={self.min_keep:g} the "
            f"predicted latency is still {self.min_cost:.4g} {self.cost.unit}, {floor:.3f} of the unpruned network's "
            f"{self.base_cost:.4g} {self.cost.unit} ({self.cost.describe()}); raise {self.target_key} above "
            f"{self.min_cost if self.target_key.endswith('_ms') else floor:.4g} or lower {self.min_keep_key}"
        )

    def keep_of_action(self, action: float) -> float:
        """Map an action in [-1, 1] (clipped there) to a keep ratio in [min_keep, 1]."""
        a = -1.0 if math.isnan(action) else float(np.clip(action, -1.0, 1.0))  # +-inf clip to +-1
        return self.min_keep + (a + 1.0) / 2.0 * (1.0 - self.min_keep)

    def counts_at(self, keep: float, start: int = 0) -> list[int]:
        """Every group from `start` on at the same keep ratio, by the space's rounding rule."""
        return self.space.round_counts(float(keep), self._channels[start:]).tolist()

    def uniform_rest(self, decided: Sequence[int], iterations: int = 30) -> float:
        """The largest keep ratio r in [min_keep, 1] such that the groups after `decided`, all at ratio r (rounded),
        keep the candidate within the target (bisection, `iterations` halvings); min_keep when even that does not
        fit. With nothing decided it is the uniform candidate's ratio (`baselines.uniform_counts`)."""
        g = len(decided)

        def fits(r: float) -> bool:
            return self.within(list(decided) + self.counts_at(r, g))

        if fits(1.0):
            return 1.0
        lo, hi = self.min_keep, 1.0
        if not fits(lo):
            return lo
        for _ in range(iterations):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def desired_keep(self, g: int, decided: Sequence[int], action: float) -> float:
        """Group g's keep ratio asked for by `action` in [-1, 1] (clipped there), before the budget's clipping."""
        a = -1.0 if math.isnan(action) else float(np.clip(action, -1.0, 1.0))  # +-inf clip to +-1
        if self.action_space == "absolute":
            return self.keep_of_action(a)
        return float(min(1.0, max(self.min_keep, self.uniform_rest(decided) * 2.0 ** (a * self.action_spread))))

    def step(self, decided: Sequence[int], action: float) -> tuple[int, float, bool]:
        """Decide the next group's count from an action: (count, desired keep ratio, whether the budget clipped it)."""
        g = len(decided)
        if g in self.idle:  # inside a dropped block: the count changes nothing
            return self.full_counts[g], 1.0, False
        keep = self.desired_keep(g, decided, action)
        desired = self.count_of(g, keep)
        count = self.clip(g, decided, desired)
        return count, keep, count != desired

    def clip(self, g: int, decided: Sequence[int], desired: int) -> int:
        """Group g's count: the option nearest below `desired` within the bounds that keep the episode on budget.

        Upper bound (hard, AMC's): with every later group at its minimum the MACs stay within the target.
        Lower bound (soft, `flops_floor`): with every later group at full width the MACs can still
        reach the floor. Where rounding makes the two cross, the upper bound wins.
        """
        opts = self.options[g]
        d = max(int(np.searchsorted(opts, desired, side="right")) - 1, 0)  # largest option <= desired
        low_rest = list(decided) + [0] + self.min_counts[g + 1:]
        ok = self.cost.along(g, low_rest, opts) <= (self.target if self.kind == "macs" else self.target * (1 + 1e-9))
        # the cost grows with the count (MACs exactly; a latency table is made non-decreasing), so the feasible
        # options are a prefix: the first infeasible one ends it; option 0 is feasible by induction
        hi = int(np.argmin(ok)) - 1 if not ok.all() else len(opts) - 1
        i = min(d, max(hi, 0))
        if self.floor > 0:
            high_rest = list(decided) + [0] + self.full_counts[g + 1:]
            reach = np.nonzero(self.cost.along(g, high_rest, opts) >= self.floor)[0]
            lo = int(reach[0]) if len(reach) else len(opts) - 1
            i = min(max(i, lo), max(hi, 0))
        return int(opts[i])

    def macs_ratio(self, counts: Sequence[int]) -> float:
        return self.macs(counts) / self.base_macs

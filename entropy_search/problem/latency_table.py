"""A latency budget's cost model: the predicted latency of a candidate from a per-group latency table
(docs/design.md, "Latency budget").

The table is measured once per (network architecture, device, batch, threads, rounding, min_keep) and cached
as JSON: physically pruned networks (`PruningSpace.prune`) timed by `entropy_search.latency.torch_latency`, the
one latency measurement of the project. What is measured:

* a ladder of uniform networks (every group at keep 1.0, 0.95, ..., min_keep);
* around a reference, the ladder network closest to the target, with the unpruned network and each group alone
  at a few of its counts (the others at the reference): `T_g(c)`, summarised per group by two slopes, below and
  above the reference count (least squares through the reference, >= 0: noise averaged over the samples, and
  the prediction non-decreasing in each count, so the clipping's feasible options stay a prefix).

Prediction: additive around the reference, plus the part of the MAC count an additive model misses (a layer
between two pruned groups costs kept inputs x kept outputs, not the sum of the two savings), at
milliseconds per MAC `lam` (fitted on the uniform ladder: what the additive model misses of the latency
against what it misses of the MAC count, least absolute deviations; it may be negative):

    L(c) = L_ref + sum_g (T_g(c_g) - L_ref) + lam * (MACs(c) - A(c)),
    A(c) = M_ref + sum_g (MACs(ref with g at c_g) - M_ref)

which is exact at the reference.

Residual blocks ("Residual blocks" in docs/design.md): at the reference, the network with each block dropped
alone is timed too, `D_b = T(ref without b) - L_ref`. A candidate without the blocks `B` (the outermost dropped
ones) is predicted as

    L(c, B) = L(c) + sum_b D_b,

with L's terms taken without those blocks: the groups inside a dropped block count at the reference (their
counts change nothing), and `MACs` and `A` leave the dropped blocks' layers out. Exact at the reference with one
block dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import EntropySearchError
from ..jsonio import write_json
from ..latency import interleaved_latency
from .budget import MacsForm
from .space import PruningSpace

log = logging.getLogger(__name__)

TABLE_VERSION = 1
LADDER_STEP = 0.05
"""Keep-ratio step of the uniform ladder."""
POINTS_PER_GROUP = 5
"""Counts measured per group besides the reference (the smallest and largest options included)."""


class LatencyTable:
    """Predicted milliseconds of a candidate's forward (see the module docstring); `base` is the unpruned
    network's measured latency. Same interface as `MacsForm`: a call on counts, `along` for one group's options."""

    kind = "latency"
    unit = "ms"

    def __init__(self, data: dict, macs: MacsForm, reference: str, *, lam: float | None = None,
                 dropped: Sequence[str] = (), idle: frozenset[int] = frozenset()) -> None:
        """`dropped`: the outermost residual blocks the candidates drop (`macs` is their MAC form), `idle` the groups
        inside them; `lam`: the interaction's fitted slope (fitted on the ladder when None)."""
        self.data = data
        self.macs = macs
        self.key = data["key"]
        self.reference = reference
        table = data["tables"][reference]
        self.block_ms = {name: float(ms) - float(table["reference_ms"]) for name, ms in table.get("blocks", {}).items()}
        """Per residual block, the latency its dropping saves at the reference (negative: faster)."""
        missing = [name for name in dropped if name not in self.block_ms]
        if missing:
            raise EntropySearchError(f"the latency table has no timing of the network without {missing[0]}")
        self.dropped = tuple(dropped)
        self.idle = frozenset(idle)
        self._dropped_ms = sum(self.block_ms[name] for name in self.dropped)
        self.base = float(table["unpruned_ms"])
        """The unpruned network's latency, measured with the table (the budget's ratio is of this)."""
        self.reference_keep = float(reference)
        self.ref_counts = np.asarray(table["reference_counts"], dtype=np.int64)
        self.ref_ms = float(table["reference_ms"])
        self.samples = [(np.asarray(g["counts"], dtype=np.int64), np.asarray(g["ms"], dtype=float))
                        for g in table["groups"]]
        # per group, one slope below the reference count and one above, least squares through the reference
        # (ms per unit, >= 0): the prediction is exact at the reference, non-decreasing in each count, and a
        # timing's noise is averaged over the group's samples instead of taken at face value
        self.slopes = np.asarray([[_slope(c - r, ms - self.ref_ms, below) for below in (True, False)]
                                  for (c, ms), r in zip(self.samples, self.ref_counts)])
        n = len(self.samples)
        self._ref_macs = macs(self.ref_counts)
        # MACs of the reference with one group changed, per group (for the additive part of the MAC count)
        self._macs_one = [lambda v, g=g: macs.along(g, self.ref_counts, v) for g in range(n)]
        self.lam = 0.0
        self.lam = _fit_lam(self, data, reference, macs) if lam is None else float(lam)
        """Milliseconds per MAC of the interaction term, fitted on the ladder when the table is read."""
        self.path: Path | None = None
        """The cache file it was read from or written to."""
        self.measured = 0
        """Networks timed to build it (0: read from the cache)."""

    # ------------------------------------------------------------------ prediction

    def _group_ms(self, g: int, values) -> np.ndarray:
        d = np.asarray(values, dtype=float) - self.ref_counts[g]
        return self.ref_ms + np.where(d < 0, self.slopes[g, 0], self.slopes[g, 1]) * d

    def without(self, dropped: Sequence[str], idle: frozenset[int], macs: MacsForm) -> LatencyTable:
        """The same table predicting candidates without the residual blocks `dropped` (outermost first: a block
        inside another goes with it), whose groups inside them are `idle`, with `macs` their MAC form."""
        other = LatencyTable(self.data, macs, self.reference, lam=self.lam, dropped=dropped, idle=idle)
        other.path, other.measured = self.path, self.measured
        return other

    def _parts(self, counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Per group: measured latency change and additive MAC change from the reference (none for a group inside a
        dropped block)."""
        c = np.asarray(counts, dtype=np.int64).copy()
        for g in self.idle:
            c[g] = self.ref_counts[g]
        dms = np.asarray([self._group_ms(g, [c[g]])[0] - self.ref_ms for g in range(len(c))])
        dmacs = np.asarray([self._macs_one[g]([c[g]])[0] - self._ref_macs for g in range(len(c))], dtype=float)
        return dms, dmacs

    def __call__(self, counts: Sequence[int]) -> float:
        dms, dmacs = self._parts(counts)
        interaction = self.macs(counts) - self._ref_macs - dmacs.sum()
        return float(self.ref_ms + self._dropped_ms + dms.sum() + self.lam * interaction)

    def along(self, g: int, counts: Sequence[int], values: np.ndarray) -> np.ndarray:
        """Predicted latency for every value of group g's count in `values`, the other counts fixed."""
        v = np.asarray(values, dtype=np.int64)
        if g in self.idle:  # its count changes nothing
            return np.full(len(v), self(counts))
        dms, dmacs = self._parts(counts)
        rest_ms = self.ref_ms + self._dropped_ms + dms.sum() - dms[g]
        rest_macs = self._ref_macs + dmacs.sum() - dmacs[g]
        additive_macs = rest_macs + self._macs_one[g](v) - self._ref_macs
        interaction = self.macs.along(g, counts, v) - additive_macs
        return rest_ms + self._group_ms(g, v) - self.ref_ms + self.lam * interaction

    def describe(self) -> str:
        k = self.key
        return (f"latency table: {k['model']} on {k['device']} ({k['device_name']}), batch {k['batch']}, "
                f"{k['threads']} threads, {k['statistic']}; unpruned {self.base:.3f} ms, reference keep {self.reference_keep:g} "
                f"({self.ref_ms:.3f} ms), {self.lam * 1e6:.3f} ms per MMAC of interaction")


def _ratio_key(r: float) -> str:
    return f"{r:.4f}"


def ladder_ratios(min_keep: float, step: float = LADDER_STEP) -> list[float]:
    """1.0, 1 - step, ... down to min_keep (included)."""
    ratios = [1.0 - i * step for i in range(int(np.floor((1.0 - min_keep) / step + 1e-9)) + 1)]
    return sorted({round(r, 4) for r in ratios if r >= min_keep - 1e-9} | {round(min_keep, 4)}, reverse=True)


def sample_counts(options: np.ndarray, reference: int, points: int = POINTS_PER_GROUP) -> list[int]:
    """About `points` counts spread over a group's options, its smallest and largest included, plus the
    reference count."""
    picks = np.unique(np.round(np.linspace(0, len(options) - 1, min(points, len(options)))).astype(int))
    return sorted({int(options[i]) for i in picks} | {int(reference)})


class LatencyMeter:
    """Times physically pruned candidates of a space on one device, batch and thread count (`interleaved_latency`:
    the median over `rounds` passes through the whole list of each pass's median of `repeats` forwards, or of
    each pass's fastest forward with `statistic="min"`)."""

    def __init__(self, space: PruningSpace, *, device: str | torch.device, batch: int, threads: int,
                 statistic: str = "median", warmup: int = 3, repeats: int = 20, rounds: int = 5) -> None:
        if statistic not in ("median", "min"):
            raise EntropySearchError(f"latency statistic {statistic!r}; known: median, min")
        self.space, self.device, self.batch, self.threads = space, torch.device(device), int(batch), int(threads)
        self.field = "ms" if statistic == "median" else "min_ms"
        self.warmup, self.repeats, self.rounds = warmup, repeats, rounds
        self.calls = 0

    def __call__(self, candidates: Sequence[Sequence[int]], dropped: Sequence[Sequence[str]] | None = None) -> list[float]:
        """Milliseconds per forward of each candidate (channel counts per group; `dropped`: the residual blocks each
        drops)."""
        dropped = dropped if dropped is not None else [()] * len(candidates)
        models = [self.space.prune(self.space.counts_to_keep(list(c)), dropped=d).to(self.device)
                  for c, d in zip(candidates, dropped)]
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            timed = interleaved_latency(models, self.space.example_input, batch_sizes=[self.batch],
                                        rounds=self.rounds, warmup=self.warmup, repeats=self.repeats)
        finally:
            torch.set_num_threads(previous)
        self.calls += len(models)
        return [float(t[self.field][str(self.batch)]) for t in timed]


def table_key(space: PruningSpace, *, model: str, device: str, device_name: str, batch: int, threads: int,
              min_keep: float, statistic: str = "median") -> dict:
    """What a latency table depends on (the weights do not: dense kernels take as long on any values)."""
    return {"version": TABLE_VERSION, "model": model, "input": list(space.example_input.shape[1:]),
            "channels": [g.channels for g in space.groups], "round_to": space.round_to,
            "min_keep": round(float(min_keep), 6), "device": device, "device_name": device_name,
            "batch": int(batch), "threads": int(threads), "statistic": statistic, "torch": torch.__version__}


def table_path(cache_dir: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key['model'].replace('/', '_').replace(':', '_')}-{key['device']}-b{key['batch']}-t{key['threads']}-{digest}.json"


def _read(path: Path, key: dict) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("latency table %s is unreadable (%s); measuring it again", path, exc)
        return None
    return data if data.get("key") == key else None


def latency_table(space: PruningSpace, options: Sequence[np.ndarray], macs: MacsForm, *, key: dict,
                  cache_dir: str | Path, meter: LatencyMeter, target_ratio: float | None = None,
                  target_ms: float | None = None) -> LatencyTable:
    """The latency table of `space` for a target (a ratio of the unpruned latency, or milliseconds), read from
    `cache_dir` when measured before, else measured (what is missing: the ladder once, then one table per
    reference) and written there. `options` are the budget's counts per group."""
    if (target_ratio is None) == (target_ms is None):
        raise EntropySearchError("a latency table needs exactly one of target_ratio and target_ms")
    path = table_path(cache_dir, key)
    data = _read(path, key) or {"key": key, "uniform": {}, "uniform_counts": {}, "tables": {}}
    changed = False
    channels = np.asarray([g.channels for g in space.groups], dtype=np.int64)
    ratios = ladder_ratios(key["min_keep"])
    missing = [r for r in ratios if _ratio_key(r) not in data["uniform"]]
    if missing:
        counts = [space.round_counts(r, channels).tolist() for r in missing]
        for r, c, ms in zip(missing, counts, meter(counts)):
            data["uniform_counts"][_ratio_key(r)] = c
            data["uniform"][_ratio_key(r)] = ms
        changed = True
    base = data["uniform"][_ratio_key(1.0)]
    goal = target_ms if target_ms is not None else target_ratio * base
    reference = min(ratios, key=lambda r: abs(data["uniform"][_ratio_key(r)] - goal))
    ref = _ratio_key(reference)
    if ref not in data["tables"]:
        ref_counts = data["uniform_counts"][ref]
        samples = [sample_counts(opts, ref_counts[g]) for g, opts in enumerate(options)]
        trials = [ref_counts[:g] + [c] + ref_counts[g + 1:] for g, counts in enumerate(samples) for c in counts
                  if c != ref_counts[g]]
        # the unpruned network and the reference measured again with the group variations, under the same load
        measured = iter(meter([channels.tolist(), ref_counts] + trials))
        full_ms, ref_ms = next(measured), next(measured)
        groups = [{"counts": counts, "ms": [ref_ms if c == ref_counts[g] else next(measured) for c in counts]}
                  for g, counts in enumerate(samples)]
        data["tables"][ref] = {"reference_counts": ref_counts, "reference_ms": ref_ms, "unpruned_ms": full_ms,
                               "groups": groups}
        changed = True
    table = data["tables"][ref]
    names = [b.name for b in space.blocks]
    if names and set(names) - set(table.get("blocks", {})):
        # the reference again, then with each residual block dropped alone, under the same load
        timed = meter([table["reference_counts"]] * (len(names) + 1), [()] + [(name,) for name in names])
        shift = table["reference_ms"] - timed[0]  # to the reference's load when its table was measured
        table["blocks"] = {name: ms + shift for name, ms in zip(names, timed[1:])}
        changed = True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, data)
    table = LatencyTable(data, macs, ref)
    table.path = path
    table.measured = meter.calls
    return table


def _slope(dx: np.ndarray, dy: np.ndarray, below: bool) -> float:
    """Least-squares slope (>= 0) through the origin of the samples on one side of it."""
    side = dx < 0 if below else dx > 0
    x, y = dx[side].astype(float), dy[side]
    return max(0.0, float(x @ y / (x @ x))) if len(x) else 0.0


def _fit_lam(table: LatencyTable, data: dict, ref: str, macs: MacsForm) -> float:
    """Milliseconds per MAC of the interaction term, fitted on the uniform ladder: what the additive model (`table`
    with lam 0) misses of each ladder network's measured latency against what it misses of its MAC count, by
    least absolute deviations through the origin (the weighted median of the ratios: a burst of load on a few
    ladder networks, or the noise of a network near the reference, does not move it). It can be negative: on
    ResNet-20 at batch 1, pruning several groups together saved more time than their savings alone added up to."""
    scale = table.base / data["uniform"][_ratio_key(1.0)]  # the ladder's load to the table's
    xs, ys = [], []
    for r, counts in data["uniform_counts"].items():
        if r != ref:
            dms, dmacs = table._parts(counts)
            xs.append(macs(counts) - table._ref_macs - dmacs.sum())
            ys.append(scale * data["uniform"][r] - (table.ref_ms + dms.sum()))
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    keep = np.abs(x) > 0
    if not keep.any():
        return 0.0
    ratios, weights = y[keep] / x[keep], np.abs(x[keep])
    order = np.argsort(ratios)
    cumulative = np.cumsum(weights[order])
    return float(ratios[order][np.searchsorted(cumulative, cumulative[-1] / 2)])

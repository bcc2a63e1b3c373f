"""The pruning environment: one episode = one candidate network, one step = one channel group.

At step t the agent sees group t's [0,1]-normalised embedding (AMC's layer embedding) and answers one
float in [-1, 1], mapped to a keep ratio in [min_keep, 1]. Before it is applied the keep ratio is
clipped, as AMC does, so that the FLOPs target is still reachable if every later group were pruned to
min_keep. The clipping works on the rounded channel counts (the ones the network will have) with
the exact analytic MAC count, which is bilinear in neighbouring groups' counts, so at the end of every
episode the candidate's MACs are at most `flops_target` x the baseline's: the budget is met by
construction, never by penalty. With `flops_floor` > 0 the clipping is two-sided: the keep ratio is also
raised where needed so that the floor (`flops_floor` x the target) stays reachable with every later
group at full width, so candidates use the budget and rewards compare networks of about the same cost.

At the last step the candidate is evaluated without surgery (`CandidateEvaluator`: the kept weights
sliced into the original structure) and the reward computed; `info` carries every measurement.

The network, its groups and the evaluation batches are built once per process (a Ray env runner)
and shared by the environments living there, with the cache of evaluated candidates (keyed by kept
channels). The environment builds itself from a plain config dict, so a Ray worker can create it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from entropy_search.errors import ConfigError

LAYER_TYPES = ("conv", "depthwise", "linear")
OBS_NAMES = (
    "index", "type_conv", "type_depthwise", "type_linear", "in_channels", "out_channels", "kernel",
    "stride", "feature_size", "flops_share", "flops_removed", "flops_rest", "prev_action",
)
OBS_DIM = len(OBS_NAMES)

#: Defaults of the env config dict (see `SearchConfig.env_config()` for the full set).
ENV_DEFAULTS: dict[str, Any] = {
    "model": "digits_cnn",
    "checkpoint": None,
    "data": "digits",
    "data_root": None,
    "eval_batch": 512,
    "eval_mode": "auto",
    "bn_calibration": 256,
    "reward": "entropy",
    "entropy": {},
    "flops_target": 0.5,
    "flops_floor": 0.0,
    "min_keep": 0.1,
    "round_to": 1,
    "device": "auto",
    "cache": True,
    "simulate_eval_seconds": 0.0,
    "torch_threads": None,
    "seed": 0,
    "warm_cache": None,
}


# ---------------------------------------------------------------- budget arithmetic (pure, shared with baselines)


class MacsForm:
    """MACs as an exact quadratic form of the kept channel counts: ``k0 + a.c + c^T B c`` (B upper triangular).

    A conv/linear layer's MACs are its output positions times its kept weights, the product of (at most)
    an output and an input count, so the space's MAC count is a polynomial of degree two in the counts.
    Its coefficients are identified once from `space.macs_of_counts` (1 + 2n + n(n-1)/2 calls) and
    checked on random counts; where the check fails (an exotic layer), every call goes to
    `space.macs_of_counts`. This makes the budget clipping O(n) numpy work per step instead of
    a Python loop over every layer for every tried count.
    """

    def __init__(self, space, *, check_points: int = 8, seed: int = 0) -> None:
        self.space = space
        n = len(space.groups)
        f = space.macs_of_counts
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
        self.k0, self.a, self.B = int(k0), a, B
        self.exact = True
        rng = np.random.default_rng(seed)
        full = [grp.channels for grp in space.groups]
        points = [full] + [[int(rng.integers(1, c + 1)) for c in full] for _ in range(check_points)]
        self.exact = all(self(p) == f(p) for p in points)

    def __call__(self, counts: Sequence[int]) -> int:
        if not self.exact:
            return int(self.space.macs_of_counts(list(counts)))
        c = np.asarray(counts, dtype=np.int64)
        return int(self.k0 + self.a @ c + c @ (self.B @ c))

    def along(self, g: int, counts: Sequence[int], values: np.ndarray) -> np.ndarray:
        """MACs for every value of group g's count in `values`, the other counts fixed."""
        if not self.exact:
            trial = list(counts)
            out = []
            for v in values:
                trial[g] = int(v)
                out.append(self.space.macs_of_counts(trial))
            return np.asarray(out, dtype=np.int64)
        c = np.asarray(counts, dtype=np.int64).copy()
        c[g] = 0
        rest = self.k0 + self.a @ c + c @ (self.B @ c)
        linear = self.a[g] + self.B[g, :] @ c + self.B[:, g] @ c
        v = np.asarray(values, dtype=np.int64)
        return rest + linear * v + self.B[g, g] * v * v


class Budget:
    """AMC action clipping on rounded channel counts for one pruning space and FLOPs target."""

    def __init__(self, space, flops_target: float, min_keep: float, flops_floor: float = 0.0) -> None:
        self.space = space
        self.flops_target = float(flops_target)
        self.flops_floor = float(flops_floor)
        self.min_keep = float(min_keep)
        self.groups = list(space.groups)
        self.n = len(self.groups)
        self.base_macs = int(space.base_macs)
        self.target_macs = self.flops_target * self.base_macs
        self.floor_macs = self.flops_floor * self.target_macs
        self.full_counts = [g.channels for g in self.groups]
        self.macs = MacsForm(space)
        self._round = getattr(space, "_round", None)
        # the possible channel counts of each group, ascending (the one rounding rule of the space)
        self.options: list[np.ndarray] = []
        for g, group in enumerate(self.groups):
            c = group.channels
            ratios = sorted({min(1.0, max(self.min_keep, i / c)) for i in range(1, c + 1)} | {self.min_keep})
            self.options.append(np.asarray(sorted({self.count_of(g, k) for k in ratios}), dtype=np.int64))
        self.min_counts = [int(opts[0]) for opts in self.options]
        self.min_macs = space.macs_of_counts(self.min_counts)

    def count_of(self, g: int, keep: float) -> int:
        """Channels group `g` keeps at ratio `keep`, by the space's one rounding rule."""
        if self._round is not None:
            return int(self._round(float(keep), self.groups[g].channels))
        keeps = [1.0] * self.n
        keeps[g] = keep
        return self.space.kept_channels(keeps)[g]

    def feasible(self) -> bool:
        return self.min_macs <= self.target_macs

    def check(self) -> None:
        """ConfigError when the target cannot be met even with every group at min_keep."""
        if not self.feasible():
            floor = self.min_macs / self.base_macs
            raise ConfigError(
                f"search.flops_target: {self.flops_target:g} cannot be met: with every channel group at "
                f"min_keep={self.min_keep:g} the network still has {floor:.3f} of its MACs (layers that are never "
                f"pruned, rounding to {self.space.round_to}); raise search.flops_target above {floor:.3f} "
                "or lower search.min_keep"
            )

    def keep_of_action(self, action: float) -> float:
        """Map an action in [-1, 1] (clipped there) to a keep ratio in [min_keep, 1]."""
        a = float(np.clip(action, -1.0, 1.0)) if math.isfinite(action) else -1.0
        return self.min_keep + (a + 1.0) / 2.0 * (1.0 - self.min_keep)

    def clip(self, g: int, decided: Sequence[int], desired: int) -> int:
        """Group g's count: the option nearest below `desired` within the bounds that keep the episode on budget.

        Upper bound (hard, AMC's): with every later group at its minimum the MACs stay within the target.
        Lower bound (soft, `flops_floor`): with every later group at full width the MACs can still
        reach the floor. Where rounding makes the two cross, the upper bound wins.
        """
        opts = self.options[g]
        d = max(int(np.searchsorted(opts, desired, side="right")) - 1, 0)  # largest option <= desired
        low_rest = list(decided) + [0] + self.min_counts[g + 1:]
        ok = np.nonzero(self.macs.along(g, low_rest, opts) <= self.target_macs)[0]
        # MACs grow with the count, so the feasible options are a prefix; option 0 is feasible by induction
        hi = int(ok[-1]) if len(ok) else 0
        i = min(d, hi)
        if self.floor_macs > 0:
            high_rest = list(decided) + [0] + self.full_counts[g + 1:]
            reach = np.nonzero(self.macs.along(g, high_rest, opts) >= self.floor_macs)[0]
            lo = int(reach[0]) if len(reach) else len(opts) - 1
            i = min(max(i, lo), hi)
        return int(opts[i])

    def macs_ratio(self, counts: Sequence[int]) -> float:
        return self.macs(counts) / self.base_macs


# ---------------------------------------------------------------- the per-process context


@dataclass
class PruningContext:
    """What the environments of one process share: network, space, evaluator, budget, cache."""

    space: Any
    budget: Budget
    evaluator: Any = None
    reward: str = "entropy"
    simulate_eval_seconds: float = 0.0
    use_cache: bool = True
    cache: dict[tuple[int, ...], dict] = field(default_factory=dict)
    static_obs: np.ndarray | None = None
    stats: dict[str, float] = field(default_factory=lambda: {"evaluations": 0, "cache_hits": 0, "eval_seconds": 0.0})

    def __post_init__(self) -> None:
        self.static_obs = _static_features(self.space, self.budget)

    # -- evaluation

    def evaluate(self, counts: Sequence[int]) -> tuple[dict, bool]:
        """Measurements and reward of a candidate given by its kept channel counts; (record, cache_hit)."""
        key = tuple(int(c) for c in counts)
        if self.use_cache and key in self.cache:
            self.stats["cache_hits"] += 1
            return self.cache[key], True
        keep = self.space.counts_to_keep(key)
        if self.simulate_eval_seconds > 0:
            record = self._simulated(keep, key)
        else:
            from entropy_search.rewards import compute_reward

            record = dict(self.evaluator.evaluate(keep))
            record["reward"] = float(compute_reward(self.reward, record))
        record = _jsonable(record)
        record["kept_channels"] = list(key)
        record["keep"] = [float(k) for k in keep]
        self.stats["evaluations"] += 1
        self.stats["eval_seconds"] += float(record.get("eval_seconds", 0.0))
        if self.use_cache:
            self.cache[key] = record
        return record, False

    def _simulated(self, keep: Sequence[float], counts: Sequence[int]) -> dict:
        """Benchmarks: sleep like an evaluation would take and return a smooth synthetic reward."""
        t0 = time.perf_counter()
        time.sleep(self.simulate_eval_seconds)
        weights = np.linspace(1.0, 2.0, len(keep))
        entropy = float(np.dot(weights, keep) / weights.sum()) + 0.1 * float(np.std(keep))
        accuracy = float(0.5 + 0.5 * np.mean(np.sqrt(keep)))
        macs = self.budget.macs(counts)
        return {
            "entropy": entropy,
            "accuracy": accuracy,
            "macs": macs,
            "params": self.space.params(keep),
            "macs_ratio": macs / self.space.base_macs,
            "params_ratio": self.space.params(keep) / self.space.base_params,
            "eval_seconds": time.perf_counter() - t0,
            "reward": -entropy if self.reward == "entropy" else accuracy,
            "simulated": True,
        }

    def add_to_cache(self, records: Sequence[dict]) -> int:
        """Add candidates evaluated elsewhere (another worker, a checkpoint); returns how many were new."""
        added = 0
        for rec in records:
            key = tuple(int(c) for c in rec["kept_channels"])
            if key not in self.cache:
                self.cache[key] = {k: v for k, v in rec.items() if k not in _EPISODE_KEYS}
                added += 1
        return added


_EPISODE_KEYS = {"cache_hit", "actions", "desired_keep", "worker", "episode", "iteration", "time", "source", "clipped"}

# every context built in this process, by the hash of its config (shared by the envs of an env runner)
_CONTEXTS: dict[str, PruningContext] = {}


def context_key(cfg: dict) -> str:
    relevant = {k: cfg.get(k) for k in ENV_DEFAULTS if k not in ("warm_cache", "torch_threads")}
    path = cfg.get("checkpoint")
    if path and os.path.exists(path):  # a checkpoint rewritten at the same path is another network
        stat = os.stat(path)
        relevant["checkpoint_stat"] = (stat.st_mtime_ns, stat.st_size)
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def get_context(cfg: dict) -> PruningContext:
    """The context of this config in this process, built on first use."""
    key = context_key(cfg)
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        ctx = build_context(cfg)
        _CONTEXTS[key] = ctx
    return ctx


def share_cache(records: Sequence[dict]) -> int:
    """Add candidates to every context of this process (called on each env runner by the search)."""
    return sum(ctx.add_to_cache(records) for ctx in _CONTEXTS.values())


def process_stats() -> dict[str, float]:
    """Evaluation counters of this process's contexts (for benchmarks)."""
    out = {"evaluations": 0, "cache_hits": 0, "eval_seconds": 0.0, "pid": os.getpid()}
    for ctx in _CONTEXTS.values():
        for k in ("evaluations", "cache_hits", "eval_seconds"):
            out[k] += ctx.stats[k]
    return out


def load_pruning_setup(cfg: dict):
    """(model, splits, example_input) from the env config: the baseline checkpoint and the data set.

    The held-out split is drawn with the checkpoint's own seed and fraction, so it is the part of the
    training set the baseline never trained on.
    """
    from entropy_search.checkpoint import build_model, load_checkpoint
    from entropy_search.data import load_data

    path = cfg.get("checkpoint")
    if not path:
        raise ConfigError("model.checkpoint: the search needs a baseline checkpoint")
    ckpt = load_checkpoint(path)
    if cfg.get("model") and cfg["model"] != ckpt.model_name:
        raise ConfigError(f"model.name: {cfg['model']!r}, but checkpoint {path} holds a {ckpt.model_name!r}")
    trained = ckpt.config or {}
    splits = load_data(
        cfg["data"], cfg.get("data_root"),
        heldout_fraction=float(trained.get("heldout_fraction", 0.1)),
        seed=int(trained.get("seed", cfg.get("seed", 0))),
    )
    if ckpt.data and splits.name != ckpt.data:
        raise ConfigError(f"data.name: {cfg['data']!r}, but checkpoint {path} was trained on {ckpt.data!r}")
    model = build_model(ckpt)
    return model, splits, ckpt.example_input()


def build_context(cfg: dict) -> PruningContext:
    """Load the checkpoint and data, group the channels and fix the evaluation batches (once per process).

    With `simulate_eval_seconds` > 0 (benchmarks) no data is loaded, and without a checkpoint file the
    registry's untrained network is used: only the groups and the MAC arithmetic matter then.
    """
    import torch

    from entropy_search.space import PruningSpace

    cfg = {**ENV_DEFAULTS, **dict(cfg)}
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg["torch_threads"]))
    simulate = float(cfg.get("simulate_eval_seconds") or 0.0) > 0
    if simulate and not (cfg.get("checkpoint") and os.path.exists(cfg["checkpoint"])):
        from entropy_search.models import create_model, model_spec

        spec = model_spec(cfg["model"])
        model = create_model(cfg["model"]).eval()
        example = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
        splits = None
    else:
        model, splits, example = load_pruning_setup(cfg)
    space = PruningSpace(model, example, round_to=int(cfg["round_to"]))
    budget = Budget(space, cfg["flops_target"], cfg["min_keep"], cfg.get("flops_floor") or 0.0)
    budget.check()
    evaluator = None if simulate else make_evaluator(model, space, splits, cfg)
    return make_context(space, budget, evaluator, cfg)


def make_evaluator(model, space, splits, cfg: dict):
    """The CandidateEvaluator of the env config: a fixed batch of the held-out split (never the test split);
    its labels serve the held-out accuracy only, the entropy reward does not read them."""
    from entropy_search.data import eval_batch
    from entropy_search.evaluate import CandidateEvaluator
    from entropy_search.utils import resolve_device

    cfg = {**ENV_DEFAULTS, **dict(cfg)}
    x, y = eval_batch(splits, int(cfg["eval_batch"]), split="heldout", seed=int(cfg.get("seed", 0)))
    # the fixed batch of training images each candidate's BN statistics are re-estimated on (None: off)
    calibration = None
    if int(cfg["bn_calibration"]) > 0:
        calibration, _ = eval_batch(splits, int(cfg["bn_calibration"]), split="train", seed=int(cfg.get("seed", 0)))
    model.to(resolve_device(cfg.get("device") or "auto"))
    entropy = dict(cfg.get("entropy") or {})
    return CandidateEvaluator(
        space, x, y,
        entropy_layers=entropy.get("layers", "bn_relu"),
        bins=int(entropy.get("bins", 16)),
        method=entropy.get("method", "cooccurrence"),
        sample=None if entropy.get("sample") is None else float(entropy["sample"]),
        seed=int(cfg.get("seed", 0)),
        mode=cfg.get("eval_mode") or "auto",
        calibration=calibration,
    )


def make_context(space, budget: Budget, evaluator, cfg: dict) -> PruningContext:
    cfg = {**ENV_DEFAULTS, **dict(cfg)}
    ctx = PruningContext(
        space=space, budget=budget, evaluator=evaluator, reward=cfg["reward"],
        simulate_eval_seconds=float(cfg.get("simulate_eval_seconds") or 0.0), use_cache=bool(cfg.get("cache", True)),
    )
    warm = cfg.get("warm_cache")
    if warm and os.path.exists(warm):
        ctx.add_to_cache(read_jsonl(warm))
    return ctx


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (a killed writer) is skipped."""
    out = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _jsonable(record: dict) -> dict:
    out = {}
    for k, v in record.items():
        if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
            v = v.item()
        elif hasattr(v, "tolist"):
            v = v.tolist()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def _static_features(space, budget: Budget) -> np.ndarray:
    """Per-group features that do not depend on the episode: [n_groups, OBS_DIM] with dynamic slots 0."""
    groups = budget.groups
    n = len(groups)
    obs = np.zeros((n, OBS_DIM), dtype=np.float64)

    def norm(values):
        values = np.asarray(values, dtype=np.float64)
        top = values.max() if len(values) else 1.0
        return values / top if top > 0 else values

    obs[:, 0] = np.arange(n) / max(n - 1, 1)
    for i, g in enumerate(groups):
        obs[i, 1 + LAYER_TYPES.index(g.layer_type if g.layer_type in LAYER_TYPES else "conv")] = 1.0
    obs[:, 4] = norm([g.in_channels for g in groups])
    obs[:, 5] = norm([g.out_channels for g in groups])
    obs[:, 6] = norm([g.kernel for g in groups])
    obs[:, 7] = norm([g.stride for g in groups])
    obs[:, 8] = norm([g.feature_size for g in groups])
    obs[:, 9] = np.asarray([g.macs for g in groups], dtype=np.float64) / max(budget.base_macs, 1)
    return np.clip(obs, 0.0, 1.0)


# ---------------------------------------------------------------- the environment


class PruningEnv(gym.Env):
    """Gymnasium environment of the channel-pruning search (see the module docstring).

    `config` is the plain dict of `SearchConfig.env_config()` (or an RLlib EnvContext of it). Tests may
    pass a prebuilt `context` instead of a checkpoint.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: dict | None = None, *, context: PruningContext | None = None) -> None:
        super().__init__()
        cfg = {**ENV_DEFAULTS, **dict(config or {})}
        self.env_config = cfg
        self.ctx = context if context is not None else get_context(cfg)
        self.space = self.ctx.space
        self.budget = self.ctx.budget
        self.n_groups = self.budget.n
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(OBS_DIM,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self._rest_share = np.concatenate(
            [np.cumsum(self.ctx.static_obs[::-1, 9])[::-1][1:], [0.0]]
        )  # FLOPs share of the groups after t
        self._t = 0
        self._counts: list[int] = []
        self._desired: list[float] = []
        self._actions: list[float] = []
        self._prev = 0.0
        self.episodes = 0

    # -- gymnasium API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        self._counts = []
        self._desired = []
        self._actions = []
        self._prev = 0.0
        return self._obs(), {"group": 0}

    def step(self, action):
        if self._t >= self.n_groups:
            raise RuntimeError("step() called after the episode ended; call reset()")
        a = float(np.asarray(action, dtype=np.float64).reshape(-1)[0])
        g = self._t
        desired_keep = self.budget.keep_of_action(a)
        desired = self.budget.count_of(g, desired_keep)
        count = self.budget.clip(g, self._counts, desired)
        self._counts.append(count)
        self._actions.append(a)
        self._desired.append(desired_keep)
        self._prev = count / self.budget.groups[g].channels
        self._t += 1
        if self._t < self.n_groups:
            return self._obs(), 0.0, False, False, {"group": g, "keep": self._prev, "clipped": count != desired}
        record, hit = self.ctx.evaluate(self._counts)
        self.episodes += 1
        info = dict(record)
        info.update(
            cache_hit=hit,
            actions=list(self._actions),
            desired_keep=list(self._desired),
            worker=os.getpid(),
        )
        if not info["macs"] <= self.budget.target_macs:  # by construction; a bug if it fires
            raise AssertionError(f"budget violated: {info['macs']} > {self.budget.target_macs}")
        return self._obs(), float(record["reward"]), True, False, info

    # -- helpers

    def _obs(self) -> np.ndarray:
        t = min(self._t, self.n_groups - 1)
        obs = self.ctx.static_obs[t].copy()
        base = max(self.budget.base_macs, 1)
        if self._counts:
            counts = list(self._counts) + self.budget.full_counts[len(self._counts):]
            obs[10] = (base - self.budget.macs(counts)) / base
        obs[11] = self._rest_share[t] if self._t < self.n_groups else 0.0
        obs[12] = self._prev
        if self._t >= self.n_groups:
            obs[0] = 1.0
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    def candidate(self) -> dict:
        """The decided channel counts so far (for debugging)."""
        return {"kept_channels": list(self._counts), "step": self._t}


def make_env(config: dict | None = None) -> PruningEnv:
    """Factory for `gymnasium.make`-style and RLlib registration."""
    return PruningEnv(config)

"""The run directory of a search: its files, and the one rule for starting over or resuming in it
(docs/design.md, "Run directory and resume").

```
<output.dir>/config.yaml        the resolved config (saved before the search starts)
<output.dir>/candidates.jsonl   every candidate, appended as it comes
<output.dir>/result.json        written at the end
<output.dir>/checkpoints/       agent-<iteration>/, cache.jsonl, state.json (every output.checkpoint_every iterations)
```

A checkpoint is committed by `state.json` (written atomically), which names its agent folder; a write that
fails or is killed leaves the previous checkpoint valid. A full disk is one line (`no_space_error`), checked
before Ray starts (`check_free_space`).
"""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path

import yaml

from ..config import SearchConfig
from ..errors import ConfigError, EntropySearchError

RESULT_FILE = "result.json"
CANDIDATES_FILE = "candidates.jsonl"
CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
CACHE_FILE = "cache.jsonl"
WARM_CACHE_FILE = "warm_cache.jsonl"
FINALISTS_DIR = "finalists"  # each finished fine-tune of a finalist (entropy_search.finalists)
AGENT_DIR = "agent"  # the agent folder of checkpoints written before state.json named it; new ones: agent-<iteration>

#: What a resumed search must share with the interrupted one (the rest, e.g. stop rules, may change).
RESUME_KEYS = ("model", "data", "search", "seed")


def config_difference(before: dict, now: dict) -> str | None:
    """The first setting that differs between two resolved configs in what a resume must keep
    (`RESUME_KEYS` and the agent's algorithm), as `key (old -> new)`; None when there is none."""
    for key in RESUME_KEYS:
        if before.get(key) != now.get(key):
            return _first_difference(before.get(key), now.get(key), key)
    old, new = (before.get("agent") or {}).get("algorithm"), (now.get("agent") or {}).get("algorithm")
    if old != new:
        return f"agent.algorithm ({old!r} -> {new!r})"
    return None


#: `saved_config_difference` when `out` holds no readable saved config
NO_SAVED_CONFIG = "no saved config"


def saved_config_difference(out: Path, config: SearchConfig) -> str | None:
    """`config_difference` against the config saved in `out`; NO_SAVED_CONFIG when there is none or it is unreadable."""
    saved = Path(out) / CONFIG_FILE
    if not saved.exists():
        return NO_SAVED_CONFIG
    try:
        before = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError:
        return NO_SAVED_CONFIG
    return config_difference(_with_defaults(before, SearchConfig().to_dict()), config.to_dict())


def _with_defaults(saved: dict, defaults: dict) -> dict:
    """The saved config with the settings it lacks (added to the schema since it was written) at their defaults, so
    that an upgrade alone does not block a resume."""
    merged = dict(saved)
    for key, default in defaults.items():
        if key not in merged:
            merged[key] = default
        elif isinstance(default, dict) and isinstance(merged[key], dict):
            merged[key] = _with_defaults(merged[key], default)
    return merged


def prepare_output_dir(config: SearchConfig, *, resume: bool, overwrite: bool) -> Path:
    """Check that the search may run in `output.dir` (ConfigError otherwise) and create it.

    Resume: the saved config must match (`config_difference`). A fresh start in a folder holding a
    previous search needs `overwrite`, which deletes that search's checkpoints, candidates, fine-tuned finalists and result."""
    out = Path(config.output.dir)
    blocking = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConfigError(f"output.dir {out}: {blocking} is a file, not a folder; choose another output.dir")
    if resume:
        if (out / CONFIG_FILE).exists():
            diff = saved_config_difference(out, config)
            if diff == NO_SAVED_CONFIG:  # the file is there (checked above), so it is not readable YAML
                raise ConfigError(f"--resume: {out / CONFIG_FILE} is not readable, so the interrupted run's settings "
                                  "cannot be checked; restore it, or start over with --overwrite or another output.dir")
            if diff is not None:
                raise ConfigError(f"--resume: {diff} changed since the interrupted run; use another output.dir")
    elif (out / CHECKPOINT_DIR).exists() or (out / CANDIDATES_FILE).exists():
        if not overwrite:
            raise ConfigError(
                f"output.dir {out} holds a previous search; pass --resume to continue it, --overwrite to start over, "
                "or choose another output.dir"
            )
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        shutil.rmtree(out / FINALISTS_DIR, ignore_errors=True)
        for name in (CANDIDATES_FILE, RESULT_FILE):
            (out / name).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output.dir {out} cannot be written: {exc.strerror or exc}") from None
    return out


def _first_difference(a, b, prefix: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}.{key}")
    return f"{prefix} ({a!r} -> {b!r})"


# ---------------------------------------------------------------- disk space

#: Bytes of one candidates.jsonl row (and of its cache.jsonl entry): a base plus the per-group lists (kept
#: channels, keep ratios, actions); measured 660 bytes with 4 groups on digits.
ROW_BYTES_BASE = 400
ROW_BYTES_PER_GROUP = 80
#: Bytes of an agent checkpoint besides its weights (pickled configs and connector states); measured 0.25 MB in
#: all for PPO with hidden_sizes [64, 64] on digits, of which 0.13 MB weights and optimizer state.
AGENT_CHECKPOINT_OVERHEAD = 256 * 1024


def is_no_space(exc: BaseException) -> bool:
    """An OSError for a full disk (errno ENOSPC, or pyarrow's message, which has no errno)."""
    return isinstance(exc, OSError) and (exc.errno == errno.ENOSPC or "No space left on device" in str(exc))


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def checkpoint_bytes(config: SearchConfig) -> int:
    """One checkpoint's bytes: the last agent checkpoint's size when there is one, else an estimate from the
    agent's networks (policy and value, weights plus the learner's copy and two Adam moments, 4 bytes each)."""
    agents = [p for p in (Path(config.output.dir) / CHECKPOINT_DIR).glob(f"{AGENT_DIR}*") if p.is_dir()]
    if agents:
        return max(tree_bytes(p) for p in agents)
    sizes = list(config.agent.hidden_sizes)
    weights = 2 * sum(a * b for a, b in zip(sizes, sizes[1:]))
    return AGENT_CHECKPOINT_OVERHEAD + 4 * 4 * weights


def space_needed(config: SearchConfig, n_groups: int) -> int:
    """Bytes the rest of a search needs in `output.dir`: a new checkpoint next to the previous one (both exist
    while it is swapped in), the candidate rows still to come in candidates.jsonl, cache.jsonl and the env runners' warm cache (from the stop
    rule; none when only wall time bounds it), and the exported network (at most the baseline's size, twice
    with ONNX)."""
    out = Path(config.output.dir)
    row = ROW_BYTES_BASE + ROW_BYTES_PER_GROUP * n_groups
    stop = config.stop
    expected = [n for n in (stop.candidates, stop.iterations and stop.iterations * config.agent.episodes_per_iteration)
                if n]
    copies = (CANDIDATES_FILE, f"{CHECKPOINT_DIR}/{CACHE_FILE}", f"{CHECKPOINT_DIR}/{WARM_CACHE_FILE}")
    rows = len(copies) * row * min(expected) if expected else 0
    rows = max(0, rows - sum(tree_bytes(out / name) for name in copies))
    baseline = config.checkpoint_path()
    export = tree_bytes(baseline) * (2 if config.output.export_onnx else 1)
    return 2 * checkpoint_bytes(config) + rows + export


def _mb(n_bytes: float) -> int:
    return max(1, math.ceil(n_bytes / 2**20))


def no_space_error(config: SearchConfig, n_groups: int, *, free: int | None = None) -> EntropySearchError:
    """The one-line error of a full disk under `output.dir`."""
    out = Path(config.output.dir)
    have = "" if free is None else f", {free / 2**20:.1f} MB free"
    resume = "" if free is not None else f" ({resume_point(out)})"
    return EntropySearchError(f"no space left on {out}: {_mb(space_needed(config, n_groups))} MB needed{have}; "
                              f"free some space{resume} or choose another output.dir")


def resume_point(out: Path) -> str:
    """What `--resume` continues from in a search folder, in words: its committed checkpoint, or none yet (the
    agent then starts afresh and the candidates evaluated so far are kept)."""
    state = out / CHECKPOINT_DIR / STATE_FILE
    try:
        iteration = int(json.loads(state.read_text())["iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        return "no checkpoint yet: --resume starts the agent afresh and keeps the candidates evaluated"
    return f"the checkpoint of iteration {iteration} is kept: --resume continues from it"


def check_free_space(config: SearchConfig, n_groups: int) -> None:
    """The error of `no_space_error` when `output.dir` has less free space than the search needs (before Ray starts)."""
    free = shutil.disk_usage(Path(config.output.dir)).free
    if free < space_needed(config, n_groups):
        raise no_space_error(config, n_groups, free=free)

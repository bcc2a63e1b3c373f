"""The run directory of a search: its files, and the one rule for starting over or resuming in it
(docs/design.md, "Run directory and resume").

```
<output.dir>/config.yaml        the resolved config (saved before the search starts)
<output.dir>/candidates.jsonl   every candidate, appended as it comes
<output.dir>/result.json        written at the end
<output.dir>/checkpoints/       agent/, cache.jsonl, state.json (every output.checkpoint_every iterations)
```
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from ..config import SearchConfig
from ..errors import ConfigError

RESULT_FILE = "result.json"
CANDIDATES_FILE = "candidates.jsonl"
CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
CACHE_FILE = "cache.jsonl"
WARM_CACHE_FILE = "warm_cache.jsonl"
AGENT_DIR = "agent"

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


def saved_config_difference(out: Path, config: SearchConfig) -> str | None:
    """`config_difference` against the config saved in `out`; 'no saved config' when there is none or it is unreadable."""
    saved = Path(out) / CONFIG_FILE
    if not saved.exists():
        return "no saved config"
    try:
        before = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError:
        return "no saved config"
    return config_difference(before, config.to_dict())


def prepare_output_dir(config: SearchConfig, *, resume: bool, overwrite: bool) -> Path:
    """Check that the search may run in `output.dir` (ConfigError otherwise) and create it.

    Resume: the saved config must match (`config_difference`). A fresh start in a folder holding a
    previous search needs `overwrite`, which deletes that search's checkpoints, candidates and result."""
    out = Path(config.output.dir)
    blocking = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConfigError(f"output.dir {out}: {blocking} is a file, not a folder; choose another output.dir")
    if resume:
        if (out / CONFIG_FILE).exists():
            diff = saved_config_difference(out, config)
            if diff is not None:
                raise ConfigError(f"--resume: {diff} changed since the interrupted run; use another output.dir")
    elif (out / CHECKPOINT_DIR).exists() or (out / CANDIDATES_FILE).exists():
        if not overwrite:
            raise ConfigError(
                f"output.dir {out} holds a previous search; pass --resume to continue it, --overwrite to start over, "
                "or choose another output.dir"
            )
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
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

"""The small real searches and sweeps the tests run on the digits CNN (seconds of agent time on 2 cores), defined
once: each test states only what it changes (dotted-key overrides, as `--set` takes them)."""

from __future__ import annotations

from pathlib import Path

from entropy_search.config import load_config
from entropy_search.jsonio import read_jsonl
from entropy_search.rl.rundir import CANDIDATES_FILE


def tiny_search(out: Path, checkpoint: Path, **overrides) -> dict:
    """A search of the digits CNN at 2x fewer MACs: 3 PPO iterations x 8 candidates on 2 env runners, top-2,
    one fine-tune epoch, every finalist fine-tuned in full (`selection.method: full`, so that the tests see the
    whole comparison; the shipped default, halving with survivors, has its own tests); the resolved config as a
    plain dict (what a YAML file holds)."""
    data = {
        "model": {"checkpoint": str(checkpoint), "train_if_missing": False},
        "data": {"eval_batch": 128},
        "search": {"flops_target": 0.5, "top_k": 2, "device": "cpu"},
        "agent": {"episodes_per_iteration": 8, "num_epochs": 2, "num_minibatches": 2},
        "resources": {"num_env_runners": 2, "num_cpus_per_env_runner": 1, "driver_threads": 1},
        "stop": {"iterations": 3},
        "finetune": {"epochs": 1},
        "selection": {"method": "full"},
        "output": {"dir": str(out), "checkpoint_every": 2, "export_onnx": False},
    }
    return load_config(data, overrides).to_dict()


def tiny_sweep(name: str, storage: Path, checkpoint: Path, store: str, **extra) -> dict:
    """A sweep file of two trials, the entropy and the accuracy reward, side by side on 2 CPUs: each trial the
    digits CNN at 2x, 2 iterations x 4 candidates, one fine-tune epoch (tens of seconds). `extra` replaces top-level
    keys."""
    return {
        "name": name,
        "base": {
            "model": {"checkpoint": str(checkpoint), "train_if_missing": False},
            "data": {"eval_batch": 128},
            "search": {"flops_target": 0.5, "top_k": 2, "device": "cpu"},
            "agent": {"episodes_per_iteration": 4, "num_epochs": 2},
            "stop": {"iterations": 2},
            "baselines": {"random_candidates": 4},
            "finetune": {"epochs": 1},
            "output": {"checkpoint_every": 1, "export_onnx": False},
        },
        "axes": {"search.reward": ["entropy", "accuracy"]},
        "max_concurrent_trials": 2,
        "storage_path": str(storage),
        "resources": {"cpus_per_trial": 0.5, "num_env_runners": 1, "cpus_per_env_runner": 0.5},
        "mlflow": {"tracking_uri": store},
        **extra,
    }


def candidate_sequence(out: Path) -> list[tuple]:
    """What a search evaluated, in order: (iteration, kept channels, reward) per candidate of `out`; two searches
    that made the same decisions have equal sequences."""
    return [(c["iteration"], c["kept_channels"], c["reward"]) for c in read_jsonl(Path(out) / CANDIDATES_FILE)]

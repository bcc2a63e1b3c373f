"""The RL search end to end on the digits CNN: PPO and SAC with 2 env runners, resume, CLI, errors.

One local Ray instance (2 CPUs) serves the whole module; each search takes seconds of agent time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from entropy_search.config import load_config
from entropy_search.errors import ConfigError

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, train_digits_checkpoint) -> Path:
    """A digits CNN trained for a few epochs (seconds), saved like `entropy-search train` does."""
    return train_digits_checkpoint(tmp_path_factory.mktemp("baseline") / "digits_cnn.pt", epochs=4)


def small_config(out: Path, checkpoint: Path, **overrides):
    base = {
        "model": {"checkpoint": str(checkpoint), "train_if_missing": False},
        "data": {"eval_batch": 128},
        "search": {"flops_target": 0.5, "top_k": 2, "device": "cpu"},
        "agent": {"episodes_per_iteration": 8, "num_epochs": 2, "num_minibatches": 2},
        "resources": {"num_env_runners": 2, "num_cpus_per_env_runner": 1, "driver_threads": 1},
        "stop": {"iterations": 3},
        "finetune": {"epochs": 1},
        "output": {"dir": str(out), "checkpoint_every": 2, "export_onnx": False},
    }
    return load_config(base, overrides)


def read_candidates(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines() if line.strip()]


def check_result(result: dict, config, out: Path) -> None:
    target = config.search.flops_target
    candidates = read_candidates(out)
    assert len(candidates) == result["cost"]["candidates"] > 0
    assert all(c["macs_ratio"] <= target + 1e-12 for c in candidates)  # the budget, always
    assert all(len(c["kept_channels"]) == len(result["groups"]) for c in candidates)
    assert len({c["id"] for c in candidates}) == len(candidates)
    # top-k: distinct candidates, best first, the best of everything evaluated
    rewards = [t["reward"] for t in result["top_k"]]
    assert rewards == sorted(rewards, reverse=True)
    assert result["best"]["reward"] == pytest.approx(max(c["reward"] for c in candidates))
    best = result["best"]
    assert best["macs_ratio"] <= target + 1e-12 and best["analytic_macs_match"]
    assert 0 <= best["test_accuracy_before_finetune"] <= 1 and 0 <= best["test_accuracy_after_finetune"] <= 1
    assert set(result["best_policy"]) == {g["name"] for g in result["groups"]}
    # baselines under the same budget and the same number of evaluations
    uniform, random_ = result["baselines"]["uniform"], result["baselines"]["random"]
    assert uniform["best"]["macs_ratio"] <= target + 1e-12 and random_["best"]["macs_ratio"] <= target + 1e-12
    assert random_["evaluations"] == result["cost"]["evaluations"]
    assert "test_accuracy_after_finetune" in random_["final"]
    # the cost, and the resolved config saved with the result
    cost = result["cost"]
    assert cost["evaluations"] + cost["cache_hits"] == cost["candidates"]
    assert cost["candidates_per_second"] > 0 and cost["search_seconds"] > 0
    assert result["config"] == config.to_dict()
    assert load_config(out / "config.yaml") == config
    assert json.loads((out / "result.json").read_text())["best"]["kept_channels"] == best["kept_channels"]
    # how the reward ranks the distinct candidates against held-out accuracy (all digits candidates have both)
    proxy = result["proxy"]
    assert proxy["candidates"] == len({tuple(c["kept_channels"]) for c in candidates})
    for rho in (proxy["entropy_reward_vs_accuracy"], proxy["reward_vs_accuracy"]):
        assert rho is None or -1 <= rho <= 1
    if config.search.reward == "accuracy" and proxy["reward_vs_accuracy"] is not None:
        assert proxy["reward_vs_accuracy"] == pytest.approx(1.0)


def test_ppo_search_with_two_env_runners(ray_local, checkpoint, tmp_path):
    from entropy_search.search import run_search

    config = small_config(tmp_path / "ppo", checkpoint)
    seen = []
    result = run_search(config, progress=False, on_iteration=seen.append)
    check_result(result, config, tmp_path / "ppo")
    assert [m["iteration"] for m in seen] == [1, 2, 3]
    assert result["cost"]["candidates"] >= 3 * 8
    for key in ("reward_mean", "reward_max", "best_reward", "best_macs_ratio", "best_params_ratio", "best_entropy",
                "best_accuracy", "candidates", "evaluations", "candidates_per_second"):
        assert key in seen[-1], key
    workers = {c["worker"] for c in read_candidates(tmp_path / "ppo")}
    assert len(workers) == 2 and os.getpid() not in workers  # evaluated where the envs live
    assert (tmp_path / "ppo" / "best_pruned.pt").exists()


@pytest.mark.parametrize("runners", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_sac_search(ray_local, checkpoint, tmp_path, runners):
    """SAC on the same env and config; 0 env runners = the env lives in the driver (fast), 2 = as deployed."""
    from entropy_search.search import run_search

    config = small_config(tmp_path / "sac", checkpoint, **{
        "agent.algorithm": "sac", "agent.learning_starts_episodes": 4, "agent.train_batch_size": 32,
        "resources.num_env_runners": runners, "search.reward": "accuracy", "search.top_k": 1,
        "baselines.finetune": False, "finetune.epochs": 0,
    })
    result = run_search(config, progress=False)
    candidates = read_candidates(tmp_path / "sac")
    assert result["cost"]["iterations"] == 3 and len(candidates) >= 3 * 8
    assert all(c["reward"] == pytest.approx(c["accuracy"]) for c in candidates)
    assert all(c["macs_ratio"] <= 0.5 + 1e-12 for c in candidates)
    assert result["best"]["reward"] == pytest.approx(max(c["reward"] for c in candidates))
    if runners:
        assert len({c["worker"] for c in candidates}) == runners


@pytest.mark.parametrize("runners", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_after_interruption_keeps_checkpointed_candidates(ray_local, checkpoint, tmp_path, runners):
    from entropy_search.search import CHECKPOINT_DIR, run_search

    out = tmp_path / "resume"
    config = small_config(out, checkpoint, **{"stop.iterations": 4, "baselines.enabled": False, "finetune.epochs": 0,
                                             "resources.num_env_runners": runners, "search.top_k": 1})

    class Killed(Exception):
        pass

    def die_at_three(metrics):
        if metrics["iteration"] == 3:
            raise Killed  # like a crash or kill -9: no orderly checkpoint after iteration 2

    with pytest.raises(Killed):
        run_search(config, progress=False, on_iteration=die_at_three)
    state = json.loads((out / CHECKPOINT_DIR / "state.json").read_text())
    assert state["iteration"] == 2
    checkpointed = [json.loads(line) for line in (out / CHECKPOINT_DIR / "cache.jsonl").read_text().splitlines()]
    before = read_candidates(out)
    # one cache entry per distinct candidate (two workers may evaluate the same one at the same time)
    assert len(checkpointed) == len({tuple(c["kept_channels"]) for c in before if c["iteration"] <= 2}) > 0
    assert len(checkpointed) <= state["evaluations"]
    assert len(before) >= state["episodes"]  # iteration 3's candidates were written too

    with pytest.raises(ConfigError, match="--resume"):
        run_search(config, progress=False)  # a fresh start must not clobber the interrupted search
    with pytest.raises(ConfigError, match="search.flops_target"):
        run_search(load_config(config.to_dict(), {"search.flops_target": 0.4}), resume=True, progress=False)

    seen = []
    result = run_search(config, resume=True, progress=False, on_iteration=seen.append)
    assert [m["iteration"] for m in seen] == [3, 4]  # continues, does not start over
    assert result["cost"]["iterations"] == 4
    assert seen[0]["candidates"] == state["episodes"] + seen[0]["iteration_candidates"]
    after = read_candidates(out)
    assert after[: len(before)] == before  # nothing written before is lost
    assert len({c["id"] for c in after}) == len(after)
    keys = {tuple(c["kept_channels"]) for c in after}
    assert all(tuple(c["kept_channels"]) in keys for c in checkpointed)
    assert len(result["history"]) == 4
    assert result["best"]["reward"] >= max(c["reward"] for c in checkpointed)
    # candidates evaluated before the interruption were not evaluated again
    resumed = [c for c in after[len(before):]]
    known = {tuple(c["kept_channels"]) for c in before}
    assert all(c["cache_hit"] for c in resumed if tuple(c["kept_channels"]) in known)


def test_baselines_meet_the_budget_with_the_same_arithmetic():
    import numpy as np

    from entropy_search.baselines import random_search, uniform_baseline, uniform_counts
    from entropy_search.envs import Budget
    from entropy_search.models import create_model
    from entropy_search.space import PruningSpace

    space = PruningSpace(create_model("resnet20").eval(), torch.zeros(1, 3, 32, 32), round_to=4)
    budget = Budget(space, 0.4, 0.1, 0.9)
    ratio, counts = uniform_counts(budget)
    assert space.macs_of_counts(counts) <= 0.4 * space.base_macs
    bigger = [budget.count_of(g, min(1.0, ratio + 0.02)) for g in range(budget.n)]
    assert bigger == counts or space.macs_of_counts(bigger) > 0.4 * space.base_macs  # the largest such ratio

    def fake_evaluate(c):
        return {"kept_channels": list(c), "reward": -float(np.std(c)), "macs": space.macs_of_counts(c)}

    uniform = uniform_baseline(budget, fake_evaluate)
    assert uniform["evaluations"] == 1 and uniform["best"]["uniform_keep"] == ratio
    seen = []
    result = random_search(budget, fake_evaluate, 25, seed=3, on_candidate=seen.append)
    assert result["evaluations"] == 25 == len({tuple(r["kept_channels"]) for r in seen})
    assert all(r["macs"] <= 0.4 * space.base_macs for r in seen)
    assert result["best"]["reward"] == max(r["reward"] for r in seen)
    again = random_search(budget, fake_evaluate, 25, seed=3)
    assert again["best"]["kept_channels"] == result["best"]["kept_channels"]  # seeded


def test_trial_resources_and_algorithm_config():
    from entropy_search.search import build_algorithm_config, trial_resources

    config = load_config({"resources": {"num_env_runners": 3, "num_cpus_per_env_runner": 0.5,
                                        "num_gpus_per_env_runner": 0.25, "num_envs_per_env_runner": 2},
                          "agent": {"episodes_per_iteration": 12}})
    assert trial_resources(config) == [{"CPU": 1.0}] + [{"CPU": 0.5, "GPU": 0.25}] * 3
    algo = build_algorithm_config(config, n_groups=10)
    assert algo.num_env_runners == 3 and algo.num_gpus_per_env_runner == 0.25
    assert algo.gamma == 1.0 and algo.rollout_fragment_length == 2 * 10  # whole episodes per env
    assert algo.train_batch_size_per_learner == 3 * 2 * 2 * 10
    sac = build_algorithm_config(load_config({"agent": {"algorithm": "sac"}}), n_groups=10)
    assert type(sac).__name__ == "SACConfig" and sac.gamma == 1.0


def test_unreachable_target_fails_before_ray_starts(checkpoint, tmp_path):
    from entropy_search.search import run_search

    config = small_config(tmp_path / "bad", checkpoint, **{"search.flops_target": 0.002, "search.min_keep": 0.5})
    with pytest.raises(ConfigError, match="search.flops_target: 0.002 cannot be met"):
        run_search(config, progress=False)
    assert not (tmp_path / "bad" / "candidates.jsonl").exists()


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    from entropy_search.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("search:\n  flops_target: 1.5\n")
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "entropy-search search: error: search.flops_target: must be in (0, 1], got 1.5"
    assert main(["search", str(path), "--set", "search.flops_target=0.5", "--set", "search.typo=1"]) == 2
    assert "search.typo: unknown key" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_smoke_run_trains_a_missing_baseline(ray_local, tmp_path, capsys):
    from entropy_search.cli import main

    path = tmp_path / "c.yaml"
    real = tmp_path / "real" / "baseline.pt"
    path.write_text(f"output:\n  dir: {tmp_path / 'out'}\nmodel:\n  checkpoint: {real}\nresources:\n  num_env_runners: 2\n")
    assert main(["search", str(path), "--smoke", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "candidates/s" in out and "uniform" in out
    assert "entropy reward vs held-out accuracy: Spearman" in out
    result = json.loads((tmp_path / "out" / "smoke" / "result.json").read_text())
    assert (tmp_path / "out" / "smoke" / "baseline.pt").exists()
    assert not real.exists()  # the smoke baseline never takes the real checkpoint's place
    assert result["cost"]["iterations"] == 2


def test_summary_reports_the_proxy_and_warns_when_entropy_barely_tracks_accuracy():
    from entropy_search.commands.search import proxy_lines

    weak = {"candidates": 40, "entropy_reward_vs_accuracy": 0.04, "reward_vs_accuracy": 0.04}
    lines = proxy_lines(weak, "entropy")
    assert lines[0] == "entropy reward vs held-out accuracy: Spearman +0.04 over 40 candidates (1 = same ranking)"
    assert lines[1].startswith("warning:")
    assert len(proxy_lines(weak, "accuracy")) == 1  # no warning when entropy did not pick the candidate
    assert len(proxy_lines({**weak, "entropy_reward_vs_accuracy": 0.8}, "entropy")) == 1
    assert proxy_lines({"candidates": 2, "entropy_reward_vs_accuracy": None}, "entropy") == []

"""One search (`entropy_search.search`) end to end on the digits CNN: PPO and SAC with 2 env runners, resume,
CLI, errors; and `finish_search` (baselines, finalists, result) on a hand-made search state without Ray.

One local Ray instance (2 CPUs) serves the whole module; each search takes seconds of agent time.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_scripts import load_bench
from tiny_runs import candidate_sequence, tiny_search

from entropy_search.config import load_config
from entropy_search.errors import ConfigError, EntropySearchError
from entropy_search.jsonio import read_jsonl
from entropy_search.problem import PEER_RECIPES, load_checkpoint, record_key
from entropy_search.rl.rundir import (
    CACHE_FILE,
    CANDIDATES_FILE,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    RESULT_FILE,
    STATE_FILE,
)

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, train_digits_checkpoint) -> Path:
    """A digits CNN trained for a few epochs (seconds), saved like `entropy-search train` does."""
    return train_digits_checkpoint(tmp_path_factory.mktemp("baseline") / "digits_cnn.pt", epochs=4)


def small_config(out: Path, checkpoint: Path, **overrides):
    return load_config(tiny_search(out, checkpoint, **overrides))


def read_candidates(out: Path) -> list[dict]:
    return read_jsonl(out / CANDIDATES_FILE)


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
    assert result["agent"]["reward"] == pytest.approx(max(c["reward"] for c in candidates))
    best = result["agent"]
    assert best["macs_ratio"] <= target + 1e-12 and best["analytic_macs_match"]
    assert 0 <= best["test_accuracy_before_finetune"] <= 1 and 0 <= best["test_accuracy_after_finetune"] <= 1
    assert set(result["agent_policy"]) == {g["name"] for g in result["groups"]}
    # unprefixed: the delivered network, the one exported
    delivered = result["delivered"]
    assert delivered["label"] == result["selection"]["winner"] and result["policy"] == delivered["policy"]
    assert load_checkpoint(out / "best_pruned.pt").keep == delivered["keep"]
    assert "best" not in result and "best_policy" not in result
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
    assert load_config(out / CONFIG_FILE) == config
    assert json.loads((out / RESULT_FILE).read_text())["agent"]["kept_channels"] == best["kept_channels"]
    # how the reward ranks the distinct candidates against held-out accuracy (all digits candidates have both;
    # the correlation itself is checked on a hand-made case in test_result_proxy_is_the_rank_correlation...)
    assert result["proxy"]["candidates"] == len({tuple(c["kept_channels"]) for c in candidates})


def test_ppo_search_with_two_env_runners(ray_local, checkpoint, tmp_path):
    from entropy_search.search import run_search

    config = small_config(tmp_path / "ppo", checkpoint, **{"agent.initial_std": 0.2})
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
    # the env runners sample the first iteration with the configured start (RLlib's own: ~40% at a bound)
    first = np.array([c["actions"] for c in read_candidates(tmp_path / "ppo") if c["iteration"] == 1])
    assert len(first) >= 8 and np.mean(np.abs(first) >= 0.999) < 0.05 and first.std(axis=0).max() < 0.4
    # the fine-tuned finalists it kept read back as the networks it measured: bench/bench_paired.py's per-image
    # gaps to uniform pruning average to the recorded difference of test accuracies (about 2 s)
    # (a peer recipe's too, read by a process that has not computed the peers' rankings)
    gaps = load_bench("bench_paired").gaps(tmp_path / "ppo", ["random", "tp_taylor"])
    recorded = {label: result["baselines"][label]["final"]["test_accuracy_after_finetune"]
                for label in ("uniform", "random", "tp_taylor")}
    for label in ("random", "tp_taylor"):
        assert float(gaps["test", label].mean()) == pytest.approx(recorded[label] - recorded["uniform"], abs=1e-9)


@pytest.mark.slow
def test_search_on_a_user_model_with_a_concatenation_and_a_grouped_conv(ray_local, tmp_path):
    """The whole path (baseline training, env runners importing the user's module, adaptive BN, the entropy and
    kl measurements, baselines, the final stage, export) on `tests/user_models.py`."""
    from entropy_search.search import run_search

    config = small_config(tmp_path / "user", tmp_path / "user_baseline.pt", **{
        "model.name": "user_models:dense_grouped_net", "model.train_if_missing": True, "model.train_epochs": 2,
        "stop.iterations": 2, "search.top_k": 1})
    result = run_search(config, progress=False)
    check_result(result, config, tmp_path / "user")
    kinds = {g["layer_type"] for g in result["groups"]}
    assert "grouped" in kinds and len(result["groups"]) == 4
    candidates = read_candidates(tmp_path / "user")
    assert all(c["entropy"] > 0 and c["kl"] >= 0 for c in candidates)
    assert result["delivered"]["analytic_macs_match"]
    workers = {c["worker"] for c in candidates}
    assert os.getpid() not in workers  # the env runners imported the user's module themselves


@pytest.mark.slow
def test_a_search_survives_a_killed_env_runner(ray_local, checkpoint, tmp_path):
    """SIGKILL of one env runner's process mid-search: RLlib restarts it, the search finishes, every candidate is
    recorded once, the restart is counted, and no candidate recorded in an earlier iteration is evaluated again
    (the restarted runner starts from the warm cache)."""
    from entropy_search.search import run_search

    out = tmp_path / "kill"
    config = small_config(out, checkpoint, **{"stop.iterations": 8, "baselines.enabled": False,
                                             "finetune.epochs": 0, "search.top_k": 1})
    killed = []

    def kill_a_runner(metrics):
        if metrics["iteration"] == 2 and not killed:
            pid = read_candidates(out)[-1]["worker"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    result = run_search(config, progress=False, on_iteration=kill_a_runner)
    candidates = read_candidates(out)
    assert killed and result["cost"]["iterations"] == 8
    assert result["cost"]["env_runners_lost"] == 1
    assert len(candidates) == result["cost"]["candidates"] and len({c["id"] for c in candidates}) == len(candidates)
    assert {c["iteration"] for c in candidates} == set(range(1, 9))
    assert killed[0] not in {c["worker"] for c in candidates if c["iteration"] >= 4}
    seen: set[tuple] = set()
    for iteration in range(1, 9):
        rows = [c for c in candidates if c["iteration"] == iteration]
        again = [c["kept_channels"] for c in rows if not c.get("cache_hit") and record_key(c) in seen]
        assert again == [], f"iteration {iteration} evaluated again what earlier iterations recorded: {again}"
        seen |= {record_key(c) for c in rows}


@pytest.mark.slow
def test_a_search_survives_candidates_whose_activations_are_not_finite(ray_local, tmp_path):
    from entropy_search.search import run_search

    config = small_config(tmp_path / "nan", tmp_path / "nan_baseline.pt", **{
        "model.name": "user_models:nan_when_narrow", "model.train_if_missing": True, "model.train_epochs": 1,
        "stop.iterations": 3, "search.top_k": 1, "search.flops_target": 0.6, "search.flops_floor": 0.0,
        "search.min_keep": 0.1})
    result = run_search(config, progress=False)
    candidates = read_candidates(tmp_path / "nan")
    broken = [c for c in candidates if c.get("nonfinite")]
    assert broken, "the test model must produce some non-finite candidates"
    assert all(c["accuracy"] == 0.0 and c["feature_error"] == 1.0 for c in broken)
    assert not result["agent"].get("nonfinite") and result["delivered"] is not None


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
    assert result["agent"]["reward"] == pytest.approx(max(c["reward"] for c in candidates))
    if runners:
        assert len({c["worker"] for c in candidates}) == runners


@pytest.mark.parametrize("runners", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_after_interruption_keeps_checkpointed_candidates(ray_local, checkpoint, tmp_path, runners):
    from entropy_search.search import run_search

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
    state = json.loads((out / CHECKPOINT_DIR / STATE_FILE).read_text())
    assert state["iteration"] == 2
    # PPO's adaptive KL coefficient, which RLlib's checkpoint leaves out (the resume below repeats the search
    # only if it is restored)
    assert list(state["learner"]["kl_coeffs"]) == ["default_policy"]
    checkpointed = read_jsonl(out / CHECKPOINT_DIR / CACHE_FILE)
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
    # the killed iteration 3's candidates that the replay did not propose again (remote runners) are recorded too
    unreplayed = sum(1 for c in read_candidates(out) if c.get("unreplayed"))
    assert seen[0]["candidates"] == state["episodes"] + seen[0]["iteration_candidates"] + unreplayed
    after = read_candidates(out)
    # exactly once: the rows up to the checkpoint stay, the replayed iterations are written once more
    at_checkpoint = [c for c in before if c["iteration"] <= 2]
    assert after[: len(at_checkpoint)] == at_checkpoint
    assert len(after) == result["cost"]["candidates"] and sorted({c["iteration"] for c in after}) == [1, 2, 3, 4]
    assert len({c["id"] for c in after}) == len(after)
    keys = {tuple(c["kept_channels"]) for c in after}
    assert all(tuple(c["kept_channels"]) in keys for c in checkpointed)
    assert len(result["history"]) == 4
    assert result["agent"]["reward"] >= max(c["reward"] for c in checkpointed)
    # candidates evaluated before the interruption were not evaluated again
    resumed = [c for c in after[len(before):]]
    known = {tuple(c["kept_channels"]) for c in before}
    assert all(c["cache_hit"] or c.get("evaluated_before_resume") for c in resumed
               if tuple(c["kept_channels"]) in known)
    if runners == 0:  # deterministic: the same candidates, in the same order, as a run that was not interrupted
        whole = run_search(load_config(config.to_dict(), {"output.dir": str(tmp_path / "whole")}), progress=False)

        assert candidate_sequence(out) == candidate_sequence(tmp_path / "whole")
        assert result["agent"]["kept_channels"] == whole["agent"]["kept_channels"]
        assert result["agent"]["reward"] == whole["agent"]["reward"]


def test_unreachable_target_fails_before_ray_starts(checkpoint, tmp_path):
    from entropy_search.search import run_search

    config = small_config(tmp_path / "bad", checkpoint, **{"search.flops_target": 0.002, "search.min_keep": 0.5})
    with pytest.raises(ConfigError, match="search.flops_target: 0.002 cannot be met"):
        run_search(config, progress=False)
    assert not (tmp_path / "bad" / CANDIDATES_FILE).exists()


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
    assert "candidates/s" in out and "uniform" in out and "final stage: " in out
    assert f"proxy: the {load_config({}).search.reward} reward vs held-out accuracy, Spearman" in out
    result = json.loads((tmp_path / "out" / "smoke" / RESULT_FILE).read_text())
    assert (tmp_path / "out" / "smoke" / "baseline.pt").exists()
    assert not real.exists()  # the smoke baseline never takes the real checkpoint's place
    assert result["cost"]["iterations"] == 2


def test_summary_reports_the_proxy_and_warns_when_a_label_free_reward_barely_tracks_accuracy():
    from entropy_search.commands.search import proxy_lines

    weak = {"candidates": 40, "entropy_reward_vs_accuracy": 0.04, "reward_vs_accuracy": 0.04}
    lines = proxy_lines(weak, "entropy")
    assert lines[0] == "proxy: the entropy reward vs held-out accuracy, Spearman +0.04 over 40 candidates (1 = same ranking)"
    assert len(lines) == 2 and lines[1].startswith("warning: on this network the entropy reward")
    # rewarded by accuracy: no proxy of its own, the paper's entropy reward for reference, no warning
    assert proxy_lines(weak, "accuracy") == ["the paper's entropy reward vs held-out accuracy: Spearman +0.04"]
    strong = {"candidates": 40, "entropy_reward_vs_accuracy": -0.2, "reward_vs_accuracy": 0.9}
    kl = proxy_lines(strong, "kl")
    assert kl == ["proxy: the kl reward vs held-out accuracy, Spearman +0.90 over 40 candidates (1 = same ranking)",
                  "the paper's entropy reward vs held-out accuracy: Spearman -0.20"]
    assert proxy_lines({"candidates": 2, "entropy_reward_vs_accuracy": None, "reward_vs_accuracy": None}, "entropy") == []


def test_summary_says_why_the_delivered_network_was_delivered():
    from entropy_search.commands.search import selection_lines

    full = {"enabled": True, "method": "full", "winner": "uniform", "rungs": [
        {"epochs": 5, "heldout_accuracy": {"uniform": 0.9267, "top1": 0.9277, "random": 0.9283},
         "p_value_vs_uniform": {"top1": 0.3735, "random": 0.2799}, "significance": 0.2}]}
    assert selection_lines(full) == [
        "final stage: held-out accuracy after the full fine-tune uniform 92.67%, top1 92.77% (p 0.37), random 92.83% "
        "(p 0.28); another finalist replaces uniform only when more accurate at p < 0.2 (selection.significance): "
        "uniform delivered"]
    halving = {"enabled": True, "method": "halving", "winner": "top1", "rungs": [
        {"steps": 30, "heldout_accuracy": {"uniform": 0.5, "top1": 0.75, "random": 0.25}, "continue": ["uniform", "top1"],
         "eliminated": ["random"]},
        {"steps": 90, "heldout_accuracy": {"uniform": 0.5, "top1": 0.8}, "continue": ["top1"], "eliminated": ["uniform"],
         "p_value_vs_uniform": {"top1": 0.01}, "significance": 0.2}]}
    assert selection_lines(halving) == [
        "final stage: successive halving on short fine-tunes; another finalist replaces uniform only when more "
        "accurate at p < 0.2 (selection.significance); top1 delivered, the only network fine-tuned in full",
        "  30 steps: held-out uniform 50.00%, top1 75.00%, random 25.00%; eliminated random",
        "  90 steps: held-out uniform 50.00%, top1 80.00% (p 0.01); eliminated uniform"]
    survivors = {**halving, "winner": "uniform", "rungs": [
        {**halving["rungs"][0]},
        {"steps": 90, "heldout_accuracy": {"uniform": 0.5, "top1": 0.8}, "continue": ["uniform", "top1"],
         "eliminated": []},
        {"steps": 400, "epochs": 3, "heldout_accuracy": {"uniform": 0.9, "top1": 0.89},
         "p_value_vs_uniform": {"top1": 0.9}, "significance": 0.2, "continue": ["uniform"], "eliminated": ["top1"]}]}
    assert selection_lines(survivors) == [
        "final stage: successive halving on short fine-tunes; another finalist replaces uniform only when more "
        "accurate at p < 0.2 (selection.significance); uniform delivered, 2 finalists fine-tuned in full",
        "  30 steps: held-out uniform 50.00%, top1 75.00%, random 25.00%; eliminated random",
        "  90 steps: held-out uniform 50.00%, top1 80.00%; eliminated -",
        "  full fine-tune (3 epochs): held-out uniform 90.00%, top1 89.00% (p 0.90); eliminated top1"]
    assert selection_lines({**halving, "scheduler": "tune-asha"})[0].startswith(
        "final stage: successive halving on short fine-tunes (Tune trials under ASHA); another finalist")
    assert selection_lines({"enabled": False, "method": "full", "winner": "top1", "rungs": []}) == [
        "final stage: off, the agent's best (top1) is delivered"]
    assert selection_lines({"enabled": True, "method": "full", "winner": "uniform", "rungs": []}) == [
        "final stage: one distinct finalist (uniform), delivered"]
    assert selection_lines(None) == [] and selection_lines({"enabled": True, "winner": None, "rungs": []}) == []
    before_the_paired_test = {"enabled": True, "method": "full", "winner": "random", "rungs": [
        {"epochs": 5, "heldout_accuracy": {"uniform": 0.929, "random": 0.9305}}]}
    assert selection_lines(before_the_paired_test) == [
        "final stage: held-out accuracy after the full fine-tune uniform 92.90%, random 93.05%: random delivered"]


# ---------------------------------------------------------------- after the agent, without Ray


def hand_made_state(problem, entropies, accuracies, rewards):
    """A search state holding one distinct candidate per given (entropy, accuracy, reward), in that order."""
    from entropy_search.rl import SearchState

    state = SearchState(top_k_size=problem.config.search.top_k)
    full = [g.channels for g in problem.space.groups]
    for i, (entropy, accuracy, reward) in enumerate(zip(entropies, accuracies, rewards, strict=True)):
        record, _ = problem.evaluate([max(1, c - i) for c in full])
        state.add({**record, "entropy": entropy, "accuracy": accuracy, "reward": reward, "cache_hit": False})
    state.iteration, state.wall_seconds = 1, 2.0
    return state


def test_result_proxy_is_the_rank_correlation_of_the_candidates(checkpoint, tmp_path):
    """Entropies 1 < 2 < 3 < 4 against accuracies 0.9, 0.8, 0.6, 0.7: minus the entropy ranks the candidates
    4, 3, 2, 1 and accuracy 4, 3, 1, 2, so Spearman's rho = 1 - 6 * (0 + 0 + 1 + 1) / (4 * (16 - 1)) = 0.8; the
    search's reward here is the accuracy itself (rho = 1)."""
    from entropy_search.finalists import policy_of
    from entropy_search.problem import setup
    from entropy_search.search import finish_search

    config = small_config(tmp_path / "finish", checkpoint, **{"baselines.enabled": False, "finetune.epochs": 0,
                                                             "selection.enabled": False})
    problem = setup(config)
    accuracies = [0.9, 0.8, 0.6, 0.7]
    state = hand_made_state(problem, [1.0, 2.0, 3.0, 4.0], accuracies, accuracies)
    result = finish_search(config, problem, state, progress=False)
    assert result["proxy"] == {"candidates": 4, "entropy_reward_vs_accuracy": pytest.approx(0.8),
                               "reward_vs_accuracy": pytest.approx(1.0)}
    # the top-k by reward, finalised; the best exported and its policy named by group
    assert [t["rank"] for t in result["top_k"]] == [1, 2] and [t["reward"] for t in result["top_k"]] == [0.9, 0.8]
    best = state.best
    assert result["agent"]["kept_channels"] == best["kept_channels"] and result["agent"]["heldout_accuracy"] == 0.9
    assert result["agent_policy"] == policy_of(problem.space, best)
    assert list(result["agent_policy"]) == [g.name for g in problem.space.groups]
    assert result["agent"]["analytic_macs_match"]
    # without the final stage the agent's pick is delivered (and exported)
    assert result["selection"]["winner"] == "top1" and result["selection"]["rungs"] == []
    assert result["delivered"] == result["agent"] and result["policy"] == result["agent_policy"]
    assert result["files"]["pytorch"] == str(tmp_path / "finish" / "best_pruned.pt")
    agent = {"reward": 0.9, "macs_ratio": best["macs_ratio"], "heldout_accuracy": 0.9,
             "test_accuracy_after_finetune": result["agent"]["test_accuracy_after_finetune"]}
    assert result["baselines"] == {} and result["comparison"] == {"delivered": {**agent, "label": "top1"},
                                                                  "agent": agent}
    assert result["cost"]["iterations"] == 1 and result["cost"]["evaluations"] == 4
    assert json.loads((tmp_path / "finish" / RESULT_FILE).read_text())["proxy"] == result["proxy"]


def test_finish_search_runs_the_baselines_under_the_same_budget(checkpoint, tmp_path):
    from entropy_search.problem import setup
    from entropy_search.search import finish_search

    config = small_config(tmp_path / "baselines", checkpoint, **{
        "baselines.random_candidates": 3, "baselines.finetune": True, "finetune.epochs": 0, "search.top_k": 1,
        "selection.rung_steps": 2})
    problem = setup(config)
    state = hand_made_state(problem, [1.0, 2.0, 3.0], [0.5, 0.6, 0.7], [-1.0, -2.0, -3.0])
    result = finish_search(config, problem, state, progress=False)
    uniform, random_ = result["baselines"]["uniform"], result["baselines"]["random"]
    assert uniform["evaluations"] == 1 and random_["evaluations"] == 3
    # Torch-Pruning's recipes too, under the same budget, fine-tuned like the others (tests/test_peers.py checks
    # each is Torch-Pruning's own network)
    assert list(result["baselines"]) == ["uniform", "random", *PEER_RECIPES]
    for name, res in result["baselines"].items():
        assert res["best"]["macs_ratio"] <= 0.5 + 1e-12
        assert res["final"]["kept_channels"] == res["best"]["kept_channels"]
        assert res["final"]["analytic_macs_match"]
        assert result["comparison"][name]["test_accuracy_after_finetune"] == res["final"]["test_accuracy_after_finetune"]
        if name in PEER_RECIPES:
            assert res["best"]["ranking"] == res["final"]["ranking"] == name
    assert result["base"]["macs"] == problem.space.base_macs == result["base"]["counted_macs"]
    # the final stage chose among the agent's best and the baselines' bests, and that one was delivered
    selection = result["selection"]
    assert selection["finalists"][0] == "uniform"
    assert set(selection["finalists"]) <= {"top1", "random", "uniform", *PEER_RECIPES}
    assert selection["winner"] in selection["finalists"] and result["delivered"]["label"] == selection["winner"]
    # by default the finalists are judged by held-out correctness after their full fine-tune: uniform pruning
    # unless another finalist is more accurate with a significant paired test
    rung = selection["rungs"][0]
    scores, p_values = rung["heldout_accuracy"], rung["p_value_vs_uniform"]
    assert selection["method"] == "full" and set(scores) == set(selection["finalists"])
    assert set(p_values) == set(selection["finalists"]) - {"uniform"}
    beating = [lb for lb in p_values if scores[lb] > scores["uniform"] and p_values[lb] < rung["significance"]]
    expected = max(beating, key=lambda lb: scores[lb]) if beating else "uniform"
    assert selection["winner"] == expected
    assert result["delivered"]["heldout_accuracy_after_finetune"] == scores[expected]
    # measured CPU latency of the unpruned, uniform and delivered networks, next to their MAC ratios
    latency = result["latency"]
    assert set(latency["networks"]) == {selection["winner"], "uniform"}
    for row in latency["networks"].values():
        assert set(row["speedup"]) == {"1", "32"} and all(v > 0 for v in row["speedup"].values())
        assert 0 < row["macs_ratio"] <= 1.0


def test_finish_search_without_candidates_says_what_to_change(checkpoint, tmp_path):
    from entropy_search.problem import setup
    from entropy_search.rl import SearchState
    from entropy_search.search import finish_search

    config = small_config(tmp_path / "empty", checkpoint)
    with pytest.raises(EntropySearchError, match="evaluated no candidate.*stop.iterations"):
        finish_search(config, setup(config), SearchState(), progress=False)


@pytest.mark.slow
def test_search_under_a_latency_budget(ray_local, checkpoint, tmp_path):
    """`search.budget: latency`: the driver measures the latency table before Ray starts, the env runners read it
    from the cache, every candidate is within the predicted budget, and result.json checks the delivered network."""
    from entropy_search.problem import MacsForm, PruningSpace, load_model
    from entropy_search.problem.latency_table import LatencyTable
    from entropy_search.search import run_search

    cache = tmp_path / "tables"
    config = small_config(tmp_path / "out", checkpoint, **{
        "search.budget": "latency", "search.latency_target": 0.7, "search.latency_batch": 8, "search.round_to": 8,
        "search.latency_cache": str(cache), "search.latency_statistic": "min", "stop.iterations": 2,
        "search.top_k": 1, "baselines.finetune": False, "output.latency_batch_sizes": [1, 8]})
    result = run_search(config, progress=False)
    (table_file,) = cache.glob("*.json")
    data = json.loads(table_file.read_text())
    space = PruningSpace(load_model(checkpoint), torch.zeros(1, 1, 8, 8), round_to=8)
    table = LatencyTable(data, MacsForm(space), next(iter(data["tables"])))
    target = 0.7 * table.base
    candidates = read_candidates(tmp_path / "out")
    assert candidates and all(table(c["kept_channels"]) <= target * (1 + 1e-9) for c in candidates)
    check = result["latency"]["budget"]
    assert check["target_ms"] == pytest.approx(target) and check["predicted_ms"] <= target * (1 + 1e-9)
    assert check["measured_ms"] > 0 and 0 < check["measured_ratio"] < 1.5 and check["table"] == str(table_file)


def test_a_search_chooses_depth_on_resnet20(ray_local, tmp_path):
    """ResNet-20 on digits (about 15 s on 2 cores): the agent, random search and the candidates choose which residual
    blocks to keep; the delivered network is rebuilt from best_pruned.pt without its dropped blocks and computes
    what the search fine-tuned."""
    from entropy_search.problem import load_model, train_baseline
    from entropy_search.search import run_search

    threads = torch.get_num_threads()
    try:
        checkpoint, _ = train_baseline(tmp_path / "resnet20.pt", model="resnet20", data="digits", epochs=1,
                                       device="cpu", threads=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "depth"
    config = small_config(out, checkpoint, **{"model.name": "resnet20", "search.flops_target": 0.3, "selection.enabled": False,
                                              "baselines.peers": [], "baselines.finetune": False,
                                              "stop.iterations": 2})
    result = run_search(config, progress=False)
    candidates = read_candidates(out)
    blocks = ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]
    assert all(set(c["dropped_blocks"]) <= set(blocks) and c["blocks_kept"] == 7 - len(c["dropped_blocks"])
               for c in candidates)
    assert len({c["blocks_kept"] for c in candidates}) > 2, "candidates of several depths"
    assert all(c["macs_ratio"] <= 0.3 + 1e-12 for c in candidates)
    assert result["baselines"]["random"]["best"]["blocks_kept"] is not None
    shallow = result["baselines"]["uniform_shallow"]["best"]
    assert shallow["dropped_blocks"] == ["layer1.2", "layer2.2"] and shallow["macs_ratio"] <= 0.3 + 1e-12
    assert result["baselines"]["uniform"]["best"]["dropped_blocks"] == []
    delivered = result["delivered"]
    assert delivered["label"] == "top1" and delivered["dropped_blocks"], "the agent's pick drops blocks"
    assert delivered["analytic_macs_match"] and delivered["blocks_kept"] == 7 - len(delivered["dropped_blocks"])
    ckpt = load_checkpoint(out / "best_pruned.pt")
    assert ckpt.dropped == delivered["dropped_blocks"] and ckpt.keep == delivered["keep"]
    model = load_model(out / "best_pruned.pt")
    modules = dict(model.named_modules())
    assert all(isinstance(modules[name], torch.nn.Identity) for name in delivered["dropped_blocks"])
    assert not any(k.startswith(tuple(f"{name}." for name in delivered["dropped_blocks"])) for k in ckpt.state_dict)
    from entropy_search.problem import count_macs

    assert count_macs(model, ckpt.example_input()) == delivered["macs"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_that_is_not_here_is_one_line_naming_the_key(tmp_path, capsys):
    """`search.device: cuda` on a machine without CUDA: one line naming the key, exit 2, before anything is written
    (it was a PyTorch traceback from inside the set-up). Under a second."""
    from entropy_search.cli import main

    config = tmp_path / "cuda.yaml"
    config.write_text(f"search:\n  device: cuda\noutput:\n  dir: {tmp_path / 'run'}\n")
    assert main(["search", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("entropy-search search: error: search.device: 'cuda' asked for, but CUDA is not available here; "
                   "use cpu or auto")
    assert not (tmp_path / "run").exists()

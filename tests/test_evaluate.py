"""Evaluating a candidate (`entropy_search.problem.evaluate`): the same measurements whichever path evaluates
it (sliced, masked, pruned), the simulated evaluator of the benchmarks, and the cache every evaluation goes
through."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import torch

from entropy_search import PruningSpace, count_macs, create_model
from entropy_search.errors import EntropySearchError
from entropy_search.problem.evaluate import (
    EPISODE_KEYS,
    CandidateCache,
    CandidateEvaluator,
    SimulatedEvaluator,
    cache_entry,
)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    space = PruningSpace(model, torch.randn(1, 3, 32, 32))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    return space, x, y


@pytest.mark.parametrize("layers", ["bn", "bn_relu", "last_stage"])
def test_exact_entropy_and_accuracy_agree_across_paths(setup, layers):
    space, x, y = setup
    rng = random.Random(layers)
    keep = [rng.uniform(0.2, 1.0) for _ in space.groups]
    results = {mode: CandidateEvaluator(space, x, y, mode=mode, sample=1.0, entropy_layers=layers).evaluate(keep)
               for mode in ("sliced", "masked", "pruned")}
    ref = results["pruned"]
    for r in results.values():
        assert r["entropy"] == pytest.approx(ref["entropy"], rel=1e-5)
        assert r["accuracy"] == ref["accuracy"]
        assert r["macs"] == ref["macs"] == count_macs(space.prune(keep), space.example_input)
        assert r["kept_channels"] == space.kept_channels(keep)
        assert 0 < r["macs_ratio"] < 1 and 0 < r["params_ratio"] < 1


@pytest.mark.parametrize("name", ["user_models:dense_grouped_net", "tv:densenet121", "tv:regnet_y_400mf",
                                  "tv:convnext_tiny"])
def test_every_path_agrees_on_concatenating_grouped_and_layer_norm_models(name, one_thread):
    """Entropy (all BN outputs), accuracy and the reference rewards, with adaptive BN, on a concatenation
    (DenseNet), grouped convolutions (RegNet), layer norms (ConvNeXt) and a user model with both of the first."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    channels, size = (1, 8) if name.startswith("user") else (3, 32)
    space = PruningSpace(model, torch.randn(1, channels, size, size))
    x, y = torch.randn(8, channels, size, size), torch.randint(0, 10, (8,))
    calibration = torch.randn(16, channels, size, size)
    keep = [random.Random(3).uniform(0.2, 1.0) for _ in space.groups]
    # ConvNeXt has no BN: its entropy is measured at the depthwise convs' outputs (spatial maps, channels first)
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1] \
        if "convnext" in name else "bn"
    results = {mode: CandidateEvaluator(space, x, y, mode=mode, sample=1.0, entropy_layers=layers,
                                        calibration=calibration).evaluate(keep)
               for mode in ("sliced", "masked", "pruned")}
    ref = results["pruned"]
    for r in results.values():
        assert r["entropy"] == pytest.approx(ref["entropy"], rel=1e-5, abs=1e-6)
        assert r["accuracy"] == ref["accuracy"] and r["macs"] == ref["macs"]
        assert r["kl"] == pytest.approx(ref["kl"], rel=1e-4, abs=1e-6)


def test_a_candidate_with_non_finite_outputs_is_measured_as_a_network_that_computes_nothing(one_thread):
    """NaN or inf activations get defined measurements (accuracy 0, the KL of a uniform softmax, feature error 1,
    the most entropy the estimator allows) and `nonfinite` says why: every reward ranks the candidate last."""
    from entropy_search.problem.rewards import compute_reward

    torch.manual_seed(0)
    space = PruningSpace(create_model("user_models:nan_when_narrow").eval(), torch.randn(1, 1, 8, 8))
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    evaluator = CandidateEvaluator(space, x, y, mode="sliced", sample=1.0)
    broken = evaluator.evaluate([1.0, 0.3])  # 2 channels in the middle: log(-1)
    healthy = evaluator.evaluate([1.0, 0.5])  # 4 channels: finite
    assert broken["nonfinite"] == "outputs" and "nonfinite" not in healthy
    p0 = evaluator.reference_log_probs.exp()
    uniform_kl = float((p0 * (evaluator.reference_log_probs + np.log(10))).sum(1).mean())
    assert broken["accuracy"] == 0.0 and broken["feature_error"] == 1.0 and broken["agreement"] == 0.0
    assert broken["kl"] == pytest.approx(uniform_kl, rel=1e-5)
    assert broken["entropy"] == pytest.approx(2 * np.log(16)) and broken["entropy_normalized"] == 1.0
    for reward in ("entropy", "kl", "feature", "accuracy"):
        assert compute_reward(reward, broken) <= compute_reward(reward, healthy), reward


def test_sampled_entropy_is_the_same_for_sliced_and_pruned(setup):
    space, x, y = setup
    keep = [0.5] * len(space.groups)
    sliced = CandidateEvaluator(space, x, y, mode="sliced").evaluate(keep)
    pruned = CandidateEvaluator(space, x, y, mode="pruned").evaluate(keep)
    assert sliced["entropy"] == pytest.approx(pruned["entropy"], rel=1e-6)


def test_without_labels_accuracy_is_none(setup):
    space, x, _ = setup
    result = CandidateEvaluator(space, x).evaluate([1.0] * len(space.groups))
    assert result["accuracy"] is None and result["macs_ratio"] == 1.0 and result["entropy"] > 0


def test_evaluating_leaves_the_model_untouched(setup):
    space, x, y = setup
    with torch.no_grad():
        before = space.model(x)
    CandidateEvaluator(space, x, y).evaluate([0.3] * len(space.groups))
    with torch.no_grad():
        assert torch.equal(space.model(x), before)


def test_bad_batches_are_clear_errors(setup):
    space, x, y = setup
    with pytest.raises(EntropySearchError, match="does not match"):
        CandidateEvaluator(space, torch.randn(4, 1, 32, 32))
    with pytest.raises(EntropySearchError, match="labels"):
        CandidateEvaluator(space, x, y[:3])
    with pytest.raises(EntropySearchError, match="evaluation mode"):
        CandidateEvaluator(space, x, mode="surgery")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["sliced", "masked", "pruned"])
def test_cuda_evaluation_matches_the_cpu(mode):
    """Candidates evaluated where a GPU worker holds the network measure what the CPU measures."""
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    keep = [random.Random(3).uniform(0.2, 1.0) for _ in range(len(PruningSpace(model, x[:1]).groups))]
    # the same maps on both (unset, the CPU samples a quarter of them and CUDA measures all)
    cpu = CandidateEvaluator(PruningSpace(model, x[:1]), x, y, mode=mode, sample=1.0).evaluate(keep)
    model.cuda()
    try:
        gpu = CandidateEvaluator(PruningSpace(model, x[:1].cuda()), x, y, mode=mode, sample=1.0).evaluate(keep)
    finally:
        model.cpu()
    assert gpu["entropy"] == pytest.approx(cpu["entropy"], abs=1e-3)
    assert gpu["macs"] == cpu["macs"] and gpu["kept_channels"] == cpu["kept_channels"]
    assert abs(gpu["accuracy"] - cpu["accuracy"]) <= 1 / 32
    model.cuda()
    try:
        assert CandidateEvaluator(PruningSpace(model, x[:1].cuda()), x, y).mode == "masked", "auto on CUDA"
    finally:
        model.cpu()


def test_auto_mode_picks_the_faster_path_of_the_device(setup):
    space, x, y = setup
    assert CandidateEvaluator(space, x, y).mode == "sliced"  # on the CPU
    assert CandidateEvaluator(space, x, y, mode="masked").mode == "masked"
    with pytest.raises(EntropySearchError, match="unknown evaluation mode"):
        CandidateEvaluator(space, x, y, mode="fast")


# ---------------------------------------------------------------- the one evaluation with its cache


@pytest.fixture(scope="module")
def digits_space():
    torch.manual_seed(0)
    return PruningSpace(create_model("digits_cnn").eval(), torch.randn(1, 1, 8, 8))


def test_cache_evaluates_each_candidate_once_with_its_reward(digits_space):
    space = digits_space
    x = torch.randn(32, 1, 8, 8)
    cache = CandidateCache(space, CandidateEvaluator(space, x, sample=1.0), "entropy")
    counts = [max(1, g.channels // 2) for g in space.groups]
    record, hit = cache.evaluate(counts)
    assert not hit and record["kept_channels"] == counts
    assert record["keep"] == [c / g.channels for c, g in zip(counts, space.groups)]
    assert record["reward"] == pytest.approx(-record["entropy"]) and record["accuracy"] is None
    assert json.loads(json.dumps(record)) == record  # plain JSON values only
    again, hit = cache.evaluate(tuple(np.int64(c) for c in counts))  # numpy counts are the same key
    assert hit and again == record
    again["reward"] = 99.0  # callers get copies: the cache is not theirs to change
    assert cache.evaluate(counts)[0]["reward"] == record["reward"]
    assert cache.stats["evaluations"] == 1 and cache.stats["cache_hits"] == 2 and len(cache) == 1
    assert cache.stats["eval_seconds"] == pytest.approx(record["eval_seconds"])


def test_disabled_cache_evaluates_every_time(digits_space):
    cache = CandidateCache(digits_space, SimulatedEvaluator(digits_space, 0.0), "accuracy", enabled=False)
    counts = [g.channels for g in digits_space.groups]
    first, hit1 = cache.evaluate(counts)
    second, hit2 = cache.evaluate(counts)
    assert not hit1 and not hit2 and len(cache) == 0 and cache.stats["evaluations"] == 2
    assert first["reward"] == pytest.approx(first["accuracy"])


def test_candidates_from_elsewhere_join_the_cache_without_their_episode(digits_space):
    cache = CandidateCache(digits_space, SimulatedEvaluator(digits_space, 0.0), "entropy")
    counts = [1] * len(digits_space.groups)
    mine, _ = cache.evaluate(counts)
    theirs = {"kept_channels": [2] * len(counts), "reward": 5.0, "entropy": -5.0, "cache_hit": True, "worker": 7,
              "actions": [0.1] * len(counts), "desired_keep": [0.2] * len(counts), "iteration": 3, "id": 12}
    assert cache.add([theirs, dict(mine, reward=123.0)]) == 1  # a known candidate is not replaced
    assert cache.evaluate(counts)[0]["reward"] == mine["reward"]
    record, hit = cache.evaluate([2] * len(counts))
    assert hit and record == {"kept_channels": [2] * len(counts), "reward": 5.0, "entropy": -5.0}
    assert cache_entry(theirs) == record
    assert set(EPISODE_KEYS) >= {"cache_hit", "worker", "actions", "desired_keep", "iteration", "id"}


def test_simulated_evaluator_sleeps_and_measures_the_candidates_arithmetic(digits_space):
    space = digits_space
    keep = [0.5] * len(space.groups)
    t0 = time.perf_counter()
    record = SimulatedEvaluator(space, 0.05).evaluate(keep)
    assert time.perf_counter() - t0 >= 0.05 and record["eval_seconds"] >= 0.05
    assert record["simulated"] is True and record["kept_channels"] == space.kept_channels(keep)
    assert record["macs"] == space.macs(keep) and record["params"] == space.params(keep)
    assert record["macs_ratio"] == pytest.approx(record["macs"] / space.base_macs)
    full = SimulatedEvaluator(space, 0.0).evaluate([1.0] * len(space.groups))
    assert full["accuracy"] > record["accuracy"]  # smooth: more channels, higher synthetic accuracy
    with pytest.raises(EntropySearchError, match="keep ratios"):
        SimulatedEvaluator(space, 0.0).evaluate([0.5])

"""A candidate's measurements are the same whichever path evaluates it (sliced, masked, pruned)."""

from __future__ import annotations

import random

import pytest
import torch

from entropy_search import PruningSpace, count_macs, create_model
from entropy_search.errors import EntropySearchError
from entropy_search.evaluate import CandidateEvaluator


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

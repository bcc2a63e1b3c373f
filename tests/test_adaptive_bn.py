"""Adaptive BN: a candidate's BN statistics re-estimated on training images, with the base model untouched."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from entropy_search import PruningSpace, create_model
from entropy_search.data import eval_batch, load_data
from entropy_search.problem.adaptive_bn import recalibrate_batchnorm, recalibrated_batchnorm
from entropy_search.problem.checkpoint import build_model, load_checkpoint
from entropy_search.problem.evaluate import CandidateEvaluator


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_statistics_are_the_exact_mean_and_variance_of_the_calibration_images():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    x = torch.randn(40, 3, 32, 32) * 2 + 1
    recalibrate_batchnorm(model, x, chunk_size=40)
    with torch.no_grad():
        inputs = model.conv1(x)  # what the first BN normalises
    assert torch.allclose(model.bn1.running_mean, inputs.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(model.bn1.running_var, inputs.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert not model.training and model.bn1.momentum == 0.1, "eval mode and the momentum are restored"


def test_chunks_average_to_the_same_statistics_within_the_chunking():
    torch.manual_seed(0)
    a, b = create_model("resnet20").eval(), create_model("resnet20").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(64, 3, 32, 32)
    recalibrate_batchnorm(a, x, chunk_size=64)
    recalibrate_batchnorm(b, x, chunk_size=16)
    # the first BN sees the same inputs either way: its mean is a plain average of the chunks' means
    assert torch.allclose(a.bn1.running_mean, b.bn1.running_mean, atol=1e-5)


def test_context_restores_the_very_tensors():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    before = _state(model)
    tensors = [id(t) for t in model.buffers()]
    x = torch.randn(8, 3, 32, 32)
    reference = model(x)
    with torch.no_grad(), recalibrated_batchnorm(model, torch.randn(32, 3, 32, 32) * 3) as m:
        assert not torch.allclose(m(x), reference)
    assert [id(t) for t in model.buffers()] == tensors
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x), reference)
    with recalibrated_batchnorm(model, None) as same:
        assert same is model


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2", "vgg16_bn"])
def test_calibrated_candidates_agree_across_paths_and_leave_the_model_untouched(name):
    """Sliced, masked and pruned candidates re-estimate the same statistics, so they measure the same."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    space = PruningSpace(model, torch.randn(1, 3, 32, 32))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    calibration = torch.randn(48, 3, 32, 32)
    rng = random.Random(name)
    keep = [rng.uniform(0.2, 1.0) for _ in space.groups]
    before = _state(model)
    results = {mode: CandidateEvaluator(space, x, y, mode=mode, sample=1.0, calibration=calibration).evaluate(keep)
               for mode in ("sliced", "masked", "pruned")}
    uncalibrated = CandidateEvaluator(space, x, y, mode="sliced", sample=1.0).evaluate(keep)
    ref = results["pruned"]
    for r in results.values():
        assert r["entropy"] == pytest.approx(ref["entropy"], rel=1e-4)
        assert r["accuracy"] == ref["accuracy"]
    assert ref["entropy"] != pytest.approx(uncalibrated["entropy"], rel=1e-4), "calibration changes the measurement"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the base model is untouched"


def test_calibration_makes_held_out_accuracy_of_pruned_candidates_meaningful(tmp_path, train_digits_checkpoint):
    """A trained digits CNN pruned to half its channels: the baseline's BN statistics wreck its accuracy,
    statistics re-estimated on 256 training images recover most of it (no training involved)."""
    ckpt = train_digits_checkpoint(tmp_path / "digits.pt", epochs=15)
    model = build_model(load_checkpoint(ckpt)).eval()
    splits = load_data("digits", seed=0)
    x, y = eval_batch(splits, 300, split="heldout")
    calibration, _ = eval_batch(splits, 256, split="train")
    space = PruningSpace(model, x[:1])
    keep = [0.4] * len(space.groups)
    plain = CandidateEvaluator(space, x, y).evaluate(keep)["accuracy"]
    calibrated = CandidateEvaluator(space, x, y, calibration=calibration).evaluate(keep)["accuracy"]
    full = CandidateEvaluator(space, x, y, calibration=calibration).evaluate([1.0] * len(space.groups))["accuracy"]
    assert calibrated > plain + 0.1
    assert full > 0.9, "re-estimating the full network's statistics keeps it accurate"

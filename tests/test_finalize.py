"""Finalising a candidate (`entropy_search.problem.finalize`): physical pruning checked against the analytic
MACs, adaptive BN on the search's images, test accuracy before and after fine-tuning, and the export."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from entropy_search.config import FinetuneConfig
from entropy_search.data import eval_batch, load_data
from entropy_search.problem import (
    PruningSpace,
    build_model,
    count_macs,
    count_params,
    export,
    finalize,
    load_checkpoint,
    recalibrate_batchnorm,
)
from entropy_search.train import evaluate


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory, train_digits_checkpoint):
    return train_digits_checkpoint(tmp_path_factory.mktemp("ckpt") / "digits.pt", epochs=3)


@pytest.fixture(scope="module")
def problem(digits_checkpoint):
    """A briefly trained digits CNN, its space and data."""
    model = build_model(load_checkpoint(digits_checkpoint))
    splits = load_data("digits", seed=0)
    return PruningSpace(model, torch.zeros(1, 1, 8, 8)), splits


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_without_fine_tuning_the_pruned_network_is_measured_as_it_is(problem):
    space, splits = problem
    keep = [0.5, 0.4, 0.75, 1.0]
    before = _state(space.model)
    measured, pruned = finalize(space, splits, keep, finetune=FinetuneConfig(epochs=0), calibration=None, seed=0,
                                device="cpu", progress=False)
    assert measured["kept_channels"] == space.kept_channels(keep) and measured["keep"] == keep
    assert measured["macs"] == count_macs(pruned, space.example_input) == measured["analytic_macs"]
    assert measured["analytic_macs_match"] and measured["macs"] == space.macs(keep)
    assert measured["params"] == count_params(pruned) == space.params(keep)
    assert measured["macs_ratio"] == pytest.approx(measured["macs"] / space.base_macs)
    assert measured["params_ratio"] == pytest.approx(measured["params"] / space.base_params)
    assert measured["finetune_epochs"] == 0 and measured["finetune_history"] == []
    assert measured["test_accuracy_after_finetune"] == measured["test_accuracy_before_finetune"]
    assert measured["test_accuracy_before_finetune"] == pytest.approx(evaluate(pruned, splits.test, device="cpu"))
    assert not pruned.training and next(pruned.parameters()).device.type == "cpu"
    assert all(torch.equal(v, before[k]) for k, v in space.model.state_dict().items()), "the baseline is untouched"


def test_calibration_images_give_the_pruned_network_its_own_bn_statistics(problem):
    space, splits = problem
    keep = [0.4] * len(space.groups)
    calibration, _ = eval_batch(splits, 128, split="train")
    _, calibrated = finalize(space, splits, keep, finetune=FinetuneConfig(epochs=0), calibration=calibration, seed=0,
                             device="cpu", progress=False)
    _, plain = finalize(space, splits, keep, finetune=FinetuneConfig(epochs=0), calibration=None, seed=0,
                        device="cpu", progress=False)
    expected = recalibrate_batchnorm(space.prune(keep), calibration)
    for (name, got), (_, want), (_, old) in zip(calibrated.state_dict().items(), expected.state_dict().items(),
                                                plain.state_dict().items(), strict=True):
        torch.testing.assert_close(got, want, msg=name)
        if name.endswith("running_mean"):
            assert not torch.allclose(got, old), name


def test_fine_tuning_is_tested_again_and_seeded(problem):
    space, splits = problem
    keep = [0.5] * len(space.groups)
    runs = [finalize(space, splits, keep, finetune=FinetuneConfig(epochs=1, lr=0.01, batch_size=64), calibration=None,
                     seed=3, device="cpu", progress=False) for _ in range(2)]
    (measured, pruned), (again, _) = runs
    assert measured["finetune_epochs"] == 1 and len(measured["finetune_history"]) == 1
    assert measured["finetune_history"][0]["lr"] == pytest.approx(0.01)
    assert measured["test_accuracy_after_finetune"] == pytest.approx(evaluate(pruned, splits.test, device="cpu"))
    assert again["test_accuracy_after_finetune"] == measured["test_accuracy_after_finetune"]
    assert again["finetune_history"][0]["loss"] == measured["finetune_history"][0]["loss"]


def test_export_writes_a_safely_loadable_network_and_onnx(problem, digits_checkpoint, tmp_path):
    """The delivered network is data (model name, keep ratios, weights): it opens with torch.load's default
    weights_only=True, and `load_model` rebuilds it, in a fresh process, computing what the pruned network did."""
    space, _ = problem
    keep = [0.5, 0.4, 0.75, 1.0]
    pruned = space.prune(keep).eval()
    base = load_checkpoint(digits_checkpoint)
    files = export(pruned, space.example_input, tmp_path / "out", "best", onnx=False, base=base, keep=keep, round_to=1)
    assert files == {"pytorch": str(tmp_path / "out" / "best.pt")}
    x = torch.randn(5, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    torch.save(pruned(x).detach(), tmp_path / "y.pt")
    code = ("import sys, torch; from entropy_search import load_model; "
            "payload = torch.load(sys.argv[1]); assert payload['keep'] == [0.5, 0.4, 0.75, 1.0]; "
            "model = load_model(sys.argv[1]); x = torch.load(sys.argv[2]); "
            "torch.testing.assert_close(model(x), torch.load(sys.argv[3])); print('same outputs')")
    done = subprocess.run([sys.executable, "-c", code, files["pytorch"], str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "same outputs" in done.stdout, done.stderr[-2000:]
    pytest.importorskip("onnx")
    files = export(pruned, space.example_input, tmp_path / "out", "best", onnx=True, base=base, keep=keep, round_to=1)
    assert files["onnx"] == str(tmp_path / "out" / "best.onnx") and (tmp_path / "out" / "best.onnx").stat().st_size > 0


def test_failed_onnx_export_is_recorded_and_the_module_kept(problem, digits_checkpoint, tmp_path, monkeypatch):
    space, _ = problem
    keep = [0.5] * len(space.groups)
    pruned = space.prune(keep).eval()

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", broken)
    files = export(pruned, space.example_input, tmp_path, "best", onnx=True, base=load_checkpoint(digits_checkpoint),
                   keep=keep, round_to=1)
    assert files["onnx_error"] == "unsupported operator" and "onnx" not in files
    assert (tmp_path / "best.pt").is_file()

"""Torch-Pruning's own recipes as baselines (`entropy_search.problem.peers`): each recipe's baseline is the
network Torch-Pruning's `MetaPruner` makes when run directly (here, by the test itself) at the same ratio on the
same network: the same weights in every layer (so the same kept channels, in the same order) and the same outputs;
its MACs, counted on that network, within 3% below the target. On the digits CNN and on ResNet-20 (residual
channel groups), for every recipe of the registry. About 20 s on 2 cores."""

from __future__ import annotations

import copy
from typing import get_args

import pytest
import torch
import torch_pruning as tp

from entropy_search.config import BaselinesConfig, load_config
from entropy_search.data import eval_batch
from entropy_search.errors import EntropySearchError
from entropy_search.models import create_model
from entropy_search.problem import (
    PEER_RECIPES,
    count_macs,
    export,
    load_model,
    peer_baseline,
    save_checkpoint,
    setup,
)
from entropy_search.problem.budget import Budget


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def networks(tmp_path_factory, train_digits_checkpoint) -> dict:
    """The trained digits CNN, and a ResNet-20 (seeded weights) for digits' 8x8 images."""
    root = tmp_path_factory.mktemp("peers")
    torch.manual_seed(0)
    resnet = save_checkpoint(root / "resnet20.pt", create_model("resnet20", num_classes=10, in_channels=1),
                             model_name="resnet20", num_classes=10, in_channels=1, image_size=8, data="digits",
                             config={"seed": 0, "heldout_fraction": 0.1})
    return {"digits_cnn": train_digits_checkpoint(root / "digits_cnn.pt", epochs=3), "resnet20": resnet}


def problem_of(checkpoint, model: str, target: float, tmp_path):
    return setup(load_config({"model": {"checkpoint": str(checkpoint), "name": model},
                              "search": {"flops_target": target}, "data": {"eval_batch": 128},
                              "output": {"dir": str(tmp_path / "out")}}))


def direct_run(model: torch.nn.Module, example: torch.Tensor, name: str, ratio: float, batch) -> torch.nn.Module:
    """Torch-Pruning used as its documentation shows, without entropy-search: the recipe at `ratio`."""
    model = copy.deepcopy(model).eval()
    importance = {"tp_magnitude": tp.importance.GroupMagnitudeImportance(p=1),
                  "tp_taylor": tp.importance.GroupTaylorImportance(),
                  "tp_isomorphic": tp.importance.GroupMagnitudeImportance(p=1)}[name]
    if name == "tp_taylor":
        torch.nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, example, importance=importance, global_pruning=True, pruning_ratio=ratio,
                                  ignored_layers=[classifier], isomorphic=name == "tp_isomorphic")
    pruner.step()
    return model


def test_the_config_names_every_recipe_of_the_registry():
    names = get_args(get_args(BaselinesConfig.model_fields["peers"].annotation)[0])
    assert set(names) == set(PEER_RECIPES) and BaselinesConfig().peers == list(PEER_RECIPES)


@pytest.mark.parametrize("model, target", [("digits_cnn", 0.5), ("digits_cnn", 0.3), ("resnet20", 0.3)])
@pytest.mark.parametrize("name", list(PEER_RECIPES))
def test_each_recipe_is_torch_prunings_own_network_within_the_budget(networks, tmp_path, model, target, name):
    problem = problem_of(networks[model], model, target, tmp_path)
    batch = eval_batch(problem.splits, 128, split="train", seed=0)
    result = peer_baseline(problem.space, problem.budget, name, lambda c, r: problem.evaluate(c, r)[0], batch)
    record = result["best"]
    assert record["recipe"] == record["ranking"] == name and result["evaluations"] == 1

    theirs = direct_run(problem.model, problem.space.example_input, name, result["pruning_ratio"], batch)
    ours = problem.space.prune(record["keep"], ranking=name)
    assert problem.space.counts_of(theirs) == record["kept_channels"]
    mine, other = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == other.keys() and all(torch.equal(mine[k], other[k]) for k in mine)  # the same channels
    x = batch[0][:32]
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    macs = count_macs(theirs, problem.space.example_input)
    assert macs == record["macs"]  # the analytic count is the counter's
    ratio = macs / problem.space.base_macs
    assert ratio <= target + 1e-12
    assert record["within_tolerance"] == (ratio >= 0.97 * target)
    if name != "tp_isomorphic":  # isomorphic pruning prunes whole structures at once: its MACs move in steps
        assert record["within_tolerance"], (name, model, target, ratio)


def test_a_budget_no_ratio_meets_is_an_error(networks, tmp_path):
    problem = problem_of(networks["digits_cnn"], "digits_cnn", 0.5, tmp_path)
    budget = Budget(problem.space, 0.0001, min_keep=0.0)  # fewer MACs than one channel per group leaves
    with pytest.raises(EntropySearchError, match="tp_magnitude: no pruning ratio"):
        peer_baseline(problem.space, budget, "tp_magnitude", lambda c, r: problem.evaluate(c, r)[0], steps=8)


def test_a_recipes_network_is_exported_and_loads_as_itself(networks, tmp_path):
    """The delivered file of a recipe's network: the keep ratios rebuild its architecture, its weights are the
    recipe's channels, so the loaded network computes what Torch-Pruning's network computes."""
    problem = problem_of(networks["resnet20"], "resnet20", 0.3, tmp_path)
    batch = eval_batch(problem.splits, 64, split="train", seed=0)
    record = peer_baseline(problem.space, problem.budget, "tp_taylor", lambda c, r: problem.evaluate(c, r)[0],
                           batch)["best"]
    ours = problem.space.prune(record["keep"], ranking="tp_taylor").eval()
    files = export(ours, problem.space.example_input, tmp_path / "out", "best_pruned", onnx=False,
                   base=problem.network.checkpoint, keep=record["keep"], round_to=1)
    loaded = load_model(files["pytorch"])
    theirs = direct_run(problem.model, problem.space.example_input, "tp_taylor", record["pruning_ratio"], batch)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch[0]), theirs.eval()(batch[0]))

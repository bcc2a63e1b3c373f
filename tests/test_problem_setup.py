"""One pruning problem from a search config (`entropy_search.problem.setup`): the baseline network, its data
with the checkpoint's own held-out split, groups, budget, evaluator and cache; `train_baseline`, the one way
a baseline is trained; `ensure_checkpoint`, which trains it when a search finds none."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from entropy_search.config import load_config
from entropy_search.data import eval_batch, load_data
from entropy_search.errors import CheckpointError, ConfigError, EntropySearchError
from entropy_search.models import create_model
from entropy_search.problem import (
    Budget,
    CandidateCache,
    CandidateEvaluator,
    Problem,
    SimulatedEvaluator,
    build_model,
    ensure_checkpoint,
    load_checkpoint,
    load_network,
    load_splits,
    save_checkpoint,
    setup,
    train_baseline,
)
from entropy_search.problem.setup import build_budget


@pytest.fixture(autouse=True)
def restore_threads():
    """`train_baseline` sets torch's threads for the process; leave them as they were."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, train_digits_checkpoint):
    return train_digits_checkpoint(tmp_path_factory.mktemp("ckpt") / "digits.pt", epochs=2)


def config_for(checkpoint, **overrides):
    base = {"model": {"checkpoint": str(checkpoint), "train_if_missing": False}, "data": {"eval_batch": 64},
            "search": {"flops_target": 0.5, "device": "cpu", "bn_calibration": 32}}
    return load_config(base, overrides)


# ---------------------------------------------------------------- setup


def test_setup_builds_every_part_of_the_problem_from_the_config(checkpoint):
    config = config_for(checkpoint, **{"seed": 5, "search.reward": "accuracy"})
    problem = setup(config)
    assert isinstance(problem, Problem) and problem.config is config
    # the network of the checkpoint, in eval mode, with an input of its shape
    reference = build_model(load_checkpoint(checkpoint))
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(problem.model(x), reference(x))
    assert problem.model is problem.network.model is problem.space.model
    assert problem.network.example_input.shape == (1, 1, 8, 8) and problem.network.checkpoint.path == checkpoint
    # the budget of the config, on the space of that network
    assert isinstance(problem.budget, Budget) and problem.budget.space is problem.space
    assert problem.budget.flops_target == 0.5 and problem.budget.min_keep == config.search.min_keep
    # the evaluator: a fixed held-out batch chosen by the search's seed, calibration images from the train split
    assert isinstance(problem.evaluator, CandidateEvaluator)
    x_eval, y_eval = eval_batch(problem.splits, 64, split="heldout", seed=5)
    assert torch.equal(problem.evaluator.x, x_eval) and torch.equal(problem.evaluator.y, y_eval)
    calibration, _ = eval_batch(problem.splits, 32, split="train", seed=5)
    assert torch.equal(problem.evaluator.calibration, calibration)
    # one cache with the configured reward; evaluating goes through it
    assert isinstance(problem.cache, CandidateCache) and problem.cache.reward == "accuracy"
    counts = [g.channels for g in problem.space.groups]
    record, hit = problem.evaluate(counts)
    assert not hit and record["reward"] == record["accuracy"] and problem.evaluate(counts)[1]


def test_heldout_split_follows_the_checkpoint_not_the_search(checkpoint, tmp_path):
    """The held-out images are the part of the training set the baseline never saw: drawn with the seed and
    fraction the checkpoint was trained with, whatever the search's own seed and fraction."""
    config = config_for(checkpoint, **{"seed": 7, "data.heldout_fraction": 0.3})
    ckpt = load_checkpoint(checkpoint)
    assert (ckpt.config["seed"], ckpt.config["heldout_fraction"]) == (0, 0.1)
    splits = load_splits(config, ckpt)
    assert splits.heldout.indices == load_data("digits", heldout_fraction=0.1, seed=0).heldout.indices
    # a checkpoint that does not say falls back on the config's
    bare = save_checkpoint(tmp_path / "bare.pt", build_model(ckpt), model_name="digits_cnn", num_classes=10,
                           in_channels=1, image_size=8, data="digits", config={}, metrics={})
    splits = load_splits(config, load_checkpoint(bare))
    assert splits.heldout.indices == load_data("digits", heldout_fraction=0.3, seed=7).heldout.indices


def _bare_checkpoint(checkpoint, path):
    """The trained network saved as if made elsewhere: its config records no held-out fraction or seed."""
    ckpt = load_checkpoint(checkpoint)
    return save_checkpoint(path, build_model(ckpt), model_name="digits_cnn", num_classes=10, in_channels=1,
                           image_size=8, data="digits", config={"epochs": 2}, metrics={})


def test_note_when_the_heldout_split_may_hold_training_images(checkpoint, tmp_path):
    """A checkpoint that does not record the split it was trained on gets one note naming it and `data.heldout`;
    one trained by `train_baseline`, or a search given `data.heldout`, gets none."""
    bare = _bare_checkpoint(checkpoint, tmp_path / "bare.pt")
    notes = [n for n in setup(config_for(bare)).notes if "held-out fraction and seed" in n]
    assert len(notes) == 1 and str(bare) in notes[0] and "data.heldout" in notes[0] and "optimistic" in notes[0]
    assert not any("held-out fraction and seed" in n for n in setup(config_for(checkpoint)).notes)
    split = tmp_path / "split.json"
    split.write_text(json.dumps(list(range(0, 1437, 10))))
    assert not any("held-out fraction and seed" in n for n in setup(config_for(bare, **{"data.heldout": str(split)})).notes)


def test_split_file_is_the_heldout_split_and_leaves_the_train_split(checkpoint, tmp_path):
    """With `data.heldout` the held-out images are the listed ones, whatever the checkpoint records, and the
    adaptive-BN calibration images (drawn from the train split) are none of them."""
    held = list(range(0, 1437, 10))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"heldout": held}))
    problem = setup(config_for(_bare_checkpoint(checkpoint, tmp_path / "bare.pt"), **{"data.heldout": str(split)}))
    assert problem.splits.heldout.indices == held
    assert not set(problem.splits.train.indices) & set(held) and len(problem.splits.train) == 1437 - len(held)
    full = load_data("digits", heldout_fraction=0.0).train_eval
    x, _ = eval_batch(problem.splits, 64, split="heldout", seed=0)
    assert torch.equal(problem.evaluator.x, x)
    heldout_images = torch.stack([full[i][0] for i in held])
    for image in problem.evaluator.calibration:
        assert not (heldout_images == image).flatten(1).all(1).any()
    splits = load_splits(config_for(checkpoint, **{"data.heldout": str(split)}), load_checkpoint(checkpoint))
    assert splits.heldout.indices == held


def test_image_folder_is_the_heldout_split_and_train_is_the_whole_training_set(checkpoint, tmp_path):
    from PIL import Image

    for label in range(10):
        (tmp_path / "held" / str(label)).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 16 * label, dtype=np.uint8)).save(tmp_path / "held" / str(label) / "a.png")
    problem = setup(config_for(checkpoint, **{"data.heldout": str(tmp_path / "held")}))
    assert len(problem.splits.heldout) == 10 and len(problem.splits.train) == 1437
    assert problem.evaluator.x.shape == (10, 1, 8, 8) and problem.evaluator.y.tolist() == list(range(10))


def test_bad_heldout_set_is_a_config_error_naming_the_key(checkpoint, tmp_path):
    split = tmp_path / "split.json"
    split.write_text("[3, 3]")
    with pytest.raises(ConfigError, match=r"^data.heldout: split file .*split\.json: index 3 given more than once$"):
        setup(config_for(checkpoint, **{"data.heldout": str(split)}))
    with pytest.raises(ConfigError, match=r"^data.heldout: .*missing does not exist"):
        setup(config_for(checkpoint, **{"data.heldout": str(tmp_path / "missing")}))


def test_checkpoint_that_does_not_match_the_config_is_a_config_error(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"model.name: 'resnet20', but checkpoint .*digits\.pt holds a 'digits_cnn'"):
        load_network(config_for(checkpoint, **{"model.name": "resnet20"}))
    other = save_checkpoint(tmp_path / "cifar.pt", create_model("digits_cnn"), model_name="digits_cnn", num_classes=10,
                            in_channels=1, image_size=8, data="cifar10", config={}, metrics={})
    with pytest.raises(ConfigError, match=r"data.name: 'digits', but checkpoint .*cifar\.pt was trained on 'cifar10'"):
        setup(config_for(other))
    with pytest.raises(CheckpointError, match="not found"):
        setup(config_for(tmp_path / "missing.pt"))


def test_unreachable_target_fails_in_setup(checkpoint):
    with pytest.raises(ConfigError, match="search.flops_target: 0.002 cannot be met"):
        setup(config_for(checkpoint, **{"search.flops_target": 0.002, "search.min_keep": 0.5}))
    problem = setup(config_for(checkpoint))
    with pytest.raises(ConfigError, match="cannot be met"):
        build_budget(problem.space, config_for(checkpoint, **{"search.flops_target": 0.002, "search.min_keep": 0.5}))


def test_no_calibration_images_when_bn_calibration_is_zero(checkpoint):
    problem = setup(config_for(checkpoint, **{"search.bn_calibration": 0}))
    assert problem.evaluator.calibration is None


def test_simulated_setup_needs_neither_data_nor_checkpoint(tmp_path):
    config = load_config({"model": {"name": "resnet20", "checkpoint": str(tmp_path / "none.pt")},
                          "search": {"simulate_eval_seconds": 1e-6, "flops_target": 0.5, "round_to": 4}})
    problem = setup(config)
    assert problem.splits is None and problem.network.checkpoint is None
    assert isinstance(problem.evaluator, SimulatedEvaluator)
    assert problem.network.example_input.shape == (1, 3, 32, 32) and problem.space.round_to == 4
    record, _ = problem.evaluate([g.channels for g in problem.space.groups])
    assert record["simulated"] and record["macs_ratio"] == 1.0
    assert not (tmp_path / "none.pt").exists()


# ---------------------------------------------------------------- train_baseline


def test_train_baseline_saves_a_checkpoint_with_its_metrics_and_settings(tmp_path):
    path, metrics = train_baseline(tmp_path / "sub" / "b.pt", model="digits_cnn", data="digits", epochs=1, seed=3,
                                   heldout_fraction=0.2, device="cpu", threads=1, progress=False,
                                   model_kwargs={"width": 8}, train_options={"lr": 0.1},
                                   extra_config={"note": "test"})
    assert path == tmp_path / "sub" / "b.pt" and path.is_file()
    assert set(metrics) >= {"test_acc", "heldout_acc", "train_seconds", "epochs", "train_loss", "train_acc"}
    assert 0 <= metrics["test_acc"] <= 1 and metrics["epochs"] == 1
    ckpt = load_checkpoint(path)
    assert ckpt.metrics == pytest.approx(metrics)
    assert (ckpt.model_name, ckpt.model_kwargs, ckpt.data) == ("digits_cnn", {"width": 8}, "digits")
    assert ckpt.config["seed"] == 3 and ckpt.config["heldout_fraction"] == 0.2 and ckpt.config["lr"] == 0.1
    assert ckpt.config["note"] == "test" and ckpt.config["device_used"] == "cpu" and ckpt.config["threads_used"] == 1
    model = build_model(ckpt)
    splits = load_data("digits", heldout_fraction=0.2, seed=3)
    from entropy_search.train import evaluate

    assert evaluate(model, splits.test, device="cpu") == pytest.approx(metrics["test_acc"])
    assert evaluate(model, splits.heldout, device="cpu") == pytest.approx(metrics["heldout_acc"])


def test_train_baseline_without_a_heldout_split(tmp_path):
    _, metrics = train_baseline(tmp_path / "b.pt", model="digits_cnn", data="digits", epochs=0, heldout_fraction=0.0,
                                device="cpu", threads=1, progress=False)
    assert "heldout_acc" not in metrics and "train_loss" not in metrics and metrics["epochs"] == 0


def test_train_baseline_refuses_bad_input_before_training(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        train_baseline(tmp_path, model="digits_cnn", data="digits", epochs=1, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="not a writable folder"):
        train_baseline(blocker / "sub" / "b.pt", model="digits_cnn", data="digits", epochs=1, progress=False)
    with pytest.raises(EntropySearchError, match="unknown model 'no_such_net'"):
        train_baseline(tmp_path / "b.pt", model="no_such_net", data="digits", epochs=1, progress=False)
    with pytest.raises(ConfigError, match="does not accept"):
        train_baseline(tmp_path / "b.pt", model="digits_cnn", data="digits", epochs=1, progress=False,
                       model_kwargs={"depth": 3})
    assert list(tmp_path.iterdir()) == [blocker]


def test_train_baseline_is_reproducible_whatever_the_global_rng(tmp_path):
    states = []
    for i in range(2):
        torch.rand(5 + i)  # something consumed the global RNG before
        path, _ = train_baseline(tmp_path / f"b{i}.pt", model="digits_cnn", data="digits", epochs=1, seed=2,
                                 device="cpu", threads=1, progress=False)
        states.append(load_checkpoint(path).state_dict)
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# ---------------------------------------------------------------- ensure_checkpoint


def test_ensure_checkpoint_uses_an_existing_file_untouched(checkpoint):
    before = checkpoint.stat().st_mtime_ns
    assert ensure_checkpoint(config_for(checkpoint), progress=False) == checkpoint
    assert checkpoint.stat().st_mtime_ns == before


def test_missing_checkpoint_is_an_error_unless_training_is_allowed(tmp_path):
    config = load_config({"model": {"checkpoint": str(tmp_path / "b.pt"), "train_if_missing": False}})
    with pytest.raises(CheckpointError, match="does not exist.*train_if_missing"):
        ensure_checkpoint(config, progress=False)
    assert not (tmp_path / "b.pt").exists()


def test_baseline_trained_by_a_search_is_reproducible(tmp_path):
    """The same config trains the same baseline, whatever consumed the global RNG before (initial weights too),
    with the config's seed and held-out fraction, marked as trained by the search."""
    states = []
    for i in range(2):
        torch.rand(3 + i)
        cfg = load_config({"model": {"name": "digits_cnn", "train_if_missing": True, "train_epochs": 2,
                                     "checkpoint": str(tmp_path / f"b{i}.pt")},
                           "data": {"heldout_fraction": 0.2}, "seed": 4})
        ckpt = load_checkpoint(ensure_checkpoint(cfg, progress=False))
        assert ckpt.config["trained_by"] == "search" and ckpt.config["epochs"] == 2
        assert ckpt.config["seed"] == 4 and ckpt.config["heldout_fraction"] == 0.2
        states.append(ckpt.state_dict)
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])

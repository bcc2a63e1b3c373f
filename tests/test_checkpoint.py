"""Checkpoints (`entropy_search.problem.checkpoint`): round trip, atomic writes, clear errors for missing,
corrupt, foreign, incomplete and newer files, and pruned models rebuilt from their keep ratios."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from entropy_search.data import eval_batch, load_data
from entropy_search.errors import CheckpointError
from entropy_search.models import create_model
from entropy_search.problem import PruningSpace
from entropy_search.problem.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    build_model,
    load_checkpoint,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def model():
    """A digits CNN (width 16) with non-trivial BN statistics; whether it is trained does not matter here."""
    torch.manual_seed(0)
    model = create_model("digits_cnn", width=16).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _save(path, model, **over):
    fields = dict(model_name="digits_cnn", model_kwargs={"width": 16}, num_classes=10, in_channels=1, image_size=8,
                  data="digits", config={"epochs": 5, "root": path.parent, "lr": torch.tensor(0.05)},
                  metrics={"test_acc": 0.9})
    fields.update(over)
    return save_checkpoint(path, model, **fields)


def test_checkpoint_round_trip(tmp_path, model, digits):
    path = _save(tmp_path / "runs" / "baseline.pt", model)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["baseline.pt"]  # no temp file left
    ckpt = load_checkpoint(path)
    assert ckpt.path == path and ckpt.model_name == "digits_cnn" and ckpt.model_kwargs == {"width": 16}
    assert (ckpt.num_classes, ckpt.in_channels, ckpt.image_size, ckpt.data) == (10, 1, 8, "digits")
    assert ckpt.config["epochs"] == 5 and ckpt.config["root"] == str(tmp_path / "runs")
    assert ckpt.config["lr"] == pytest.approx(0.05)
    assert ckpt.metrics == {"test_acc": 0.9} and ckpt.keep is None
    assert "torch" in ckpt.environment
    rebuilt = build_model(ckpt)
    assert not rebuilt.training
    x, _ = eval_batch(digits, 32)
    assert torch.allclose(rebuilt(x), model(x))


def test_failed_save_leaves_old_file_untouched(tmp_path, model, monkeypatch):
    path = _save(tmp_path / "ckpt.pt", model)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(CheckpointError, match="No space left"):
        _save(path, model)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_missing_corrupt_and_foreign_checkpoints(tmp_path, model):
    with pytest.raises(CheckpointError, match=r"checkpoint .*nothing\.pt not found"):
        load_checkpoint(tmp_path / "nothing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"garbage\.pt is corrupt"):
        load_checkpoint(garbage)
    good = _save(tmp_path / "good.pt", model)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt is corrupt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "state.pt"
    torch.save(model.state_dict(), foreign)
    with pytest.raises(CheckpointError, match=r"state\.pt is not an entropy-search checkpoint"):
        load_checkpoint(foreign)
    incomplete = tmp_path / "incomplete.pt"
    torch.save({"format": FORMAT, "model_name": "digits_cnn"}, incomplete)
    with pytest.raises(CheckpointError, match="incomplete.*missing"):
        load_checkpoint(incomplete)


def test_non_finite_weights_are_refused_at_load_in_one_line(tmp_path, model, capsys):
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.stem[0].weight[0, 0, 0, 0] = float("nan")
    path = _save(tmp_path / "nan.pt", broken)
    with pytest.raises(CheckpointError, match=r"stem\.0\.weight has 1 non-finite value"):
        load_checkpoint(path)
    from entropy_search.cli import main

    config = tmp_path / "search.yaml"
    config.write_text(f"model:\n  checkpoint: {path}\noutput:\n  dir: {tmp_path / 'out'}\n")
    for argv in (["prune", str(path), "--flops-target", "0.5"], ["search", str(config)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "non-finite" in err and "\n" not in err and "Traceback" not in err


def test_weights_that_do_not_fit(tmp_path, model):
    path = _save(tmp_path / "wrong.pt", model, model_kwargs={"width": 8})
    with pytest.raises(CheckpointError, match=r"wrong\.pt.*do not fit model 'digits_cnn'"):
        build_model(load_checkpoint(path))
    path = _save(tmp_path / "unknown.pt", model, model_name="no_such_net")
    with pytest.raises(CheckpointError, match=r"unknown\.pt.*no_such_net"):
        build_model(load_checkpoint(path))


def test_pruned_checkpoint_with_prune_fn(tmp_path, digits):
    small = create_model("digits_cnn", width=8)
    path = _save(tmp_path / "pruned.pt", small, keep=[0.5, 0.5, 0.5])
    calls = []

    def prune_fn(model, example_input, keep, dropped):
        calls.append((example_input.shape, keep, dropped))
        return create_model("digits_cnn", width=int(16 * keep[0]))

    rebuilt = build_model(load_checkpoint(path), prune_fn=prune_fn)
    assert calls == [((1, 1, 8, 8), [0.5, 0.5, 0.5], [])]
    x, _ = eval_batch(digits, 8)
    small.eval()
    assert torch.allclose(rebuilt(x), small(x))
    with pytest.raises(CheckpointError, match="do not fit"):
        build_model(load_checkpoint(path), prune_fn=lambda model, x, keep, dropped: model)


def test_pruned_checkpoint_with_the_default_pruning_space(tmp_path, model, digits):
    space = PruningSpace(model, torch.zeros(1, 1, 8, 8))
    keep = [0.5] * len(space.groups)
    pruned = space.prune(keep)
    path = _save(tmp_path / "pruned.pt", pruned, keep=keep)
    rebuilt = build_model(load_checkpoint(path))
    x, _ = eval_batch(digits, 16)
    pruned.eval()
    assert torch.allclose(rebuilt(x), pruned(x), atol=1e-6)


def test_pruned_checkpoint_without_its_dropped_blocks(tmp_path, model, digits):
    """A network with a residual block dropped is rebuilt without it (format version 2), and computes the same."""
    space = PruningSpace(model, torch.zeros(1, 1, 8, 8))
    keep = [0.5] * len(space.groups)
    pruned = space.prune(keep, dropped=["block"])
    path = _save(tmp_path / "shallow.pt", pruned, keep=keep, dropped=["block"])
    ckpt = load_checkpoint(path)
    assert ckpt.dropped == ["block"] and ckpt.format_version == FORMAT_VERSION == 2
    rebuilt = build_model(ckpt)
    assert isinstance(rebuilt.block, nn.Identity) and not any(k.startswith("block.") for k in ckpt.state_dict)
    x, _ = eval_batch(digits, 16)
    assert torch.allclose(rebuilt(x), pruned.eval()(x), atol=1e-6)
    with pytest.raises(CheckpointError, match="dropped blocks need the keep ratios"):
        _save(tmp_path / "bad.pt", model, dropped=["block"])
    payload = torch.load(path, weights_only=True)
    payload["dropped"] = ["stem"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"without stem: cannot drop stem: stem maps \(1, 8, 8\) to \(16, 8, 8\)"):
        build_model(load_checkpoint(path))


def test_newer_format_version_is_refused(tmp_path, model):
    path = _save(tmp_path / "future.pt", model)
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=rf"format version {FORMAT_VERSION + 1}, newer .*upgrade"):
        load_checkpoint(path)


def test_example_input_has_the_trained_shape(tmp_path, model):
    ckpt = load_checkpoint(_save(tmp_path / "c.pt", model))
    assert ckpt.example_input().shape == (1, 1, 8, 8) and ckpt.example_input(4).shape == (4, 1, 8, 8)
    assert ckpt.format_version == 1, "a file without dropped blocks stays readable by readers before blocks"


def test_a_checkpoint_that_would_run_code_is_refused_saying_what_it_is(tmp_path):
    """A pickled object (torch.save of a whole model) is not loaded: the message says the file holds pickled
    objects, that only weights are loaded, and how to convert a trusted file; not torch's advice to switch the
    safeguard off."""
    path = tmp_path / "evil.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and "holds pickled Python objects" in message and "weights_only=True" in message
    assert "convert it once" in message and "weights_only` set to `False`" not in message

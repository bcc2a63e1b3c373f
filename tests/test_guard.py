"""The exactness guard (`problem.guard`): on every model of the registry a random candidate computed sliced and
masked equals its pruned network. On a network where masking is not pruning (tests/user_models.py's
channel_mean_net) the space's construction check keeps the group whole, named; with that check bypassed (what it
cannot see: a mismatch at other counts or only on other images), the guard catches the masked evaluation with its
channel group named, and a search stops before Ray starts (CLI: exit 2, one line). About 15 s (ResNet-20 at batch
8, a digits baseline of one epoch)."""

from __future__ import annotations

import json

import pytest
import torch

from entropy_search.cli import main
from entropy_search.config import load_config
from entropy_search.errors import EntropySearchError
from entropy_search.models import create_model, model_spec
from entropy_search.problem import Budget, PruningSpace, check_exact


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20"])
def test_a_random_candidate_computes_what_its_pruned_network_computes(name):
    """Both ways of evaluating without surgery, with residual blocks dropped (the registry's exactness tests,
    tests/test_space.py, cover every model; this is the guard's own comparison)."""
    spec = model_spec(name)
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(8, spec.in_channels, spec.image_size, spec.image_size)
    space = PruningSpace(model, x[:1], blocks=True)
    for mode in ("sliced", "masked"):
        found = check_exact(space, Budget(space, 0.3, 0.1), x, mode=mode, seed=1)
        assert found["relative_difference"] <= 1e-4 and found["mode"] == mode and found["seconds"] > 0
    if name == "resnet20":  # the candidate dropped residual blocks too
        assert found["dropped_blocks"]


def broken_space() -> tuple[PruningSpace, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("user_models:channel_mean_net", num_classes=10, in_channels=1).eval()
    x = torch.randn(16, 1, 8, 8)
    return PruningSpace(model, x[:1]), x


@pytest.fixture
def unchecked_groups(monkeypatch):
    """Spaces built without the construction check of their groups, so that the guard meets what it missed."""
    monkeypatch.setattr(PruningSpace, "_inexact_groups", lambda self: {})


def test_the_space_keeps_a_group_whole_when_masking_it_is_not_cutting_it():
    space, x = broken_space()
    assert [g.name for g in space.groups] == ["stem.0", "head.0"]
    assert len(space.fixed_groups) == 1 and space.fixed_groups[0].startswith("middle.0: masking its pruned channels "
                                                                             "is not cutting them (relative difference")
    assert "stays whole: middle.0: masking" in space.describe()
    for mode in ("masked", "sliced"):  # what is left is exact both ways
        assert check_exact(space, Budget(space, 0.7, 0.1), x, mode=mode, seed=0)["relative_difference"] <= 1e-6


def test_a_masked_evaluation_that_is_not_the_pruned_network_is_refused_with_its_group_named(unchecked_groups):
    space, x = broken_space()
    with pytest.raises(EntropySearchError, match=r"masked evaluation .* \(relative difference 0\.0\d+ .*: group 1 "
                                                 r"\(middle\.0, keeping \d+ of 16\).*search\.eval_mode: pruned"):
        check_exact(space, Budget(space, 0.5, 0.1), x, mode="masked", seed=0)
    # slicing the kept weights computes what pruning computes on the same network
    assert check_exact(space, Budget(space, 0.5, 0.1), x, mode="sliced", seed=0)["relative_difference"] <= 1e-6


def broken_search(tmp_path, **extra) -> dict:
    return {"model": {"name": "user_models:channel_mean_net", "checkpoint": str(tmp_path / "baseline.pt"),
                      "train_epochs": 1},
            "search": {"flops_target": 0.5, "eval_mode": "masked", "device": "cpu", **extra},
            "output": {"dir": str(tmp_path / "run")}}


def test_a_search_stops_before_ray_starts_and_the_cli_says_why_in_one_line(tmp_path, capsys, unchecked_groups):
    from entropy_search.search import prepare

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(broken_search(tmp_path)))
    assert main(["search", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "group 1 (middle.0" in err and "eval_mode: pruned" in err
    assert not (tmp_path / "run" / "candidates.jsonl").exists()
    # the guard off (or the exact, slower path): the same problem is built
    assert prepare(load_config(broken_search(tmp_path, check_exact=False)), progress=False).exactness is None
    checked = prepare(load_config(broken_search(tmp_path, eval_mode="sliced")), progress=False).exactness
    assert checked["mode"] == "sliced" and checked["relative_difference"] <= 1e-6

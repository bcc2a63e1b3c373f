"""`entropy-search prune` end to end on the digits CNN, and its bad-input messages."""

from __future__ import annotations

import json

import pytest
import torch

from entropy_search.cli import main
from entropy_search.models import create_model
from entropy_search.problem.checkpoint import build_model, load_checkpoint, save_checkpoint
from entropy_search.problem.macs import count_macs


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """An (untrained) digits CNN checkpoint: prune's arithmetic does not depend on training."""
    path = tmp_path_factory.mktemp("ckpt") / "baseline.pt"
    torch.manual_seed(0)
    model = create_model("digits_cnn")
    save_checkpoint(path, model, model_name="digits_cnn", model_kwargs={}, num_classes=10, in_channels=1,
                    image_size=8, data="digits", config={}, metrics={})
    return path


def test_prune_to_flops_target_fine_tunes_and_saves(baseline, tmp_path, capsys):
    out = tmp_path / "pruned.pt"
    code = main(["prune", str(baseline), "--flops-target", "0.5", "--epochs", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "MACs" in text and "fine-tuned" in text
    ckpt = load_checkpoint(out)
    pruned = build_model(ckpt)
    full = count_macs(create_model("digits_cnn"), ckpt.example_input())
    assert count_macs(pruned, ckpt.example_input()) == ckpt.metrics["macs"] <= 0.5 * full
    assert set(ckpt.metrics) >= {"test_accuracy_baseline", "test_accuracy_pruned", "test_accuracy_finetuned"}


def test_prune_with_policy_file(baseline, tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"best_policy": {"keep": [0.5, 0.25, 1.0, 0.75]}}))
    out = tmp_path / "p.pt"
    assert main(["prune", str(baseline), "--policy", str(policy), "--epochs", "0", "--out", str(out)]) == 0
    assert load_checkpoint(out).keep == [0.5, 0.25, 1.0, 0.75]


@pytest.mark.parametrize(
    "extra, message",
    [(["--keep", "1.5"], "must be in (0, 1]"),
     (["--keep", "0"], "must be in (0, 1]"),
     (["--flops-target", "0.001"], "--flops-target: 0.001 cannot be met"),
     (["--policy", "missing.json"], "not found"),
     (["--bn-calibration", "-1"], "--bn-calibration must be >= 0")],
)
def test_bad_input_exits_2_with_one_line(baseline, tmp_path, capsys, extra, message):
    assert main(["prune", str(baseline), "--epochs", "0", "--out", str(tmp_path / "x.pt"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists(), "nothing half-written is left behind"


def test_wrong_number_of_ratios(baseline, tmp_path, capsys):
    policy = tmp_path / "policy.json"
    policy.write_text("[0.5, 0.5]")
    assert main(["prune", str(baseline), "--policy", str(policy), "--epochs", "0"]) == 2
    assert "expected 4 keep ratios" in capsys.readouterr().err


def test_missing_and_corrupt_checkpoint(tmp_path, capsys):
    assert main(["prune", str(tmp_path / "nope.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["prune", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_bn_calibration_recovers_accuracy_before_fine_tuning(tmp_path, train_digits_checkpoint):
    """Adaptive BN in `prune`: the pruned network is tested with statistics of its own structure."""
    ckpt = train_digits_checkpoint(tmp_path / "trained.pt", epochs=15)
    accuracy = {}
    for n in (0, 256):
        out = tmp_path / f"p{n}.pt"
        assert main(["prune", str(ckpt), "--keep", "0.5", "--epochs", "0", "--bn-calibration", str(n),
                     "--out", str(out), "--no-progress"]) == 0
        saved = load_checkpoint(out)
        accuracy[n] = saved.metrics["test_accuracy_pruned"]
        assert saved.config["prune"]["bn_calibration"] == n
    assert accuracy[256] > accuracy[0] + 0.1


def test_prune_with_a_search_result_takes_its_delivered_policy_by_group_name(baseline, tmp_path, capsys):
    from entropy_search.problem import PruningSpace

    ckpt = load_checkpoint(baseline)
    names = [g.name for g in PruningSpace(build_model(ckpt), ckpt.example_input()).groups]
    delivered = dict(zip(reversed(names), [1.0, 0.75, 0.25, 0.5]))  # a JSON object in another order than the groups
    agent = {n: 1.0 for n in names}
    for i, written in enumerate([{"policy": delivered, "agent_policy": agent},  # result.json
                                 {"policy": delivered, "agent": {"policy": agent}},  # its policy.json in MLflow
                                 {"best_policy": agent, "delivered_policy": delivered}]):  # older result files
        result = tmp_path / f"result{i}.json"
        result.write_text(json.dumps(written))
        out = tmp_path / f"delivered{i}.pt"
        assert main(["prune", str(baseline), "--policy", str(result), "--epochs", "0", "--out", str(out)]) == 0
        assert load_checkpoint(out).keep == [delivered[n] for n in names]
    # a network Torch-Pruning's recipe delivered: the same counts, and a note that its channels were the recipe's
    result.write_text(json.dumps({"policy": delivered, "delivered": {"label": "tp_taylor", "ranking": "tp_taylor"}}))
    assert main(["prune", str(baseline), "--policy", str(result), "--epochs", "0", "--out", str(out)]) == 0
    assert load_checkpoint(out).keep == [delivered[n] for n in names]
    assert "note: the delivered network kept the channels tp_taylor ranks first" in capsys.readouterr().out
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"delivered_policy": {"no_such_layer": 0.5}}))
    assert main(["prune", str(baseline), "--policy", str(wrong), "--epochs", "0"]) == 2


def test_prune_removes_the_residual_blocks_a_policy_or_drop_names(baseline, tmp_path, capsys):
    """A search's delivered network without its dropped blocks is rebuilt from its result (or policy.json); --drop
    removes blocks on any policy; a block that changes shape is refused in one line."""
    from entropy_search.problem import PruningSpace

    ckpt = load_checkpoint(baseline)
    names = [g.name for g in PruningSpace(build_model(ckpt), ckpt.example_input()).groups]
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"policy": dict.fromkeys(names, 0.5),
                                  "delivered": {"label": "top1", "dropped_blocks": ["block"]}}))
    out = tmp_path / "shallow.pt"
    assert main(["prune", str(baseline), "--policy", str(result), "--epochs", "0", "--out", str(out)]) == 0
    assert "residual blocks removed: block (0 of 1 kept)" in capsys.readouterr().out
    shallow = load_checkpoint(out)
    assert shallow.dropped == ["block"] and isinstance(build_model(shallow).block, torch.nn.Identity)
    assert count_macs(build_model(shallow), shallow.example_input()) == shallow.metrics["macs"]
    out2 = tmp_path / "uniform_shallow.pt"
    assert main(["prune", str(baseline), "--flops-target", "0.5", "--drop", "block", "--epochs", "0",
                 "--out", str(out2)]) == 0
    assert load_checkpoint(out2).dropped == ["block"] and load_checkpoint(out2).metrics["macs"] <= 0.5 * count_macs(
        create_model("digits_cnn"), shallow.example_input())
    capsys.readouterr()
    assert main(["prune", str(baseline), "--keep", "0.5", "--drop", "down", "--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert "cannot drop down: down maps (32, 8, 8) to (64, 4, 4)" in err and len(err.strip().splitlines()) == 1

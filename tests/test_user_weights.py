"""The network a user brings: weights saved with plain PyTorch, for a torchvision, a timm and a user's own
architecture, pruned from the command line (`model.weights`, `prune --model`); wrapped state_dicts read; wrong
files refused in one line (exit 2) with nothing written; the preprocessing stated, recorded and used. On an
ImageFolder of three classes of 32x32 images made here (tests/test_readme_own_network.py runs the README's
commands). About 2 min on 2 cores: three small searches on one local Ray of 2 CPUs (seconds of agent time each),
the rest seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from entropy_search.cli import main
from entropy_search.config import load_config
from entropy_search.models import create_model
from entropy_search.problem import load_checkpoint
from entropy_search.problem.weights import read_weights


def write_folder(root: Path, per_class: dict[str, int]) -> Path:
    """train/ and val/ folders of three classes of 40x40 RGB images, each class its own mean colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for k, cls in enumerate(("red", "green", "blue")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (40, 40, 3), dtype=np.uint8)
                pixels[..., k] += 120
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("images"), {"train": 12, "val": 4})


def saved_weights(path: Path, model_name: str, **wrap) -> Path:
    """`torch.save(model.state_dict(), path)` of a freshly built network for the folder's 3 classes."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=3, in_channels=3)
    state = model.state_dict()
    torch.save({key: state for key in wrap} if wrap else state, path)
    return path


def search_config(folder: Path, weights: Path, model_name: str, out: Path) -> dict:
    return {
        "model": {"name": model_name, "weights": str(weights), "train_if_missing": False},
        "data": {"name": f"imagefolder:{folder}", "image_size": 32, "eval_batch": 6, "heldout_fraction": 0.25,
                 "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "search": {"flops_target": 0.5, "top_k": 1, "device": "cpu"},
        "agent": {"episodes_per_iteration": 2, "num_epochs": 1, "num_minibatches": 1},
        "resources": {"num_env_runners": 1, "num_cpus_per_env_runner": 1, "driver_threads": 1},
        "stop": {"iterations": 1},
        "baselines": {"random_candidates": 2, "peers": []},
        "finetune": {"epochs": 1, "batch_size": 8},
        "output": {"dir": str(out), "export_onnx": True, "latency": False},
    }


@pytest.mark.parametrize("model_name", ["tv:resnet18", "timm.models.resnet:resnet10t", "user_models:dense_grouped_net"])
def test_a_search_prunes_the_weights_a_user_brings(ray_local, folder, tmp_path, capsys, model_name):
    """`entropy-search search cfg.yaml` with `model.weights`: the network measured first, then searched, pruned,
    fine-tuned and exported with the stated preprocessing recorded everywhere."""
    weights = saved_weights(tmp_path / "weights.pth", model_name)
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(search_config(folder, weights, model_name, out)))  # JSON is YAML
    assert main(["search", str(cfg), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    first = next(line for line in printed.splitlines() if line.startswith("your network"))
    assert "test accuracy" in first and "MACs" in first and "ms per image" in first and "std [0.25, 0.25, 0.25]" in first
    assert printed.index("your network") < printed.index("search:")  # measured before the search
    baseline = load_checkpoint(out / "baseline.pt")
    assert baseline.model_name == model_name and baseline.config["trained_by"] == "elsewhere"
    assert baseline.config["preprocessing"] == {"channels": 3, "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    given = torch.load(weights)
    assert all(torch.equal(baseline.state_dict[k], v) for k, v in given.items())  # the user's weights, unchanged
    result = json.loads((out / "result.json").read_text())
    assert result["base"]["preprocessing"] == baseline.config["preprocessing"]
    assert result["base"]["test_accuracy"] == pytest.approx(baseline.metrics["test_acc"])
    delivered = load_checkpoint(out / "best_pruned.pt")
    assert delivered.config["preprocessing"] == baseline.config["preprocessing"] and delivered.image_size == 32
    import onnx

    props = {p.key: json.loads(p.value) for p in onnx.load(str(out / "best_pruned.onnx")).metadata_props}
    assert props == baseline.config["preprocessing"]


@pytest.mark.parametrize("wrap", [{}, {"state_dict": True}, {"model": True}])
def test_wrapped_and_prefixed_state_dicts_are_read(tmp_path, wrap):
    path = saved_weights(tmp_path / "w.pth", "user_models:dense_grouped_net", **wrap)
    plain = create_model("user_models:dense_grouped_net", num_classes=3, in_channels=3).state_dict()
    assert set(read_weights(path)) == set(plain)
    state = torch.load(path)
    state = state.get("state_dict", state.get("model", state))
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "dp.pth")  # DataParallel's keys
    assert set(read_weights(tmp_path / "dp.pth")) == set(plain)


def wrong_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Files that are not the weights of user_models:dense_grouped_net for 3 classes, and what the refusal says."""
    other = saved_weights(tmp_path / "resnet18.pth", "tv:resnet18")
    classes = tmp_path / "ten_classes.pth"
    torch.save(create_model("user_models:dense_grouped_net", num_classes=10, in_channels=3).state_dict(), classes)
    objects = tmp_path / "whole_model.pth"
    torch.save(create_model("user_models:dense_grouped_net", num_classes=3, in_channels=3), objects)
    truncated = tmp_path / "truncated.pth"
    good = saved_weights(tmp_path / "good.pth", "user_models:dense_grouped_net")
    truncated.write_bytes(good.read_bytes()[:1000])
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    return {
        "another architecture": (other, "does not fit user_models:dense_grouped_net with 3 classes.*key.* missing, "
                                        "first stem"),
        "another number of classes": (classes, r"shape.*differ, first fc.weight \[10, 32\] in the file, \[3, 32\] "
                                               "in the model"),
        "a pickled model": (objects, "holds pickled Python objects, not only tensors.*weights_only=True, which never "
                                     "runs code.*convert it once.*state_dict"),
        "a truncated file": (truncated, "corrupt, truncated or not a PyTorch file"),
        "a text file": (text, "corrupt, truncated or not a PyTorch file"),
    }


def test_a_wrong_weights_file_exits_2_in_one_line_and_writes_nothing(folder, tmp_path, capsys):
    """Through `search` (nothing written to the output folder) and `prune --model` alike."""
    import re

    for what, (path, message) in wrong_files(tmp_path).items():
        out = tmp_path / f"run-{path.stem}"
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(json.dumps(search_config(folder, path, "user_models:dense_grouped_net", out)))
        assert main(["search", str(cfg), "--no-progress"]) == 2, what
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), (what, err)
        assert not out.exists(), what
        pruned = tmp_path / f"{path.stem}_pruned.pt"
        assert main(["prune", str(path), "--model", "user_models:dense_grouped_net", "--data", f"imagefolder:{folder}",
                     "--image-size", "32", "--epochs", "0", "--out", str(pruned)]) == 2, what
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), (what, err)
        assert not pruned.exists()


def test_prune_takes_plain_weights_with_their_preprocessing(folder, tmp_path, capsys):
    weights = saved_weights(tmp_path / "weights.pth", "user_models:dense_grouped_net")
    out = tmp_path / "pruned.pt"
    assert main(["prune", str(weights), "--model", "user_models:dense_grouped_net", "--data", f"imagefolder:{folder}",
                 "--image-size", "32", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25",
                 "--flops-target", "0.5", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    pruned = load_checkpoint(out)
    assert pruned.model_name == "user_models:dense_grouped_net" and pruned.image_size == 32
    assert pruned.config["preprocessing"]["mean"] == [0.5] * 3 and pruned.metrics["macs"] <= 0.5 * pruned.metrics[
        "baseline_macs"]
    assert "test top-1 fine-tuned" in capsys.readouterr().out


def test_the_preprocessing_a_checkpoint_records_wins_and_a_contradiction_is_refused(folder, tmp_path):
    from entropy_search.errors import ConfigError
    from entropy_search.problem.setup import preprocessing_of

    weights = saved_weights(tmp_path / "weights.pth", "user_models:dense_grouped_net")
    config = load_config(search_config(folder, weights, "user_models:dense_grouped_net", tmp_path / "run"))
    from entropy_search.problem import ensure_checkpoint

    path = ensure_checkpoint(config, progress=False)
    ckpt = load_checkpoint(path)
    unstated = load_config(config.to_dict(), {"data.mean": None, "data.std": None, "data.image_size": None})
    assert preprocessing_of(unstated, ckpt) == {"mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32, "channels": 3}
    with pytest.raises(ConfigError, match=r"data.mean: \[0.485, 0.456, 0.406\], but checkpoint .* records \[0.5"):
        preprocessing_of(load_config(config.to_dict(), {"data.mean": [0.485, 0.456, 0.406]}), ckpt)


def test_plain_weights_given_as_a_checkpoint_say_where_they_go(tmp_path):
    from entropy_search.errors import CheckpointError

    weights = saved_weights(tmp_path / "w.pth", "user_models:dense_grouped_net")
    with pytest.raises(CheckpointError, match="not an entropy-search checkpoint.*give it as model.weights"):
        load_checkpoint(weights)


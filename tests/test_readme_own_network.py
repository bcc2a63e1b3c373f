"""The README's "Prune your own network", run as a user runs it: in the folder that holds the images and the
weights, each command starting its own local Ray there (so the config's relative paths are the workers' too), with
QUICK's changes to run in seconds. About 1 min on 2 cores (two one-iteration searches, one uniform pruning)."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml
from readme import readme_blocks
from test_user_weights import saved_weights, write_folder

from entropy_search.cli import main
from entropy_search.problem import load_checkpoint

#: What the test changes in the README's settings to run in seconds: 32x32 images and a one-iteration search.
QUICK = {"data": {"image_size": 32, "eval_batch": 6}, "stop": {"iterations": 1},
         "agent": {"episodes_per_iteration": 2, "num_epochs": 1, "num_minibatches": 1},
         "resources": {"num_env_runners": 1, "driver_threads": 1},
         "baselines": {"random_candidates": 2, "peers": []}, "search": {"top_k": 1},
         "finetune": {"epochs": 1, "batch_size": 8}, "output": {"latency": False}}


def test_the_readme_commands_for_your_own_network_run(tmp_path, monkeypatch, capsys):
    """The README's "Prune your own network": its YAML (with QUICK's changes), its two commands and its Python."""
    blocks = readme_blocks("Prune your own network")
    monkeypatch.chdir(tmp_path)
    write_folder(tmp_path / "my_images", {"train": 12, "val": 4})
    saved_weights(tmp_path / "my_weights.pth", "tv:resnet18")
    settings = yaml.safe_load(blocks["yaml"])
    for section, values in QUICK.items():
        settings.setdefault(section, {}).update(values)
    Path("my_network.yaml").write_text(yaml.safe_dump(settings))
    commands = [line.split("#")[0] for line in blocks["bash"].splitlines() if line.startswith("entropy-search")]
    assert len(commands) == 2
    assert main(shlex.split(commands[0])[1:] + ["--no-progress"]) == 0
    assert "your network (tv:resnet18, my_weights.pth)" in capsys.readouterr().out
    assert Path("runs/my_network/best_pruned.pt").exists()
    assert main(shlex.split(commands[1])[1:] + ["--image-size", "32", "--epochs", "1", "--no-progress"]) == 0
    assert load_checkpoint("my_weights_pruned.pt").model_name == "tv:resnet18"
    scope: dict = {}
    exec(blocks["python"].replace('run_search("my_network.yaml")',
                                  'run_search("my_network.yaml", overwrite=True, progress=False)'), scope)
    assert scope["result"]["delivered"]["macs_ratio"] <= 0.5

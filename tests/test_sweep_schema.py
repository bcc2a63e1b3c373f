"""The schema of a sweep (`entropy_search.sweep.schema`) without running one: the shipped configs, errors
that name the key, overrides and --dry-run, each trial's search config, resources and name, and the metrics
a scheduler may compare."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from entropy_search.errors import ConfigError

pytest.importorskip("ray")

from entropy_search.sweep import (  # noqa: E402
    ITERATION_METRICS,
    describe,
    load_sweep_config,
    trial_bundles,
    trial_config,
)
from entropy_search.sweep.schema import baseline_path, trial_name  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_load_and_describe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = sorted(p.name for p in (REPO / "tune_configs").glob("*.yaml"))
    assert "quickstart.yaml" in names and len(names) >= 4
    for path in (REPO / "tune_configs").glob("*.yaml"):
        sweep = load_sweep_config(path)
        assert sweep.name == path.stem
        assert describe(sweep)
    quick = load_sweep_config(REPO / "tune_configs" / "quickstart.yaml")
    rewards = quick.axes["search.reward"].values
    assert {"entropy", "accuracy"} <= set(rewards)  # the paper's reward against the labelled one
    assert quick.axes["search.flops_target"].values == [0.5, 0.3]
    assert quick.num_trials() == len(rewards) * 2 == len(quick.grid_points())
    bundles = trial_bundles(quick, quick.grid_points()[0])
    assert sum(b["CPU"] for b in bundles) * (quick.max_concurrent_trials or 1) <= 2
    for name in ("resnet56_cifar10", "vgg16_cifar10", "mobilenetv2_cifar10"):
        paper = load_sweep_config(REPO / "tune_configs" / f"{name}.yaml")
        assert {"entropy", "accuracy"} <= set(paper.axes["search.reward"].values)
        assert paper.num_trials() == len(paper.axes["search.reward"].values) * 3 * 3
        assert sorted(paper.axes["search.flops_target"].values) == [0.1, 0.2, 0.5]
        assert paper.axes["seed"].values == [0, 1, 2]
        assert paper.base["data"]["name"] == "cifar10"
        assert any(b.get("GPU") for b in trial_bundles(paper, {}))


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, r"^bogus: unknown key"),
    ({"scheduler": {"type": "asha", "metric": "accuracy"}}, r"scheduler\.metric: must be one of"),
    ({"axes": {"search.flops_target": [0.5, 1.5]}}, r"axes: search\.flops_target: must be in \(0, 1\], got 1\.5"),
    ({"axes": {"search.rewrd": ["entropy"]}}, r"axes: search\.rewrd: unknown key"),
    ({"axes": {"output.dir": ["/tmp/x"]}}, r"axes: output\.dir: is set by the sweep .* cannot be an axis"),
    ({"axes": {"agent.lr": {"uniform": [0.1, 0.01]}}}, r"axes\.agent\.lr.*low must be < high"),
    ({"axes": {"agent.lr": {"grid": [1e-3], "choice": [1e-4]}}}, r"axes\.agent\.lr.*exactly one"),
    ({"axes": {"agent.lr": {"loguniform": [0.0, 1.0]}}}, r"axes\.agent\.lr: loguniform: low must be > 0"),
    ({"axes": {"agent.lr": [0.001, -1]}}, r"axes: agent\.lr: must be > 0, got -1 \(trial agent\.lr=-1\)"),
    ({"axes": {"seed": 3}}, r"axes\.seed.*list of values"),
    ({"name": "a b"}, r"^name: use letters"),
    ({"base": {"agent": {"lr": -1}}}, r"^base\.agent\.lr: must be > 0, got -1"),
    ({"resources": {"cpus_per_trial": 0}}, r"resources\.cpus_per_trial: must be > 0"),
    ({"max_concurrent_trials": "two"}, r"max_concurrent_trials"),
])
def test_bad_sweep_configs_name_the_key(tmp_path, change, message):
    data = {"name": "bad", "base": {"stop": {"iterations": 2}}, "storage_path": str(tmp_path)}
    data.update(change)
    with pytest.raises(ConfigError, match=message):
        load_sweep_config(data)


def test_cli_errors_are_one_line_with_status_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": {"search": {"flops_target": 2}}, "storage_path": str(tmp_path)}))
    for args, expect in (
        ([str(bad)], "base.search.flops_target: must be in (0, 1], got 2"),
        ([str(tmp_path / "missing.yaml")], "sweep config not found"),
        ([str(REPO / "tune_configs" / "quickstart.yaml"), "--set", "axes.seed={grid: []}"], "axes.seed"),
    ):
        proc = subprocess.run([sys.executable, "-m", "entropy_search.cli", "sweep", *args], capture_output=True,
                              text=True, cwd=tmp_path, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("entropy-search sweep: error: ") and expect in lines[0], lines
        assert "Traceback" not in proc.stderr


def test_overrides_and_dry_run(tmp_path, capsys):
    from entropy_search.cli import main

    code = main(["sweep", str(REPO / "tune_configs" / "quickstart.yaml"), "--dry-run", "--storage-path", str(tmp_path),
                 "--set", "axes.seed=[0, 1]", "--set", "base.stop.iterations=3", "--name", "qs2"])
    assert code == 0
    out = capsys.readouterr().out
    trials = 2 * load_sweep_config(REPO / "tune_configs" / "quickstart.yaml").num_trials()  # two seeds each
    assert f"sweep qs2: {trials} trial(s) in {tmp_path}/qs2" in out and "axis seed: grid [0, 1]" in out
    sweep = load_sweep_config(REPO / "tune_configs" / "quickstart.yaml", {"base.stop.iterations": 3})
    assert sweep.base["stop"]["iterations"] == 3
    # a base given as a file: `base.<key>` overrides apply to what the file holds (they were refused before it was read)
    (tmp_path / "search.yaml").write_text("stop:\n  iterations: 7\nseed: 4\n")
    (tmp_path / "sweep.yaml").write_text("name: f\nbase: search.yaml\n")
    sweep = load_sweep_config(tmp_path / "sweep.yaml", {"base.stop.iterations": 3})
    assert sweep.base["stop"]["iterations"] == 3 and sweep.base["seed"] == 4
    (tmp_path / "other.yaml").write_text("seed: 5\n")
    sweep = load_sweep_config(tmp_path / "sweep.yaml", {"base": str(tmp_path / "other.yaml"), "base.seed": 6})
    assert sweep.base == {"seed": 6}


# ---------------------------------------------------------------- trials


def small_sweep(tmp_path, **extra):
    data = {"name": "s", "storage_path": str(tmp_path / "sweeps"),
            "base": {"stop": {"iterations": 2}, "model": {"train_epochs": 3}},
            "axes": {"search.reward": ["entropy", "accuracy"], "search.flops_target": [0.5, 0.3]},
            "resources": {"cpus_per_trial": 0.5, "num_env_runners": 3, "cpus_per_env_runner": 0.25}}
    data.update(extra)
    return load_sweep_config(data)


def test_trial_config_is_the_base_with_resources_and_axis_values(tmp_path):
    sweep = small_sweep(tmp_path)
    assert sweep.num_trials() == 4 and sweep.grid_points()[1] == {"search.reward": "entropy", "search.flops_target": 0.3}
    config = trial_config(sweep, {"search.reward": "accuracy", "search.flops_target": 0.3}, tmp_path / "t0" / "search")
    assert config.search.reward == "accuracy" and config.search.flops_target == 0.3 and config.stop.iterations == 2
    assert config.resources.num_env_runners == 3 and config.resources.num_cpus_per_env_runner == 0.25
    assert config.output.dir == str(tmp_path / "t0" / "search")
    # without a checkpoint every trial shares one baseline per model, data and epochs, trained once
    expected = tmp_path / "sweeps" / "baselines" / "digits_cnn-digits-e3.pt"
    assert config.checkpoint_path() == expected == baseline_path(sweep, config)
    assert trial_config(sweep, {}).output.dir == str(tmp_path / "sweeps" / "s" / "_validation")
    given = small_sweep(tmp_path, base={"model": {"checkpoint": "b.pt"}, "stop": {"iterations": 2}})
    assert trial_config(given, {}).checkpoint_path() == Path.cwd() / "b.pt"  # resolved where the sweep was loaded


def test_trial_bundles_are_its_process_then_its_env_runners(tmp_path):
    sweep = small_sweep(tmp_path)
    assert trial_bundles(sweep, {}) == [{"CPU": 0.5}] + [{"CPU": 0.25}] * 3
    runners = small_sweep(tmp_path, axes={"resources.num_env_runners": [0, 2]})
    assert trial_bundles(runners, {"resources.num_env_runners": 0}) == [{"CPU": 0.5}]
    gpu = small_sweep(tmp_path, resources={"cpus_per_trial": 1, "gpus_per_trial": 0.5, "num_env_runners": 1,
                                           "gpus_per_env_runner": 0.25, "cpus_per_env_runner": 1})
    assert trial_bundles(gpu, {}) == [{"CPU": 1.0, "GPU": 0.5}, {"CPU": 1.0, "GPU": 0.25}]


def test_describe_lists_every_trial_with_its_resources(tmp_path):
    text = describe(small_sweep(tmp_path))
    lines = text.splitlines()
    assert lines[0] == f"sweep s: 4 trial(s) in {tmp_path / 'sweeps' / 's'}"
    assert "axis search.reward: grid ['entropy', 'accuracy']" in text
    assert sum(line.lstrip().startswith("[") for line in lines) == 4
    assert "bundles [{'CPU': 0.5}, {'CPU': 0.25}, {'CPU': 0.25}, {'CPU': 0.25}]" in lines[-1]


def test_trial_names_carry_the_index_and_axis_values():
    trial = SimpleNamespace(experiment_tag="3_search.reward=entropy", trial_id="abc12_00003",
                            config={"search.reward": "entropy", "search.flops_target": 0.123456, "agent.lr": 1e-4})
    assert trial_name(trial) == "t00003-reward=entropy-flops_target=0.1235-lr=0.0001"
    restarted = SimpleNamespace(experiment_tag="", trial_id="abc12_00007", config={"data.root": "/a b/c"})
    assert trial_name(restarted) == "t00007-root=_a_b_c"
    long = SimpleNamespace(experiment_tag="1", trial_id="x_1", config={"search.entropy.layers": ["layer"] * 40})
    assert len(trial_name(long)) == 100


def test_random_axes_are_validated_at_both_ends(tmp_path):
    ok = small_sweep(tmp_path, axes={"agent.lr": {"loguniform": [1e-4, 1e-2]}, "seed": {"randint": [0, 3]}})
    assert ok.num_trials() == 1 and set(ok.param_space()) == {"agent.lr", "seed"}
    with pytest.raises(ConfigError, match=r"axes: search.flops_target: must be in \(0, 1\].*trial"):
        small_sweep(tmp_path, axes={"search.flops_target": {"uniform": [0.5, 1.5]}})


def test_every_iteration_metric_is_reported_by_the_driver(tmp_path):
    """A scheduler compares `scheduler.metric` after every iteration: each of ITERATION_METRICS must be in what
    the search's driver reports then (RLSearch's per-iteration metrics)."""
    from entropy_search.config import load_config
    from entropy_search.rl.driver import RLSearch

    search = RLSearch(load_config({"output": {"dir": str(tmp_path)}}), 4, progress=False)
    search.state.add({"kept_channels": [1, 2], "reward": -1.0, "macs_ratio": 0.4, "params_ratio": 0.5, "entropy": 1.0,
                      "accuracy": 0.9})
    search.state.wall_seconds = 1.0
    metrics = search._metrics({}, [{"reward": -1.0}], 0.5)
    assert set(ITERATION_METRICS) <= set(metrics)
    assert metrics["best_reward"] == -1.0 and metrics["candidates"] == 1
    with pytest.raises(ConfigError, match=r"scheduler.metric: must be one of .*best_reward"):
        small_sweep(tmp_path, scheduler={"type": "asha", "metric": "iteration_seconds"})

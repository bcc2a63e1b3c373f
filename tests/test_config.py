"""The search config: defaults, YAML overrides, errors that name the key, the resolved config."""

from __future__ import annotations

import json

import pytest
import yaml

from entropy_search.config import SearchConfig, load_config, schema_reference
from entropy_search.errors import ConfigError


def test_defaults_are_valid():
    config = load_config({})
    assert config.search.reward == "entropy"
    assert config.agent.algorithm == "ppo"
    assert config.agent.gamma == 1.0
    assert 0 < config.search.flops_target <= 1


def test_yaml_overrides_defaults_only(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("search:\n  flops_target: 0.3\nagent:\n  algorithm: sac\n")
    config = load_config(path)
    assert config.search.flops_target == 0.3
    assert config.agent.algorithm == "sac"
    assert config.search.min_keep == SearchConfig().search.min_keep  # untouched default


def test_dotted_and_nested_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("search:\n  flops_target: 0.3\n")
    config = load_config(path, {"search.flops_target": 0.7, "agent": {"lr": 0.01}, "seed": 3})
    assert (config.search.flops_target, config.agent.lr, config.seed) == (0.7, 0.01, 3)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"search": {"flops_target": 1.5}}, "search.flops_target: must be in (0, 1], got 1.5"),
        ({"search": {"flops_target": 0}}, "search.flops_target: must be in (0, 1], got 0"),
        ({"search": {"min_keep": -0.1}}, "search.min_keep: must be in (0, 1]"),
        ({"search": {"bogus": 1}}, "search.bogus: unknown key"),
        ({"nonsense": 1}, "nonsense: unknown key"),
        ({"agent": {"lr": "fast"}}, "agent.lr:"),
        ({"agent": {"algorithm": "ddpg"}}, "agent.algorithm:"),
        ({"search": {"reward": "loss"}}, "search.reward:"),
        ({"search": {"entropy": {"bins": 1}}}, "search.entropy.bins:"),
        ({"search": {"entropy": {"method": "fft"}}}, "search.entropy.method:"),
        ({"resources": {"num_env_runners": -1}}, "resources.num_env_runners: must be >= 0"),
        ({"search": {"round_to": 0}}, "search.round_to: must be > 0"),
        ({"stop": {"iterations": None}}, "stop: set at least one of"),
        ({"agent": {"gamma": 1.2}}, "agent.gamma: must be in [0, 1]"),
        ({"output": {"checkpoint_every": 0}}, "output.checkpoint_every"),
        ({"search": {"bn_calibration": -1}}, "search.bn_calibration: must be >= 0"),
        ({"search": {"entropy": {"sample": 0}}}, "search.entropy.sample: must be in (0, 1]"),
    ],
)
def test_errors_name_the_key(data, expected):
    with pytest.raises(ConfigError) as err:
        load_config(data)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError, match=r"known keys: .*flops_target"):
        load_config({"search": {"flops_targt": 0.5}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)


def test_paths_are_resolved_and_config_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config({"output": {"dir": "runs/x"}, "model": {"checkpoint": "b.pt"}})
    assert config.output.dir == str(tmp_path / "runs" / "x")
    assert config.checkpoint_path() == tmp_path / "b.pt"
    config.save(tmp_path / "resolved.yaml")
    config.save(tmp_path / "resolved.json")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == config
    assert json.loads((tmp_path / "resolved.json").read_text()) == config.to_dict()
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["search"]["reward"] == "entropy"


def test_default_checkpoint_lives_in_the_output_dir(tmp_path):
    config = load_config({"output": {"dir": str(tmp_path)}})
    assert config.checkpoint_path() == tmp_path / "baseline.pt"


def test_env_config_is_plain_and_complete():
    from entropy_search.envs import ENV_DEFAULTS

    env_config = load_config({}).env_config()
    json.dumps(env_config)
    assert set(ENV_DEFAULTS) - {"warm_cache"} <= set(env_config)


def test_every_field_is_documented():
    text = schema_reference()
    for line in text.splitlines():
        assert line.split("#", 1)[1].strip(), f"undocumented: {line}"


def test_unreachable_target_is_an_error_before_the_search():
    import torch

    from entropy_search.envs import Budget
    from entropy_search.models import create_model
    from entropy_search.space import PruningSpace

    space = PruningSpace(create_model("digits_cnn").eval(), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ConfigError, match=r"search.flops_target: 0.005 cannot be met.*min_keep=0.5"):
        Budget(space, 0.005, 0.5).check()
    Budget(space, 0.5, 0.1).check()

"""The search config: defaults, YAML overrides, errors that name the key, the resolved config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from entropy_search.config import (
    SearchConfig,
    Section,
    config_from_dict,
    format_validation_error,
    load_config,
    schema_reference,
)
from entropy_search.errors import ConfigError


def test_defaults_are_valid():
    from entropy_search.problem import LABEL_FREE_REWARDS

    config = load_config({})
    assert config.search.reward in LABEL_FREE_REWARDS  # the default needs no labels
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
        ({"stop": {"iterations": None, "patience": None}}, "stop: set at least one of"),
        ({"agent": {"gamma": 1.2}}, "agent.gamma: must be in [0, 1]"),
        ({"output": {"checkpoint_every": 0}}, "output.checkpoint_every"),
        ({"search": {"bn_calibration": -1}}, "search.bn_calibration: must be >= 0"),
        ({"search": {"entropy": {"sample": 0}}}, "search.entropy.sample: must be in (0, 1]"),
        ({"data": {"heldout_fraction": 1.0}}, "data.heldout_fraction: Input should be less than 1, got 1.0"),
        ({"data": {"heldout_fraction": -0.1}}, "data.heldout_fraction:"),
        ({"data": {"heldout": ""}}, "data.heldout: String should have at least 1 character"),
        ({"data": {"heldout": 3}}, "data.heldout: Input should be a valid string"),
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


def test_a_key_given_twice_is_an_error_naming_the_key_and_both_lines(tmp_path, capsys):
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  name: digits_cnn\nseed: 1\nmodel:\n  name: resnet20\n")
    with pytest.raises(ConfigError, match=r"key 'model' is given twice \(lines 1 and 4\)"):
        load_config(twice)
    nested = tmp_path / "nested.yaml"
    nested.write_text("search:\n  flops_target: 0.5\n  flops_target: 0.3\n")
    with pytest.raises(ConfigError, match=r"key 'flops_target' is given twice \(lines 2 and 3\)"):
        load_config(nested)
    from entropy_search.cli import main

    assert main(["search", str(twice)]) == 2  # one line, exit 2, before anything is trained or started
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "given twice" in err and "Traceback" not in err
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: s\nbase: {}\nname: t\n")
    assert main(["sweep", str(sweep)]) == 2
    assert "key 'name' is given twice (lines 1 and 3)" in capsys.readouterr().err


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
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["search"]["reward"] == config.search.reward


def test_default_checkpoint_lives_in_the_output_dir(tmp_path):
    config = load_config({"output": {"dir": str(tmp_path)}})
    assert config.checkpoint_path() == tmp_path / "baseline.pt"


def test_the_configuration_reference_is_generated_from_the_schemas():
    """docs/configuration.md is what `python -m entropy_search.reference` writes (every key of a search and a sweep,
    with its type, default and description), so it cannot drift from the code. About 1 s."""
    # deferred: the sweep schema imports Ray (Tune)
    from entropy_search.reference import configuration_reference

    written = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    assert written == configuration_reference(), "docs/configuration.md is stale: run `make docs`"
    for key in ("`search.flops_target` | float (in (0, 1]) | `0.5`", "`selection.method` | one of: full, halving",
                "`axes.<key>.loguniform` | [low, high] of float or null", "`name` | str | required"):
        assert key in written, key


def test_every_field_is_documented():
    text = schema_reference()
    for line in text.splitlines():
        assert line.split("#", 1)[1].strip(), f"undocumented: {line}"


def test_heldout_set_is_optional_and_its_path_resolved(tmp_path, monkeypatch):
    """`data.heldout` (a split file or a folder of held-out images) defaults to None: the held-out split is drawn."""
    assert load_config({}).data.heldout is None
    monkeypatch.chdir(tmp_path)
    assert load_config({"data": {"heldout": "split.json"}}).data.heldout == str(tmp_path / "split.json")


def test_heldout_fraction_defaults_to_a_tenth():
    assert load_config({}).data.heldout_fraction == 0.1
    assert load_config({"data": {"heldout_fraction": 0.0}}).data.heldout_fraction == 0.0


def test_sections_are_strict_and_errors_are_formatted_for_any_schema():
    """`Section` and `format_validation_error` serve other schemas too (the sweep's): one line per error, the
    dotted key first, unknown keys listing the known ones."""
    from pydantic import ValidationError

    class Inner(Section):
        size: int = 1
        """A size."""

    class Outer(Section):
        inner: Inner = Inner()
        """A section."""

    with pytest.raises(ValidationError) as err:
        Outer.model_validate({"inner": {"sise": 2}})
    assert format_validation_error(err.value.errors()[0], Outer) == "inner.sise: unknown key (known keys: size)"
    with pytest.raises(ValidationError) as err:
        Outer.model_validate({"inner": {"size": "big"}})
    message = format_validation_error(err.value.errors()[0], Outer)
    assert message.startswith("inner.size: ") and message.endswith("got 'big'")


def test_config_from_dict_is_the_inverse_of_to_dict(tmp_path):
    config = load_config({"output": {"dir": str(tmp_path)}, "search": {"reward": "accuracy"}, "seed": 4})
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="seed: must be >= 0"):
        config_from_dict({"seed": -1})


# A shipped config names its model and data even where they are the schema's: they say what the experiment is.
IDENTITY_KEYS = {"model.name", "data.name"}


def _restated_defaults(values: dict, defaults: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in values.items():
        name = prefix + key
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            found += _restated_defaults(value, defaults[key], name + ".")
        elif key in defaults and defaults[key] == value and name not in IDENTITY_KEYS | {"name"}:
            found.append(name)
    return found


def test_shipped_configs_set_only_what_differs_from_the_schema():
    """Defaults live in the schema only: a shipped config that restates one keeps the old value when the schema
    changes (the example once kept lr 1e-4 after the default became 1e-3)."""
    from entropy_search.sweep.schema import SweepConfig  # deferred: the sweep schema imports Ray (Tune)

    repo = Path(__file__).resolve().parents[1]
    search_defaults = SearchConfig().model_dump(mode="json")
    problems = []
    for path in sorted((repo / "examples").glob("*.yaml")):
        problems += [f"{path.name}: {k}" for k in _restated_defaults(yaml.safe_load(path.read_text()), search_defaults)]
    for path in sorted((repo / "tune_configs").glob("*.yaml")):
        sweep = yaml.safe_load(path.read_text())
        base, axes = sweep.pop("base", {}), sweep.pop("axes", {})
        sweep_defaults = SweepConfig(name=sweep["name"]).model_dump(mode="json")
        problems += [f"{path.name}: {k}" for k in _restated_defaults(sweep, sweep_defaults)]
        problems += [f"{path.name}: base.{k}" for k in _restated_defaults(base, search_defaults)]
        problems += [f"{path.name}: base.{k} (an axis)" for k in axes if _has_dotted(base, k)]
    assert not problems, "keys at their schema default: " + ", ".join(problems)


def _has_dotted(data: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True

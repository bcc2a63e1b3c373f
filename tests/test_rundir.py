"""The run directory of a search (`entropy_search.rl.rundir`): the resume rule (what must not change, named by
its first differing key) and when a folder may be used, started over or continued."""

from __future__ import annotations

import os

import pytest
import yaml

from entropy_search.config import load_config
from entropy_search.errors import ConfigError
from entropy_search.rl.rundir import (
    CANDIDATES_FILE,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    RESULT_FILE,
    RESUME_KEYS,
    STATE_FILE,
    config_difference,
    prepare_output_dir,
    saved_config_difference,
)


def config_in(out, **overrides):
    return load_config({"output": {"dir": str(out)}}, overrides)


# ---------------------------------------------------------------- the resume rule


def test_config_difference_names_the_first_differing_key():
    before = config_in("/tmp/x").to_dict()
    assert config_difference(before, before) is None
    assert config_difference(before, config_in("/tmp/x", **{"search.flops_target": 0.4}).to_dict()) == (
        "search.flops_target (0.5 -> 0.4)")
    assert config_difference(before, config_in("/tmp/x", **{"search.entropy.bins": 8}).to_dict()) == (
        "search.entropy.bins (16 -> 8)")
    assert config_difference(before, config_in("/tmp/x", seed=3).to_dict()) == "seed (0 -> 3)"
    assert config_difference(before, config_in("/tmp/x", **{"agent.algorithm": "sac"}).to_dict()) == (
        "agent.algorithm ('ppo' -> 'sac')")
    # keys are compared in order (model, data, search, seed), and sorted within a section
    both = config_in("/tmp/x", **{"model.name": "resnet20", "seed": 2, "search.min_keep": 0.2}).to_dict()
    assert config_difference(before, both) == "model.name ('digits_cnn' -> 'resnet20')"
    two = config_in("/tmp/x", **{"search.round_to": 4, "search.min_keep": 0.2}).to_dict()
    assert config_difference(before, two) == "search.min_keep (0.1 -> 0.2)"
    assert RESUME_KEYS == ("model", "data", "search", "seed")


def test_what_may_change_on_resume_is_not_a_difference():
    before = config_in("/tmp/x").to_dict()
    later = config_in("/tmp/y", **{"stop.iterations": 50, "agent.lr": 0.01, "resources.num_env_runners": 0,
                                   "finetune.epochs": 1, "baselines.enabled": False}).to_dict()
    assert config_difference(before, later) is None


def test_a_section_missing_on_one_side_is_named():
    now = config_in("/tmp/x").to_dict()
    before = {k: v for k, v in now.items() if k != "data"}
    assert config_difference(before, now).startswith("data (None -> {")


def test_saved_config_difference(tmp_path):
    config = config_in(tmp_path)
    assert saved_config_difference(tmp_path, config) == "no saved config"
    (tmp_path / CONFIG_FILE).write_text("search: [unclosed\n")
    assert saved_config_difference(tmp_path, config) == "no saved config"
    config.save(tmp_path / CONFIG_FILE)
    assert saved_config_difference(tmp_path, config) is None
    assert saved_config_difference(tmp_path, config_in(tmp_path, **{"search.reward": "accuracy"})) == (
        f"search.reward ({config.search.reward!r} -> 'accuracy')")


def test_a_setting_added_to_the_schema_since_the_interrupted_run_does_not_block_its_resume(tmp_path):
    """A config saved by an older version lacks the newer settings: at their defaults they match; set otherwise,
    they are named."""
    saved = config_in(tmp_path).to_dict()
    del saved["search"]["budget"]
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(saved))
    assert saved_config_difference(tmp_path, config_in(tmp_path)) is None
    assert saved_config_difference(tmp_path, config_in(tmp_path, **{"search.budget": "latency", "search.latency_target": 0.5})) == (
        "search.budget ('macs' -> 'latency')")


# ---------------------------------------------------------------- using a folder


def previous_search(out):
    """What an interrupted search leaves in its folder."""
    (out / CHECKPOINT_DIR).mkdir(parents=True)
    (out / CHECKPOINT_DIR / STATE_FILE).write_text("{}")
    (out / CANDIDATES_FILE).write_text('{"id": 0}\n')
    (out / RESULT_FILE).write_text("{}")
    (out / "baseline.pt").write_bytes(b"weights")
    config_in(out).save(out / CONFIG_FILE)


def test_a_new_folder_is_created(tmp_path):
    out = tmp_path / "a" / "b"
    assert prepare_output_dir(config_in(out), resume=False, overwrite=False) == out and out.is_dir()
    assert prepare_output_dir(config_in(out), resume=True, overwrite=False) == out  # nothing to resume: fine


def test_an_output_dir_that_is_a_file_or_cannot_be_written_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(ConfigError, match=r"is a file, not a folder"):
            prepare_output_dir(config_in(out), resume=False, overwrite=False)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # root can write anywhere: nothing to test then
        with pytest.raises(ConfigError, match=r"cannot be written"):
            prepare_output_dir(config_in(locked / "run"), resume=False, overwrite=False)
    from entropy_search.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"output:\n  dir: {tmp_path / 'file'}\n")
    assert main(["search", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is a file, not a folder" in err and "Traceback" not in err


def test_a_previous_search_is_not_started_over_without_overwrite(tmp_path):
    previous_search(tmp_path)
    with pytest.raises(ConfigError, match=r"holds a previous search; pass --resume .* --overwrite"):
        prepare_output_dir(config_in(tmp_path), resume=False, overwrite=False)
    assert (tmp_path / CANDIDATES_FILE).exists() and (tmp_path / CHECKPOINT_DIR).is_dir()
    only_candidates = tmp_path / "other"
    only_candidates.mkdir()
    (only_candidates / CANDIDATES_FILE).write_text("")
    with pytest.raises(ConfigError, match="previous search"):
        prepare_output_dir(config_in(only_candidates), resume=False, overwrite=False)


def test_overwrite_deletes_the_previous_search_but_not_the_baseline(tmp_path):
    previous_search(tmp_path)
    prepare_output_dir(config_in(tmp_path), resume=False, overwrite=True)
    assert not (tmp_path / CHECKPOINT_DIR).exists()
    assert not (tmp_path / CANDIDATES_FILE).exists() and not (tmp_path / RESULT_FILE).exists()
    assert (tmp_path / "baseline.pt").read_bytes() == b"weights"


def test_resume_needs_the_same_problem(tmp_path):
    previous_search(tmp_path)
    assert prepare_output_dir(config_in(tmp_path, **{"stop.iterations": 99}), resume=True, overwrite=False) == tmp_path
    with pytest.raises(ConfigError, match=r"--resume: search.flops_target \(0.5 -> 0.3\) changed"):
        prepare_output_dir(config_in(tmp_path, **{"search.flops_target": 0.3}), resume=True, overwrite=False)
    assert (tmp_path / CANDIDATES_FILE).exists()
    (tmp_path / CONFIG_FILE).write_text("search: [unclosed\n")  # the saved settings are unreadable: said so
    with pytest.raises(ConfigError, match=r"--resume: .*config.yaml is not readable, so the interrupted run's "
                                          r"settings cannot be checked; restore it, or start over with --overwrite"):
        prepare_output_dir(config_in(tmp_path), resume=True, overwrite=False)

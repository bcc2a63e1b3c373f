"""Ray for the search and the sweep (`entropy_search.ray_runtime`): which cluster, the resource bundles of a
search, and a clear error instead of an endless wait when they do not fit."""

from __future__ import annotations

import logging

import pytest

from entropy_search.config import load_config
from entropy_search.errors import ConfigError

ray = pytest.importorskip("ray")

from entropy_search.ray_runtime import (  # noqa: E402
    check_fits,
    cluster_address,
    env_runner_bundles,
    quiet_ray_notices,
    search_bundles,
    start_ray,
)


def resources(**values):
    return load_config({"resources": values})


def test_cluster_address_prefers_the_config_then_the_environment(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert cluster_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert cluster_address(None) == "ray://head:10001"
    assert cluster_address("auto") == "auto"


def test_one_bundle_per_env_runner():
    config = resources(num_env_runners=3, num_cpus_per_env_runner=0.5, num_gpus_per_env_runner=0.25)
    assert env_runner_bundles(config) == [{"CPU": 0.5, "GPU": 0.25}] * 3
    assert env_runner_bundles(resources(num_env_runners=2, num_cpus_per_env_runner=2)) == [{"CPU": 2.0}] * 2
    assert env_runner_bundles(resources(num_env_runners=0)) == []
    # runners that reserve nothing need no bundle
    assert env_runner_bundles(resources(num_env_runners=2, num_cpus_per_env_runner=0)) == []


def test_a_search_bundles_its_own_process_first():
    config = resources(num_env_runners=3, num_cpus_per_env_runner=0.5, num_gpus_per_env_runner=0.25,
                       num_envs_per_env_runner=2)
    assert search_bundles(config) == [{"CPU": 1.0}] + [{"CPU": 0.5, "GPU": 0.25}] * 3
    assert search_bundles(config, cpus=2, gpus=0.5)[0] == {"CPU": 2.0, "GPU": 0.5}
    assert search_bundles(resources(num_env_runners=0), cpus=0.5) == [{"CPU": 0.5}]


def test_quiet_ray_notices_is_idempotent_and_drops_only_the_noise():
    quiet_ray_notices()
    quiet_ray_notices()
    target = logging.getLogger("ray.rllib.algorithms.algorithm_config")
    filters = [f for f in target.filters if type(f).__name__ == "_DropNoise"]
    assert len(filters) == 1
    noise = logging.LogRecord("x", logging.WARNING, "", 0, "You are running PPO on the new API stack! ...", None, None)
    useful = logging.LogRecord("x", logging.WARNING, "", 0, "env runner 3 failed", None, None)
    assert not filters[0].filter(noise) and filters[0].filter(useful)


def test_check_fits_on_a_two_cpu_ray(ray_local):
    assert start_ray() is False  # Ray already runs in this process: joined, not started again
    hints = {"CPU": "lower its CPUs", "GPU": "use CPUs"}
    check_fits([{"CPU": 1.0}, {"CPU": 1.0}], "a trial", hints)  # exactly what the cluster has
    with pytest.raises(ConfigError, match=r"^resources: 3 CPUs wanted by 3 env runners, the Ray cluster has 2; "
                                          r"lower its CPUs$"):
        check_fits([{"CPU": 1.0}] * 3, "3 env runners", hints)
    with pytest.raises(ConfigError, match=r"0.5 GPUs wanted by a trial, the Ray cluster has 0; use CPUs$"):
        check_fits([{"CPU": 1.0}, {"CPU": 0.5, "GPU": 0.5}], "a trial", hints)
    config = resources(num_env_runners=2, num_cpus_per_env_runner=1)
    check_fits(env_runner_bundles(config), "2 env runners", hints)
    with pytest.raises(ConfigError, match="3 CPUs wanted by a trial"):
        check_fits(search_bundles(config), "a trial", hints)

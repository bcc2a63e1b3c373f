"""The cluster path without a cluster: launcher configs, the docker image's pins, the helper scripts.

The real thing (`ray up` / `ray submit` / `ray down` over SSH on this machine) is tests/test_cluster_e2e.py.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from readme import readme_blocks

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CONFIGS = ["config.yaml", "local.yaml"]
COMMAND_LISTS = [
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
]


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _pins() -> dict[str, str]:
    """pyproject.toml's exact pins: {"ray": "2.60.0", "torch": ...} (extras dropped)."""
    pins = {}
    for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*", dep)
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


def _all_commands(config: dict) -> list[str]:
    commands = [c for key in COMMAND_LISTS for c in config.get(key, [])]
    for node_type in config.get("available_node_types", {}).values():
        commands += [c for key in COMMAND_LISTS for c in node_type.get(key, [])]
    return commands


# --- launcher configs -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_config_passes_rays_own_validation(name):
    """What `ray up` does before it contacts the provider: prepare_config, then validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_load(name)))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_validation_catches_a_bad_key():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load("config.yaml")
    config["available_node_types"]["worker.gpu"]["min_wokers"] = 1
    with pytest.raises(Exception, match="min_wokers"):
        validate_config(prepare_config(config))


def test_cloud_config_has_head_cpu_and_gpu_workers_on_the_projects_image():
    config = _load("config.yaml")
    types = config["available_node_types"]
    head = config["head_node_type"]
    workers = {name: t for name, t in types.items() if name != head}
    assert any(t["resources"].get("GPU", 0) > 0 for t in workers.values()), "no GPU worker type"
    assert any(t["resources"].get("GPU", 0) == 0 for t in workers.values()), "no CPU worker type"
    for name, t in workers.items():
        assert t["min_workers"] == 0 and t["max_workers"] > 0, name  # autoscaled from zero
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert config["docker"]["image"].endswith(f":{version}-cpu")
    for name, t in workers.items():
        image = t.get("docker", {}).get("worker_image", config["docker"]["image"])
        suffix = "gpu" if t["resources"].get("GPU", 0) else "cpu"
        assert image.endswith(f":{version}-{suffix}"), (name, image)


@pytest.mark.parametrize("name", CONFIGS)
def test_setup_installs_the_synced_checkout_and_starts_mlflow(name):
    config = _load(name)
    assert config["file_mounts"] == {"~/entropy-search": "."}
    assert config["rsync_filter"] == [".gitignore"]
    assert any("install" in c and "-e ~/entropy-search" in c for c in config["setup_commands"])
    start = config["head_start_ray_commands"]
    assert start[0] == "ray stop" and "ray start --head" in start[1]
    assert "cluster/start_mlflow.sh" in start[-1]
    assert (CLUSTER / "start_mlflow.sh").exists()
    # every process of the cluster finds the tracking server
    assert any("MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in c for c in config["head_setup_commands"])
    assert any("MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in c for c in config["worker_setup_commands"])
    assert "--port 5000" in start[-1]


@pytest.mark.parametrize("name", CONFIGS)
def test_commands_are_valid_bash(name):
    """Catches YAML eating a command's end (an unquoted ` #` starts a comment) among other slips."""
    for command in _all_commands(_load(name)):
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command!r}: {result.stderr}"


@pytest.mark.parametrize("name", CONFIGS)
def test_every_key_is_commented(name):
    """Each key of the block structure has a comment on the line above or on its own line."""
    text = (CLUSTER / name).read_text()
    lines = text.splitlines()
    flow, missing = 0, []
    for token in yaml.scan(text):
        if isinstance(token, (yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)):
            flow += 1
        elif isinstance(token, (yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)):
            flow -= 1
        elif isinstance(token, yaml.KeyToken) and flow == 0:
            n = token.start_mark.line
            above = next((line for line in reversed(lines[:n]) if line.strip()), "")
            if "#" not in lines[n] and not above.lstrip().startswith("#"):
                missing.append(lines[n].strip())
    assert not missing, f"keys without a comment in cluster/{name}: {missing}"


# --- docker image ---------------------------------------------------------------------------------


def _dockerfile_args() -> dict[str, str]:
    text = (REPO / "docker" / "Dockerfile").read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r"^ARG\s+(\w+)=(\S*)\s*$", text, re.M)}


def test_dockerfile_pins_match_pyproject():
    text = (REPO / "docker" / "Dockerfile").read_text()
    args = _dockerfile_args()
    pins = _pins()
    assert args["RAY_VERSION"] == pins["ray"]
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins["torchvision"]
    # The base image is the official Ray image of exactly that Ray and the pinned Python.
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}\$\{VARIANT\}\s*$", text, re.M)
    python = re.fullmatch(r"py(\d)(\d+)", args["PYTHON_TAG"])
    assert python, args["PYTHON_TAG"]
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = re.fullmatch(r">=\s*(\d+)\.(\d+)", requires)
    assert minimum and (int(python[1]), int(python[2])) >= (int(minimum[1]), int(minimum[2]))
    assert args["VARIANT"] == ""  # CPU by default; -gpu through --build-arg
    # Any other literal pin in the Dockerfile must agree with pyproject too.
    for name, version in re.findall(r"([A-Za-z][A-Za-z0-9_.-]*)==([0-9][^\s\"';]*)", text):
        if name.lower() in pins:
            assert version == pins[name.lower()], (name, version)
    # The other dependencies come from pyproject.toml itself.
    assert 'tomllib.load(open("/tmp/entropy-search/pyproject.toml"' in text


def test_dockerignore_keeps_the_context_small_but_complete():
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "mlruns", "**/__pycache__"} <= ignored
    assert not ignored & {"entropy_search", "pyproject.toml", "README.md", "cluster", "tune_configs"}


# --- helper scripts -------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["cluster/start_mlflow.sh", ".ci/install_sshd.sh"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0


def test_start_mlflow_refuses_without_ray(tmp_path):
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path), "HOME": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(CLUSTER / "start_mlflow.sh"), "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "Ray is not running" in result.stderr
    result = subprocess.run(
        ["bash", str(CLUSTER / "start_mlflow.sh"), "--bogus"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "unknown option" in result.stderr


@pytest.fixture(scope="module")
def submit_sweep():
    spec = importlib.util.spec_from_file_location("submit_sweep", CLUSTER / "submit_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_submit_sweep_finds_configs_in_the_synced_checkout(submit_sweep, tmp_path, monkeypatch):
    checkout = tmp_path / "entropy-search"
    (checkout / "tune_configs").mkdir(parents=True)
    (checkout / "tune_configs" / "quickstart.yaml").write_text("{}")
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    (elsewhere / "here.yaml").write_text("{}")
    monkeypatch.chdir(elsewhere)
    args = ["tune_configs/quickstart.yaml", "here.yaml", "--num-samples", "2", "missing.yaml", "/abs.yaml"]
    assert submit_sweep.resolve_paths(args, checkout) == [
        str(checkout / "tune_configs" / "quickstart.yaml"),
        "here.yaml",
        "--num-samples",
        "2",
        "missing.yaml",
        "/abs.yaml",
    ]


def test_submit_sweep_reads_the_commit_without_git(submit_sweep, tmp_path):
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    assert submit_sweep.git_commit(tmp_path / "nowhere") == ""
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "packed-refs").write_text("# pack-refs with: peeled\n" + "a" * 40 + " refs/heads/main\n")
    assert submit_sweep.git_commit(tmp_path) == "a" * 40
    (git / "refs" / "heads" / "main").write_text("b" * 40 + "\n")
    assert submit_sweep.git_commit(tmp_path) == "b" * 40
    (git / "HEAD").write_text("c" * 40 + "\n")  # detached
    assert submit_sweep.git_commit(tmp_path) == "c" * 40


def test_submit_sweep_stops_at_once_without_a_tracking_server(submit_sweep, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("RAY_ADDRESS", "")  # recorded, so the `auto` the script sets is undone after the test: a
    monkeypatch.delenv("RAY_ADDRESS")  # later search would join whatever Ray runs on this machine
    assert submit_sweep.main(["tune_configs/quickstart.yaml"]) == 2
    assert "no MLflow tracking server answers" in capsys.readouterr().err
    assert os.environ["RAY_ADDRESS"] == "auto"
    assert submit_sweep.check_tracking_server("file:///tmp/mlruns") is None


def test_submit_sweep_runs_the_real_sweep(submit_sweep, monkeypatch):
    """run_sweep hands its arguments to `entropy-search sweep`, and returns its exit status."""
    from entropy_search import cli

    calls = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 7)
    assert submit_sweep.run_sweep(["tune_configs/cluster_smoke.yaml", "--set", "seed=1"]) == 7
    assert calls == [["sweep", "tune_configs/cluster_smoke.yaml", "--set", "seed=1"]]
    assert (Path(submit_sweep.package_dir()) / "__init__.py").is_file()  # found without importing it


# --- the smoke sweep the end-to-end test submits ----------------------------------------------------


def test_cluster_smoke_sweep_is_small_and_valid(tmp_path, monkeypatch):
    from entropy_search.sweep import load_sweep_config, trial_bundles

    monkeypatch.chdir(tmp_path)  # storage_path is resolved against the current directory
    sweep = load_sweep_config(REPO / "tune_configs" / "cluster_smoke.yaml")
    assert sweep.name == "cluster_smoke"
    assert sweep.num_trials() == 2 and sweep.max_concurrent_trials == 2
    assert sweep.base["stop"]["iterations"] <= 2 and sweep.base["finetune"]["epochs"] <= 1
    assert sweep.base["model"]["name"] == "digits_cnn" and sweep.base["data"]["name"] == "digits"  # offline
    assert sweep.mlflow.log_model and sweep.mlflow.tracking_uri is None  # MLFLOW_TRACKING_URI: the head's
    # relative: the home directory on the head under `ray submit`, the job's working directory as a job
    assert sweep.storage_path == str(tmp_path / "runs" / "sweeps")
    # Both trials run at once on a 2-CPU head, and the baseline's task fits there too.
    need = sum(b.get("CPU", 0.0) for p in sweep.grid_points() for b in trial_bundles(sweep, p))
    assert need <= 2 and (sweep.resources.baseline_cpus or 1) <= 2
    assert not any(b.get("GPU") for p in sweep.grid_points() for b in trial_bundles(sweep, p))


def _e2e_commands() -> tuple[str, ...]:
    """The `ray` commands tests/test_cluster_e2e.py runs against cluster/local.yaml, as a user types them."""
    spec = importlib.util.spec_from_file_location("_e2e", REPO / "tests" / "test_cluster_e2e.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    assert e2e.SWEEP_CONFIG == "tune_configs/cluster_smoke.yaml" and (REPO / e2e.SWEEP_CONFIG).is_file()
    args = " ".join(e2e.SWEEP_ARGS)
    return ("ray up -y cluster/local.yaml", f"ray submit cluster/local.yaml {e2e.SUBMIT_SCRIPT} -- {args}",
            f"python {e2e.SUBMIT_SCRIPT} {args}", "ray down -y cluster/local.yaml")


def test_readme_runs_the_e2e_tests_commands():
    """docs/cluster.md's commands ("Tested") are those of tests/test_cluster_e2e.py."""
    guide = (CLUSTER.parent / "docs" / "cluster.md").read_text()
    e2e = _e2e_commands()
    for command in (*e2e, e2e[1].replace("cluster/local.yaml", "cluster/config.yaml")):
        assert command in guide, command


def test_the_readmes_cluster_commands_are_the_e2e_tests():
    """Every line of the README's "On a cluster" block is a command tests/test_cluster_e2e.py runs. Instant."""
    lines = [line.split("#", 1)[0].strip() for line in readme_blocks("On a cluster")["bash"].splitlines()]
    lines = [line for line in lines if line]
    assert len(lines) >= 3 and set(lines) <= set(_e2e_commands()), lines

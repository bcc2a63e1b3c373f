"""The cluster path end to end on this machine: `ray up` / `ray submit` / `ray down` of cluster/local.yaml
over real SSH, with the head node's MLflow tracking server, and nothing left running afterwards.

What is real: the `ray` CLI and its local provider, OpenSSH (an `sshd -i` of the test's own, started by
ssh as its ProxyCommand, so no daemon and no listening port), rsync of the checkout, the setup commands
of cluster/local.yaml (pip-installing the synced checkout into the node's environment), `ray start`,
cluster/start_mlflow.sh, cluster/submit_sweep.py joining the cluster, Ray Tune trials logging to the
tracking server, `ray job submit` through the dashboard, `ray down`.

What the test adapts to share this machine safely (the rest of cluster/local.yaml is used as written):
- provider and auth point at 127.0.0.1 through the test's sshd (key-only auth, a key made for the
  test); the cluster name is unique to the run;
- ports: free ones instead of 6379/5000/8265/52365; Ray's node address and MLflow's bind address
  are 127.0.0.1;
- the sshd gives the "node" its own HOME, TMPDIR and RAY_TMPDIR under a temporary directory, so the
  node's ~/.bashrc, ~/entropy-search, ~/mlflow and Ray's session files (including ray_current_cluster,
  which would turn later `ray.init(num_cpus=...)` calls into connections) never touch the real ones;
- the node's "project environment" (~/entropy-search-venv, which local.yaml creates with pip on a real
  host) is a thin venv layered over this test's environment, so setup installs the synced checkout into
  it without downloading anything and without touching this environment;
- its `ray` command only lets `ray stop` (run by `ray up` and `ray down`) stop this cluster's processes:
  plain `ray stop` kills every Ray process of the host, including other Ray instances of other tests.

Needs openssh-server, openssh-client and rsync (`.ci/install_sshd.sh`, which the test runs itself when
they are missing and it runs as root). Deselect with `-m "not cluster"`. Takes about two minutes on
two cores.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
LOCAL_YAML = REPO / "cluster" / "local.yaml"
SUBMIT_SCRIPT = "cluster/submit_sweep.py"
# Arguments after `--` of `ray submit`, as in README "On a cluster". With the stand-in sweep only the
# file's name matters; once cluster/submit_sweep.py runs the real `entropy-search sweep`, this must name
# a config small enough for a test (and it must exist).
SWEEP_ARGS = ["tune_configs/quickstart.yaml"]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
MARKER_VAR = "ES_CLUSTER_E2E"


def _have_tools() -> list[str]:
    missing = [t for t in ("ssh", "ssh-keygen", "rsync") if shutil.which(t) is None]
    if not os.access(SSHD, os.X_OK):
        missing.append("sshd")
    return missing


@pytest.fixture(scope="module")
def ssh_tools():
    missing = _have_tools()
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["bash", str(REPO / ".ci" / "install_sshd.sh")], check=True, timeout=600)
        missing = _have_tools()
    # CI (.ci/run) sets ENTROPY_SEARCH_REQUIRE_CLUSTER_TEST=1: there a missing prerequisite fails the test.
    give_up = pytest.fail if os.environ.get("ENTROPY_SEARCH_REQUIRE_CLUSTER_TEST") == "1" else pytest.skip
    if missing:
        give_up(f"needs {', '.join(missing)}: run .ci/install_sshd.sh (as root)")
    if os.geteuid() != 0:
        give_up("the test's sshd runs as root (it logs in as the current user with a key made for it)")
    # sshd refuses to start without its privilege-separation directory (not created in containers).
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _sub(commands: list[str], old: str, new: str) -> list[str]:
    """Replace `old` in the commands, insisting that it occurs (so that edits of local.yaml surface here)."""
    assert any(old in c for c in commands), f"{old!r} not found in {commands}"
    return [c.replace(old, new) for c in commands]


def _ours(marker: str) -> dict[int, str]:
    """Processes started for this test (anything whose environment carries the marker): pid -> cmdline."""
    found = {}
    needle = f"{MARKER_VAR}={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
    return {pid: cmd for pid, cmd in found.items() if cmd}  # zombies have no cmdline


def _layered_venv(dest: Path, marker: str) -> None:
    """A venv at `dest` that sees this test's environment beneath its own site-packages.

    pip installs into `dest` only (it declines to uninstall what lies outside it); console scripts are
    rewritten to run `dest`'s python; `ray stop` is limited to this test's processes.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True, timeout=120)
    here = sysconfig.get_paths()
    own = sysconfig.get_paths(vars={"base": str(dest), "platbase": str(dest)})
    Path(own["purelib"]).mkdir(parents=True, exist_ok=True)
    parents = dict.fromkeys([here["purelib"], here["platlib"]])
    (Path(own["purelib"]) / "_entropy_search_e2e_parent.pth").write_text("\n".join(parents) + "\n")
    python = dest / "bin" / "python"
    for script in BIN.iterdir():
        target = dest / "bin" / script.name
        if target.exists() or not script.is_file() or script.is_symlink():
            continue
        head = script.read_bytes()[:256]
        if not head.startswith(b"#!") or b"python" not in head.split(b"\n", 1)[0]:
            continue
        body = script.read_text().split("\n", 1)[1]
        target.write_text(f"#!{python}\n{body}")
        target.chmod(0o755)
    (dest / "bin" / "ray").write_text(
        f"""#!{python}
# tests/test_cluster_e2e.py: the `ray` CLI, except that `ray stop` stops only this test's Ray processes.
import sys

from ray.scripts import scripts

if sys.argv[1:2] == ["stop"]:
    psutil = scripts.psutil  # Ray's vendored copy
    _all = psutil.process_iter

    def _ours(*args, **kwargs):
        for proc in _all(*args, **kwargs):
            try:
                if proc.environ().get({MARKER_VAR!r}) == {marker!r}:
                    yield proc
            except psutil.Error:
                pass

    psutil.process_iter = _ours

sys.exit(scripts.main())
"""
    )


def _tail(log: Path, n: int = 80) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""


class Cluster:
    """The cluster of this module: cluster/local.yaml brought up on this machine by `ray up`."""

    def __init__(self, work: Path):
        self.work = work
        self.marker = str(work)  # the value of MARKER_VAR in the environment of every process we start
        self.name = f"es-e2e-{secrets.token_hex(4)}"
        self.logs = work / "logs"
        self.node_home, self.node_tmp, self.client_tmp = work / "home", work / "n", work / "c"
        self.ssh_dir = work / "ssh"
        self.yaml = work / "local.yaml"
        self.gcs, self.mlflow_port, self.dashboard, self.agent = _free_ports(4)
        self.tracking_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.env: dict[str, str] = {}
        self.is_down = False

    def prepare(self) -> None:
        for d in (self.logs, self.node_home, self.node_tmp, self.client_tmp):
            d.mkdir()
        # sshd of our own: key-only, our host key, our user key, the node's environment.
        self.ssh_dir.mkdir(mode=0o700)
        for name in ("host_key", "id_ed25519"):
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    self.name,
                    "-f",
                    str(self.ssh_dir / name),
                ],
                check=True,
                timeout=60,
            )
        shutil.copy(self.ssh_dir / "id_ed25519.pub", self.ssh_dir / "authorized_keys")
        user = getpass.getuser()
        node_env = {
            "HOME": self.node_home,
            "TMPDIR": self.node_tmp,
            "RAY_TMPDIR": self.node_tmp,
            "RAY_USAGE_STATS_ENABLED": "0",
            MARKER_VAR: self.marker,
        }
        sshd_config = self.ssh_dir / "sshd_config"
        sshd_config.write_text(
            "\n".join(
                [
                    f"HostKey {self.ssh_dir / 'host_key'}",
                    f"AuthorizedKeysFile {self.ssh_dir / 'authorized_keys'}",
                    "AuthenticationMethods publickey",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "PermitRootLogin prohibit-password",
                    f"AllowUsers {user}",
                    "StrictModes no",
                    "X11Forwarding no",
                    "PidFile none",
                    "LogLevel ERROR",
                    "SetEnv " + " ".join(f"{k}={v}" for k, v in node_env.items()),
                ]
            )
            + "\n"
        )
        subprocess.run([SSHD, "-t", "-f", str(sshd_config)], check=True, timeout=60)

        # The node's project environment (what local.yaml's first setup command creates on a real host).
        _layered_venv(self.node_home / "entropy-search-venv", self.marker)

        # cluster/local.yaml, filled in for this machine.
        config = yaml.safe_load(LOCAL_YAML.read_text())
        config["cluster_name"] = self.name
        config["provider"]["head_ip"] = "127.0.0.1"
        config["provider"]["worker_ips"] = []
        config["auth"] = {
            "ssh_user": user,
            "ssh_private_key": str(self.ssh_dir / "id_ed25519"),
            "ssh_proxy_command": f"{SSHD} -i -f {sshd_config}",
        }
        head = _sub(config["head_start_ray_commands"], "--port=6379", f"--port={self.gcs}")
        head = _sub(
            head,
            "--dashboard-host=127.0.0.1",
            f"--dashboard-host=127.0.0.1 --dashboard-port={self.dashboard}"
            f" --dashboard-agent-listen-port={self.agent} --node-ip-address=127.0.0.1",
        )
        head = _sub(
            head,
            "--host 0.0.0.0 --port 5000 --workers 2",
            f"--host 127.0.0.1 --port {self.mlflow_port} --workers 1",
        )
        config["head_start_ray_commands"] = head
        config["head_setup_commands"] = _sub(
            config["head_setup_commands"], "127.0.0.1:5000", f"127.0.0.1:{self.mlflow_port}"
        )
        config["worker_setup_commands"] = _sub(
            config["worker_setup_commands"], ":5000", f":{self.mlflow_port}"
        )
        config["worker_start_ray_commands"] = _sub(
            config["worker_start_ray_commands"], ":6379", f":{self.gcs}"
        )
        self.yaml.write_text(yaml.safe_dump(config, sort_keys=False))

        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        self.env.update(
            {
                "TMPDIR": str(self.client_tmp),
                "RAY_TMPDIR": str(self.client_tmp),
                "RAY_USAGE_STATS_ENABLED": "0",
                MARKER_VAR: self.marker,
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            }
        )

    def ray(self, *args: str, log: str, timeout: float = 600) -> None:
        """Run the `ray` CLI from the repository root, as the README does; fail with its output's end."""
        t0 = time.time()
        path = self.logs / f"{log}.log"
        with open(path, "w") as out:
            proc = subprocess.run(
                [RAY, *args],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                start_new_session=True,
            )
        print(f"ray {args[0]}{' ' + args[1] if args[0] == 'job' else ''}: {time.time() - t0:.0f} s")
        assert proc.returncode == 0, f"`ray {' '.join(args)}` failed (exit {proc.returncode}):\n{_tail(path)}"

    def down(self) -> None:
        self.is_down = True
        self.ray("down", "-y", str(self.yaml), log="down", timeout=300)

    def wait_for_no_processes(self, timeout: float = 60) -> dict[int, str]:
        deadline = time.time() + timeout
        while _ours(self.marker) and time.time() < deadline:
            time.sleep(1)
        return _ours(self.marker)


@pytest.fixture(scope="module")
def cluster(ssh_tools):
    # Short path: Ray's unix sockets live under RAY_TMPDIR and must stay under ~107 characters.
    c = Cluster(Path(tempfile.mkdtemp(prefix="es-e2e-", dir="/tmp")))
    address_file = Path("/tmp/ray/ray_current_cluster")
    address_file_before = address_file.exists()
    # Where `ray` keeps ssh's ControlMaster sockets (one folder per user, one per cluster below it).
    control_dir = Path(f"/tmp/ray_ssh_{_sha(getpass.getuser())[:10]}")
    control_dir_before = control_dir.exists()
    try:
        c.prepare()
        c.ray("up", "-y", str(c.yaml), log="up")
        yield c
    finally:
        try:
            if not c.is_down and c.yaml.exists():
                c.down()
        finally:
            for pid in c.wait_for_no_processes(timeout=20 if c.is_down else 0):
                os.kill(pid, signal.SIGKILL)  # only after a failure: processes this test started
            shutil.rmtree(control_dir / _sha(c.name)[:10], ignore_errors=True)
            if not control_dir_before:
                with contextlib.suppress(OSError):
                    control_dir.rmdir()  # only if empty
            if not address_file_before and address_file.exists():
                address_file.unlink()
                pytest.fail("the cluster left /tmp/ray/ray_current_cluster behind (removed it)")
            if os.environ.get("ES_KEEP_E2E_DIR"):
                print(f"kept {c.work}")
            else:
                shutil.rmtree(c.work, ignore_errors=True)


def test_ray_up_starts_the_head_tracking_server(cluster):
    import mlflow

    names = [e.name for e in mlflow.MlflowClient(cluster.tracking_uri).search_experiments()]
    assert names == ["Default"], names


def test_ray_submit_runs_the_sweep_and_logs_to_the_head(cluster):
    import mlflow

    cluster.ray("submit", str(cluster.yaml), SUBMIT_SCRIPT, "--", *SWEEP_ARGS, log="submit")
    runs = _finished_runs(mlflow.MlflowClient(cluster.tracking_uri))
    assert runs, (
        f"no finished MLflow run on the head's tracking server:\n{_tail(cluster.logs / 'submit.log')}"
    )
    stand_in = [r for r in runs if r.data.tags.get("entropy_search.stand_in") == "true"]
    if stand_in:  # the stand-in sweep also says where its code came from:
        assert len(stand_in) == 2
        synced = cluster.node_home / "entropy-search"
        commit = ""
        if (synced / ".git").exists() and shutil.which("git"):  # (this checkout may have moved on since)
            commit = subprocess.run(
                ["git", "-C", str(synced), "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
        for run in stand_in:
            # the checkout synced by `ray up` and installed by local.yaml's setup commands...
            source = run.data.tags["entropy_search.source"]
            assert source == str(synced / "entropy_search"), source
            # ...at the commit synced.
            if commit:
                assert run.data.tags["mlflow.source.git.commit"] == commit


def test_ray_job_submit_runs_the_sweep(cluster):
    import mlflow
    from ray._private.utils import get_dashboard_dependency_error

    if get_dashboard_dependency_error() is not None:
        pytest.skip("the Ray Jobs API needs the dashboard: ray[default] is not installed")
    client = mlflow.MlflowClient(cluster.tracking_uri)
    before = len(_finished_runs(client))
    # On a real cluster `ray dashboard <yaml>` forwards the head's 127.0.0.1:8265 here first.
    cluster.ray(
        "job",
        "submit",
        "--address",
        f"http://127.0.0.1:{cluster.dashboard}",
        "--working-dir",
        ".",
        "--",
        "python",
        SUBMIT_SCRIPT,
        *SWEEP_ARGS,
        log="job",
    )
    assert len(_finished_runs(client)) > before, "the Ray job logged no MLflow run"


def test_ray_down_leaves_no_process(cluster):
    cluster.down()
    # ssh's ControlPersist keeps the connection masters `ray` started for 10 s after their last use.
    left = cluster.wait_for_no_processes(timeout=60)
    assert not left, "processes left after `ray down`:\n" + "\n".join(f"{p} {c}" for p, c in left.items())
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", cluster.mlflow_port)) != 0, "MLflow still listens"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", cluster.gcs)) != 0, "Ray's GCS still listens"


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _finished_runs(client) -> list:
    runs = []
    for experiment in client.search_experiments():
        runs += [r for r in client.search_runs([experiment.experiment_id]) if r.info.status == "FINISHED"]
    return runs

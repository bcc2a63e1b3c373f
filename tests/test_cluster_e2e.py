"""The cluster path end to end on this machine: `ray up` / `ray submit` / `ray down` of cluster/local.yaml
over real SSH on two nodes (a head and a worker), with the head node's MLflow tracking server, and nothing
left running afterwards.

What is real: the `ray` CLI and its local provider, OpenSSH (an `sshd -i` of the test's own, started by
ssh as its ProxyCommand, so no daemon and no listening port), rsync of the checkout to both nodes, the
setup commands of cluster/local.yaml (pip-installing the synced checkout into each node's environment),
`ray start` on the head and, by the head's autoscaler over SSH, on the worker, cluster/start_mlflow.sh,
cluster/submit_sweep.py joining the cluster and running the real
`entropy-search sweep tune_configs/cluster_smoke.yaml` (2 tiny trials: baseline training, RL search,
baselines, fine-tuning) on the worker node, its parent and child runs, metrics, artifacts and models on the
head's tracking server, `ray job submit` of the same sweep through the dashboard, `ray down`.

What the test adapts to share this machine safely (the rest of cluster/local.yaml is used as written):
- provider and auth point at 127.0.0.1 (the head) and 127.0.0.2 (the worker), two addresses of the
  loopback interface, through the test's sshd (key-only auth, a key made for the test); the cluster name
  is unique to the run;
- the head starts with `--num-cpus=0` (a common set-up: the head does no work), so the trials and their
  finalists' fine-tunes run on the worker, which the test checks in each trial's result.json; the worker
  has 2 CPUs, its own Ray temp dir (`--temp-dir`) and each node a 300 MiB object store;
- ports: free ones below the kernel's ephemeral range instead of 6379/5000/8265, and 0 (the agent's
  own choice) for the dashboard agent's 52365; Ray's node address and MLflow's bind address are
  127.0.0.1;
- the sshd gives each "node" its own HOME, TMPDIR and RAY_TMPDIR under a temporary directory, so the
  node's ~/.bashrc, ~/entropy-search, ~/mlflow, the sweeps' ~/runs and Ray's session files (including
  ray_current_cluster, which would turn later `ray.init(num_cpus=...)` calls into connections) never
  touch the real ones; the node's ~/.bashrc starts with `cd "$HOME"` (sshd itself starts in the real
  user's home);
- the node's "project environment" (~/entropy-search-venv, which local.yaml creates with pip on a real
  host) is a thin venv layered over this test's environment, so setup installs the synced checkout into
  it without downloading anything and without touching this environment;
- its `ray` command only lets `ray stop` (run by `ray up`, the worker's start and `ray down`) stop this
  cluster's processes of that node: plain `ray stop` kills every Ray process of the host, including other
  Ray instances of other tests (and here the other node's).

Needs openssh-server, openssh-client and rsync (`.ci/install_sshd.sh`, which the test runs itself when
they are missing and it runs as root). Deselect with `-m "not cluster"`. Takes about four minutes on
two cores (each of the two sweeps about one).
"""

from __future__ import annotations

import contextlib
import csv
import getpass
import json
import os
import random
import re
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
from ports import listening

from entropy_search.config import load_config

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
LOCAL_YAML = REPO / "cluster" / "local.yaml"
SUBMIT_SCRIPT = "cluster/submit_sweep.py"
# Arguments after `--` of `ray submit` and of the Ray job's `python cluster/submit_sweep.py`, as in
# docs/cluster.md ("Tested"): the smallest real sweep (`entropy-search sweep <these>`).
SWEEP_CONFIG = "tune_configs/cluster_smoke.yaml"
SWEEP_ARGS = [SWEEP_CONFIG]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH = shutil.which("ssh") or "/usr/bin/ssh"
MARKER_VAR = "ES_CLUSTER_E2E"
NODE_VAR = "ES_CLUSTER_E2E_NODE"
HEAD_IP, WORKER_IP = "127.0.0.1", "127.0.0.2"  # two addresses of the loopback interface: two hosts for Ray
OBJECT_STORE_BYTES = 300 * 1024**2  # each node's object store (the test's share of a machine's memory)


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
    """n distinct ports free on every address, below the kernel's ephemeral range.

    A port the kernel handed out by `bind(0)` lies in the range it also hands to outgoing connections:
    between choosing it and the server binding it, one of the many connections of `ray up` (ssh, pip,
    Ray's own gRPC clients) can take it, and the server's bind fails. Below that range only listeners
    that name their port live.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(max(1024, low - 12000), low))
    random.Random(secrets.randbits(32)).shuffle(candidates)
    ports: list[int] = []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"fewer than {n} free ports below {low}")


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


def _layered_venv(dest: Path, marker: str, node: str) -> None:
    """A venv at `dest` that sees this test's environment beneath its own site-packages.

    pip installs into `dest` only (it declines to uninstall what lies outside it); console scripts are
    rewritten to run `dest`'s python; `ray stop` is limited to this test's processes on this node (`node`:
    the value of NODE_VAR its sshd gives it), so a worker's `ray start` does not stop the head.
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
# tests/test_cluster_e2e.py: the `ray` CLI, except that `ray stop` stops only this test's Ray processes of
# this node.
import sys

from ray.scripts import scripts

if sys.argv[1:2] == ["stop"]:
    psutil = scripts.psutil  # Ray's vendored copy
    _all = psutil.process_iter

    def _ours(*args, **kwargs):
        for proc in _all(*args, **kwargs):
            try:
                env = proc.environ()
                if env.get({MARKER_VAR!r}) == {marker!r} and env.get({NODE_VAR!r}) == {node!r}:
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
        self.worker_home, self.worker_tmp = work / "home2", work / "n2"
        self.homes = {HEAD_IP: (self.node_home, self.node_tmp), WORKER_IP: (self.worker_home, self.worker_tmp)}
        self.ssh_dir = work / "ssh"
        # ssh reaches each "host" through an sshd of the test's, `sshd -i` on its own config (%h: the address)
        self.proxy_command = f"{SSHD} -i -f {self.ssh_dir}/sshd_config_%h"
        self.yaml = work / "local.yaml"
        self.gcs, self.mlflow_port, self.dashboard = _free_ports(3)
        self.tracking_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.env: dict[str, str] = {}
        self.is_down = False

    def prepare(self) -> None:
        for d in (self.logs, self.node_home, self.node_tmp, self.worker_home, self.worker_tmp, self.client_tmp):
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
        # One sshd config per host address (ssh's ProxyCommand picks it by %h): each "host" has its own home,
        # temporary folders and project environment.
        for ip, (home, tmp) in self.homes.items():
            node_env = {
                "HOME": home,
                "TMPDIR": tmp,
                "RAY_TMPDIR": tmp,
                "RAY_USAGE_STATS_ENABLED": "0",
                MARKER_VAR: self.marker,
                NODE_VAR: ip,
            }
            sshd_config = self.ssh_dir / f"sshd_config_{ip}"
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

            # sshd starts every session in the home directory of the user's passwd entry (the real one here,
            # whatever HOME says), a real host in the node's home: there `ray submit` runs the script, and
            # the sweep's relative storage_path resolves. Ray runs every remote command after
            # `source ~/.bashrc`, so the node's ~/.bashrc moves there (local.yaml's setup appends below).
            (home / ".bashrc").write_text('cd "$HOME"  # tests/test_cluster_e2e.py: see prepare()\n')

            # The node's project environment (what local.yaml's first setup command creates on a real host).
            _layered_venv(home / "entropy-search-venv", self.marker, ip)
            # Ray drops `auth.ssh_proxy_command` from the head's copy of the config (a real head reaches its
            # workers on port 22); here no sshd listens, so the head's `ssh` (found first on its PATH, as
            # `rsync -e ssh` finds it too) goes through the same ProxyCommand as `ray up` did. It also
            # reads the node's key (`-i ~/ray_bootstrap_key.pem`) from the node's HOME: ssh itself expands
            # `~` to the passwd entry's home, which on a real host is HOME.
            ssh = home / "entropy-search-venv" / "bin" / "ssh"
            ssh.write_text(
                "#!/bin/sh\n# tests/test_cluster_e2e.py: ssh through the test's sshd (see prepare())\n"
                # only the identity file's `~` (rsync passes the remote path `~/...` as an argument too)
                "key=\nfor arg do\n  shift\n"
                "  if [ -n \"$key\" ]; then case $arg in '~/'*) arg=$HOME/${arg#'~/'} ;; esac; fi\n"
                '  if [ "$arg" = -i ]; then key=1; else key=; fi\n  set -- "$@" "$arg"\ndone\n'
                f'exec {SSH} -o "ProxyCommand={self.proxy_command}" "$@"\n'
            )
            ssh.chmod(0o755)

        # cluster/local.yaml, filled in for this machine.
        config = yaml.safe_load(LOCAL_YAML.read_text())
        config["cluster_name"] = self.name
        config["provider"]["head_ip"] = HEAD_IP
        config["provider"]["worker_ips"] = [WORKER_IP]
        config["auth"] = {
            "ssh_user": user,
            "ssh_private_key": str(self.ssh_dir / "id_ed25519"),
            "ssh_proxy_command": self.proxy_command,
        }
        head = _sub(config["head_start_ray_commands"], "--port=6379", f"--port={self.gcs}")
        head = _sub(
            head,
            "--dashboard-host=127.0.0.1",
            # The dashboard agent (which runs Ray jobs) binds a port of its own choosing and
            # publishes it in the GCS, where the Jobs API looks it up.
            f"--dashboard-host=127.0.0.1 --dashboard-port={self.dashboard}"
            f" --dashboard-agent-listen-port=0 --node-ip-address={HEAD_IP}"
            # the head does no work (a common set-up): every trial, and its fine-tunes, runs on the worker
            f" --num-cpus=0 --object-store-memory={OBJECT_STORE_BYTES}",
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
        worker = _sub(config["worker_start_ray_commands"], ":6379", f":{self.gcs}")
        config["worker_start_ray_commands"] = _sub(
            worker,
            "--disable-usage-stats",
            f"--disable-usage-stats --node-ip-address={WORKER_IP} --dashboard-agent-listen-port=0"
            f" --num-cpus=2 --object-store-memory={OBJECT_STORE_BYTES}"
            # its own session folder: a joining node takes the head's temp dir otherwise, and on one machine
            # the two nodes would share (and garbage-collect) each other's runtime environments
            f" --temp-dir={self.worker_tmp / 'ray'}",
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

    def ray(self, *args: str, log: str, timeout: float = 600, attempts: int = 1) -> None:
        """Run the `ray` CLI from the repository root, as docs/cluster.md does; fail with its output's end.

        With attempts > 1, a run that Ray answers with "please try again later" (the Jobs API while the
        head's job agent is not yet known to it) is run again after a pause, as its message asks.
        """
        t0 = time.time()
        path = self.logs / f"{log}.log"
        for attempt in range(1, attempts + 1):
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
            if proc.returncode == 0 or "try again later" not in path.read_text(errors="replace"):
                break
            if attempt < attempts:
                print(f"ray {args[0]}: attempt {attempt} told to try again later:{self.ray_errors()}")
                time.sleep(15)
        print(f"ray {args[0]}{' ' + args[1] if args[0] == 'job' else ''}: {time.time() - t0:.0f} s")
        assert proc.returncode == 0, (
            f"`ray {' '.join(args)}` failed (exit {proc.returncode}):\n{_tail(path)}{self.ray_errors()}"
        )

    def wait_for_worker(self, timeout: float = 600) -> None:
        """Wait until the worker node, which the head's autoscaler starts over SSH after `ray up` returns (sync,
        setup, `ray start`), is alive in the cluster; fail with its updater's log if it never joins."""
        deadline = time.time() + timeout
        listed = ""
        while time.time() < deadline:
            listed = subprocess.run(
                [RAY, "list", "nodes", "--address", f"http://127.0.0.1:{self.dashboard}", "--format", "json"],
                cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120,
            ).stdout
            with contextlib.suppress(ValueError):
                # (the head may publish the host's address rather than --node-ip-address)
                alive = [n["node_ip"] for n in json.loads(listed) if n["state"] == "ALIVE"]
                if len(alive) == 2 and WORKER_IP in alive:
                    print(f"worker node joined after {timeout - (deadline - time.time()):.0f} s")
                    return
            time.sleep(3)
        updater = self.node_tmp / "ray" / "session_latest" / "logs" / "monitor.log"
        pytest.fail(f"the worker node {WORKER_IP} did not join within {timeout:.0f} s; nodes: {listed}\n"
                    f"{_tail(updater)}{self.ray_errors()}")

    def ray_errors(self) -> str:
        """The errors in the node's Ray logs of the dashboard and its agent (which runs Ray jobs)."""
        logs = self.node_tmp / "ray" / "session_latest" / "logs"
        found = []
        for name in ("dashboard_agent.log", "dashboard_JobHead.log", "dashboard.log", "raylet.out"):
            path = logs / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()
                errors = [line for line in lines if re.search(r"ERROR|Exception|Failed|Traceback", line)]
                if errors:
                    found.append(f"--- {path}:\n" + "\n".join(errors[-15:]))
        return "\n" + "\n".join(found) if found else ""

    def down(self) -> None:
        """`ray down`, then `ray stop` on the worker over SSH, as docs/cluster.md says for owned machines:
        with Ray's local provider `ray down` stops Ray on the head only, and a worker's log monitor outlives
        its raylet."""
        self.is_down = True
        try:
            self.ray("down", "-y", str(self.yaml), log="down", timeout=300)
        finally:
            with open(self.logs / "worker_stop.log", "w") as out:
                stopped = subprocess.run(
                    [SSH, "-i", str(self.ssh_dir / "id_ed25519"), "-o", f"ProxyCommand={self.proxy_command}",
                     "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                     f"{getpass.getuser()}@{WORKER_IP}", "bash --login -c 'source ~/.bashrc; ray stop'"],
                    env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=120,
                )
            assert stopped.returncode == 0, f"`ray stop` on the worker failed:\n{_tail(self.logs / 'worker_stop.log')}"

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
        c.wait_for_worker()
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
    log = cluster.logs / "submit.log"
    client = mlflow.MlflowClient(cluster.tracking_uri)
    sweeps = _sweep_runs(client)
    assert len(sweeps) == 1, f"expected one sweep run, got {len(sweeps)}:\n{_tail(log)}"
    parent = sweeps[0]
    # `ray submit` runs the script in the node's home: the sweep's relative storage_path lands there...
    sweep_dir = cluster.node_home / "runs" / "sweeps" / _smoke()["name"]
    assert os.path.realpath(parent.data.tags["entropy_search.sweep_dir"]) == os.path.realpath(sweep_dir)
    assert (sweep_dir / "summary" / "summary.md").is_file()
    # ...with the code that `ray up` synced to ~/entropy-search and local.yaml's setup installed...
    synced = cluster.node_home / "entropy-search"
    assert f"package={synced / 'entropy_search'}" in log.read_text(), _tail(log)
    # ...at the commit synced (the checkout may have moved on since: ask the synced copy).
    commit = ""
    if (synced / ".git").exists() and shutil.which("git"):
        commit = subprocess.run(
            ["git", "-C", str(synced), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    _check_sweep(client, parent, cluster.work / "downloads" / "submit", log, commit=commit)
    # The artifacts went through the tracking server (--serve-artifacts) to the head's store.
    stored = cluster.node_home / "mlflow" / "artifacts"
    assert any(p.name == "candidates.csv" for p in stored.rglob("candidates.csv")), f"nothing in {stored}"


def test_ray_job_submit_runs_the_sweep(cluster):
    import mlflow
    from ray._private.utils import get_dashboard_dependency_error

    if get_dashboard_dependency_error() is not None:
        pytest.skip("the Ray Jobs API needs the dashboard: ray[default] is not installed")
    client = mlflow.MlflowClient(cluster.tracking_uri)
    before = {r.info.run_id for r in _sweep_runs(client)}
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
        attempts=3,
    )
    log = cluster.logs / "job.log"
    new = [r for r in _sweep_runs(client) if r.info.run_id not in before]
    assert len(new) == 1, f"the Ray job made {len(new)} sweep runs:\n{_tail(log)}"
    # The job runs the code of the working directory it shipped, and starts the sweep in it.
    package = re.search(r"package=(\S+)", log.read_text())
    assert package and "working_dir_files" in package[1], _tail(log)
    assert "working_dir_files" in new[0].data.tags["entropy_search.sweep_dir"]
    _check_sweep(client, new[0], cluster.work / "downloads" / "job", log)


def test_ray_down_leaves_no_process(cluster):
    cluster.down()
    # ssh's ControlPersist keeps the connection masters `ray` started for 10 s after their last use.
    left = cluster.wait_for_no_processes(timeout=60)
    assert not left, "processes left after `ray down`:\n" + "\n".join(f"{p} {c}" for p, c in left.items())
    assert not listening(cluster.mlflow_port), "MLflow still listens"
    assert not listening(cluster.gcs), "Ray's GCS still listens"


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _smoke() -> dict:
    return yaml.safe_load((REPO / SWEEP_CONFIG).read_text())


def _sweep_runs(client) -> list:
    """The parent runs of the smoke sweep on the tracking server (every status), oldest first."""
    experiment = client.get_experiment_by_name(_smoke()["name"])
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`entropy_search.role` = 'sweep'",
        order_by=["attributes.start_time ASC"],
    )


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


def _check_sweep(client, parent, downloads: Path, log: Path, commit: str = "") -> None:
    """A finished smoke sweep on the tracking server: its parent run with the summary, one finished child
    run per trial with the search's metrics (the best candidate within the FLOPs budget), the candidate
    table, the best policy, the pruned model, and its finalists fine-tuned on the worker node."""
    smoke = _smoke()
    rewards = smoke["axes"]["search.reward"]
    resolved = load_config(smoke["base"])  # the config sets only what differs from the schema
    target = resolved.search.flops_target
    iterations = resolved.stop.iterations
    where = f"sweep run {parent.info.run_id}; end of {log.name}:\n{_tail(log)}"

    assert parent.info.status == "FINISHED", where
    assert parent.data.tags["entropy_search.sweep"] == smoke["name"]
    assert parent.data.metrics["trials"] == len(rewards), where
    assert parent.data.metrics["trials_finished"] == len(rewards), where
    have = _artifacts(client, parent.info.run_id)
    assert {"summary.csv", "summary.md", "summary.json", "comparison.png"} <= have, have

    trials = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    assert sorted(json.loads(t.data.tags["entropy_search.axes"])["search.reward"] for t in trials) == sorted(
        rewards
    ), where
    for trial in trials:
        run_id, name = trial.info.run_id, trial.info.run_name
        assert trial.info.status == "FINISHED", f"trial {name}: {trial.info.status}; {where}"
        assert trial.data.tags["entropy_search.role"] == "trial"
        if commit:
            assert trial.data.tags["mlflow.source.git.commit"] == commit, name
            assert parent.data.tags["mlflow.source.git.commit"] == commit
        assert trial.data.params["search.flops_target"] == str(target)
        m = trial.data.metrics
        # The best candidate meets the FLOPs budget, and was fine-tuned and tested.
        assert 0 < m["best_macs_ratio"] <= target + 1e-9, (name, m["best_macs_ratio"])
        assert 0 < m["macs_ratio"] <= target + 1e-9, (name, m["macs_ratio"])
        assert 0 <= m["test_accuracy"] <= 1, (name, m["test_accuracy"])
        assert m["cost_iterations"] == iterations, name
        steps = [x.step for x in client.get_metric_history(run_id, "best_reward")]
        assert steps == list(range(1, iterations + 1)), (name, steps)  # one point per iteration
        for baseline in ("uniform", "random"):
            assert f"{baseline}_test_accuracy" in m, (name, baseline)
        have = _artifacts(client, run_id)
        assert {"candidates.csv", "policy.json", "scatter.png"} <= have, (name, have)
        assert {"search/result.json", "search/config.yaml"} <= _artifacts(client, run_id, "search"), name
        # Downloaded back through the server: the candidate table and the delivered policy.
        dest = downloads / name
        dest.mkdir(parents=True)
        with open(client.download_artifacts(run_id, "candidates.csv", str(dest)), newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == m["cost_candidates"] > 0, (name, len(rows))
        assert min(float(r["macs_ratio"]) for r in rows) <= target + 1e-9
        policy = json.loads(
            Path(client.download_artifacts(run_id, "policy.json", str(dest))).read_text()
        )
        assert policy["policy"] and policy["flops_target"] == target, (name, policy)
        assert policy["macs_ratio"] == pytest.approx(m["macs_ratio"]), name
        # The head does no work: the trial ran on the worker node, and so did its finalists' fine-tunes.
        result = json.loads(
            Path(client.download_artifacts(run_id, "search/result.json", str(dest))).read_text()
        )
        finals = [result["delivered"], *result["top_k"], *(b["final"] for b in result["baselines"].values()
                                                           if b.get("final"))]
        where = {f["finetuned_on"]["node_ip"] for f in finals if f.get("finetuned_on")}  # halving: the delivered only
        assert where == {WORKER_IP}, (name, finals)
        # The pruned, fine-tuned model (mlflow.pytorch), a logged model of the trial's run.
        models = client.search_logged_models(
            [parent.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
        )
        assert len(models) == 1 and models[0].name == "pruned_model", (name, models)
        assert str(models[0].status).endswith("READY"), (name, models[0].status)
        assert "MLmodel" in {a.path for a in client.list_logged_model_artifacts(models[0].model_id)}, name

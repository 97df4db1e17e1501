"""`ray job submit` end to end, as docs/deploying.md runs it: a real Ray head started with
`ray start` on loopback (token authentication on), the real `ray job submit` / `status` / `logs` CLI.

The head runs in the foreground (`ray start --block`) as a child of this module, on free ports and in its
own temp dir, so it never becomes the default cluster of other processes. Teardown sends it SIGTERM
(it stops the Ray processes it started) and kills, by pid, whatever of its process tree is left.
`ray stop` is not used: it ends every Ray process on the machine, other test sessions' included.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import stop_process_tree

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of this interpreter
SHORT_RUN = ["data.train_limit=300", "data.test_limit=100", "model.num_blocks=2", "cluster.num_workers=2",
             "train.epochs=1"]
EXCLUDES = '{"excludes": [".git"]}'  # docs/deploying.md's --runtime-env-json; .gitignore covers runs/ and data/


@dataclass
class Head:
    address: str              # job server (dashboard) URL, what --address takes
    metrics_url: str
    env: dict                 # what a user's shell has: RAY_AUTH_MODE=token, token in ~/.ray/auth_token
    temp_dir: Path
    proc: subprocess.Popen
    gcs: str                  # the GCS address ray.init() joins (RAY_ADDRESS for a driver on this machine)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ray(head: Head, *args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 60):
    return subprocess.run([*RAY, *args], capture_output=True, text=True, timeout=timeout,
                          env=head.env if env is None else env, cwd=cwd or REPO)


def _job_status(head: Head, job_id: str) -> str:
    p = _ray(head, "job", "status", job_id, "--address", head.address)
    out = p.stdout + p.stderr
    m = re.search(rf"Job '{re.escape(job_id)}' (succeeded|failed|was stopped)", out)
    if m:
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[m.group(1)]
    m = re.search(rf"Status for job '{re.escape(job_id)}': (\w+)", out)
    assert m, f"`ray job status` said:\n{out}"
    return m.group(1)


def _wait_for_job(head: Head, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = _job_status(head, job_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        if time.monotonic() > deadline:
            _ray(head, "job", "stop", job_id, "--address", head.address)
            pytest.fail(f"job {job_id} still {status} after {timeout}s")
        time.sleep(1)


def _job_logs(head: Head, job_id: str) -> str:
    p = _ray(head, "job", "logs", job_id, "--address", head.address)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _submit(head: Head, job_id: str, entrypoint: list[str], *options: str, cwd: Path | None = None) -> None:
    p = _ray(head, "job", "submit", "--address", head.address, "--submission-id", job_id, "--no-wait",
             *options, "--", *entrypoint, cwd=cwd)
    assert p.returncode == 0, p.stdout + p.stderr


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _start_head(auth_mode: str):
    """A `ray start --head --block` on loopback with its own ports and temp dir, RAY_AUTH_MODE=auth_mode; yields
    its Head and stops what it started afterwards."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE=auth_mode, PYTHONUNBUFFERED="1")
    # As docs/deploying.md says: make sure a token exists (~/.ray/auth_token; kept if there is one already).
    token = subprocess.run([*RAY, "get-auth-token", "--generate"], capture_output=True, text=True, env=env,
                           timeout=60)
    assert token.returncode == 0 and token.stdout.strip(), token.stderr
    # A short private temp dir (Unix socket paths are limited to ~107 bytes) keeps this head out of /tmp/ray,
    # where `ray.init()` elsewhere would look for a cluster to join.
    temp_dir = Path(tempfile.mkdtemp(prefix="npjob", dir="/tmp"))
    gcs, dash, metrics, client, node_mgr, obj_mgr, agent_http, agent_grpc, rt_env = _free_ports(9)
    cmd = [*RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
           f"--ray-client-server-port={client}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_env}",
           "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    log = open(temp_dir / "ray_start.log", "w")
    # Started in the repository root, like the image's WORKDIR: a job without a working_dir runs there.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    h = Head(f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{metrics}/metrics", env, temp_dir, proc,
             f"127.0.0.1:{gcs}")
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 90
        while _ray(h, "job", "list", "--address", h.address).returncode != 0:
            assert proc.poll() is None, (temp_dir / "ray_start.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the job server did not come up in 90s"
            time.sleep(1)
        yield h
    finally:
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        stop_process_tree(proc, tree)  # `ray start --block` stops what it started on SIGTERM
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not [p for p in tree if _alive(p)], "Ray processes of the head were left running"


@pytest.fixture(scope="module")
def head():
    yield from _start_head("token")


def test_a_run_refuses_to_join_a_cluster_without_token_authentication(tmp_path):
    """Bug seen: joining a head whose token authentication was off passed the check (it read only the driver's
    own environment) and failed later with ActorDiedError. The cluster's own mode is asked now: one line, exit 2,
    nothing written; cluster.allow_unauthenticated=true goes on with a warning."""
    for h in _start_head("disabled"):
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"} | {"RAY_ADDRESS": h.gcs,
                                                                                "PYTHONUNBUFFERED": "1"}
        run_dir = tmp_path / "run"
        p = subprocess.run([sys.executable, "-m", "noprop_dist.run", "--set", f"run.dir={run_dir}", "train.epochs=1",
                            "data.train_limit=200", "data.test_limit=50", "model.num_blocks=2",
                            "cluster.num_workers=1"], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert p.returncode == 2 and len(errors) == 1, (p.returncode, p.stderr[-3000:])
        assert "the Ray cluster joined runs with token authentication off" in errors[0], errors
        assert not run_dir.exists()


def test_job_server_requires_the_token(head):
    no_mode = {k: v for k, v in head.env.items() if k != "RAY_AUTH_MODE"}
    p = _ray(head, "job", "list", "--address", head.address, env=no_mode)
    assert p.returncode != 0 and "Missing authentication token" in p.stderr, p.stderr[-2000:]
    p = _ray(head, "job", "list", "--address", head.address, env={**head.env, "RAY_AUTH_TOKEN": "x" * 32})
    assert p.returncode != 0 and "Invalid authentication token" in p.stderr, p.stderr[-2000:]
    assert _ray(head, "job", "list", "--address", head.address).returncode == 0


def test_submitted_training_succeeds_and_writes_summary(head, tmp_path):
    # The working dir is a copy of this checkout with what must not be uploaded added: a .git directory,
    # an old run and a data file (.gitignore'd). The command is docs/deploying.md's, run from the repository root.
    src = tmp_path / "checkout"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "runs", "data", ".venv", "*.egg-info",
                                                            "__pycache__", ".pytest_cache"))
    for probe in (".git/objects/probe", "runs/old/checkpoints/probe.pt", "data/probe.npy"):
        (src / probe).parent.mkdir(parents=True, exist_ok=True)
        (src / probe).write_bytes(b"\0" * 1024)
    run_dir = tmp_path / "run"  # absolute: the driver's cwd is a temporary copy of the working dir
    entry = [sys.executable, "-m", "noprop_dist.run", "--config", "noprop_dist/configs/quickstart.yaml"]
    for kv in [f"run.dir={run_dir}", *SHORT_RUN]:
        entry += ["--set", kv]
    _submit(head, "train-ok", entry, "--working-dir", ".", "--runtime-env-json", EXCLUDES, cwd=src)
    status = _wait_for_job(head, "train-ok", timeout=150)
    logs = _job_logs(head, "train-ok")
    assert status == "SUCCEEDED", logs[-3000:]
    assert "test accuracy of the assembled chain" in logs and f"run saved in {run_dir}" in logs, logs[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_workers"] == 2 and len(summary["blocks"]) == 2
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["train_seconds"] > 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["train_limit"] == 300
    # What was uploaded: the package (configs inside), not .git, runs/ or data/.
    packages = [p for p in head.temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*")
                if p.is_dir()]
    assert len(packages) == 1, packages
    uploaded = {p.name for p in packages[0].iterdir()}
    assert {"noprop_dist", "pyproject.toml"} <= uploaded, uploaded
    assert not uploaded & {".git", "runs", "data"}, uploaded


def test_bad_config_job_fails_with_the_one_line_error(head):
    # No working_dir: the driver starts in the directory `ray start` ran in (as in the image, its WORKDIR),
    # so the relative --config resolves; the error is then the config's, not a missing file.
    entry = [sys.executable, "-m", "noprop_dist.run", "--config", "noprop_dist/configs/quickstart.yaml", "--set", "train.epoch=3"]
    _submit(head, "bad-key", entry)
    assert _wait_for_job(head, "bad-key", timeout=60) == "FAILED"
    logs = _job_logs(head, "bad-key")
    errors = [line for line in logs.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: train.epoch: unknown key"), logs[-3000:]
    assert "Traceback" not in logs


def test_metrics_endpoint_serves_the_dashboard_node_metrics(head):
    """The PodMonitor scrapes this endpoint without a token; the dashboard's CPU-side metrics are on it."""
    dashboard = yaml.safe_load((REPO / "cluster" / "grafana-dashboard.yaml").read_text())
    exprs = [t["expr"] for panel in json.loads(next(iter(dashboard["data"].values())))["panels"]
             for t in panel["targets"]]
    names = {re.match(r"[a-z_]+", e).group(0) for e in exprs}
    cpu_side = {n for n in names if "gpu" not in n and "gram" not in n}  # GPU series need a GPU node
    assert cpu_side, names
    deadline = time.monotonic() + 60
    while True:
        try:
            text = urllib.request.urlopen(head.metrics_url, timeout=5).read().decode()
        except urllib.error.URLError:
            text = ""
        exported = set(re.findall(r"^(ray_[a-z_]+)\{", text, re.M))
        if cpu_side <= exported or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert cpu_side <= exported, sorted(cpu_side - exported)

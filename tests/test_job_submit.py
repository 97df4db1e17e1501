"""`ray job submit` end to end, as docs/deploying.md runs it: a real Ray head started with
`ray start` on loopback (token authentication on; the session's ``ray_head``, conftest.py), the real
`ray job submit` / `status` / `logs` CLI.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import REPO, Head, ray_cli, start_head

pytestmark = pytest.mark.ray

SHORT_RUN = ["data.train_limit=300", "data.test_limit=100", "model.num_blocks=2", "cluster.num_workers=2",
             "train.epochs=1"]
EXCLUDES = '{"excludes": [".git"]}'  # docs/deploying.md's --runtime-env-json; .gitignore covers runs/ and data/


def _job_status(head: Head, job_id: str) -> str:
    p = ray_cli(head, "job", "status", job_id, "--address", head.address)
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
            ray_cli(head, "job", "stop", job_id, "--address", head.address)
            pytest.fail(f"job {job_id} still {status} after {timeout}s")
        time.sleep(1)


def _job_logs(head: Head, job_id: str) -> str:
    p = ray_cli(head, "job", "logs", job_id, "--address", head.address)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _submit(head: Head, job_id: str, entrypoint: list[str], *options: str, cwd: Path | None = None) -> None:
    p = ray_cli(head, "job", "submit", "--address", head.address, "--submission-id", job_id, "--no-wait",
                *options, "--", *entrypoint, cwd=cwd)
    assert p.returncode == 0, p.stdout + p.stderr


def test_a_run_refuses_to_join_a_cluster_without_token_authentication(tmp_path):
    """Bug seen: joining a head whose token authentication was off passed the check (it read only the driver's
    own environment) and failed later with ActorDiedError. The cluster's own mode is asked now: one line, exit 2,
    nothing written; cluster.allow_unauthenticated=true goes on with a warning."""
    for h in start_head("disabled"):
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


def test_job_server_requires_the_token(ray_head):
    no_mode = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_MODE"}
    p = ray_cli(ray_head, "job", "list", "--address", ray_head.address, env=no_mode)
    assert p.returncode != 0 and "Missing authentication token" in p.stderr, p.stderr[-2000:]
    p = ray_cli(ray_head, "job", "list", "--address", ray_head.address,
                env={**ray_head.env, "RAY_AUTH_TOKEN": "x" * 32})
    assert p.returncode != 0 and "Invalid authentication token" in p.stderr, p.stderr[-2000:]
    assert ray_cli(ray_head, "job", "list", "--address", ray_head.address).returncode == 0


def test_submitted_training_succeeds_and_writes_summary(ray_head, tmp_path):
    """Slow: Ray uploads the working dir and starts a job supervisor and a driver process before the run starts."""
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
    _submit(ray_head, "train-ok", entry, "--working-dir", ".", "--runtime-env-json", EXCLUDES, cwd=src)
    status = _wait_for_job(ray_head, "train-ok", timeout=150)
    logs = _job_logs(ray_head, "train-ok")
    assert status == "SUCCEEDED", logs[-3000:]
    assert "test accuracy of the assembled chain" in logs and f"run saved in {run_dir}" in logs, logs[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_workers"] == 2 and len(summary["blocks"]) == 2
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["train_seconds"] > 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["train_limit"] == 300
    # What was uploaded: the package (configs inside), not .git, runs/ or data/.
    packages = [p for p in ray_head.temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*")
                if p.is_dir()]
    assert len(packages) == 1, packages
    uploaded = {p.name for p in packages[0].iterdir()}
    assert {"noprop_dist", "pyproject.toml"} <= uploaded, uploaded
    assert not uploaded & {".git", "runs", "data"}, uploaded


def test_bad_config_job_fails_with_the_one_line_error(ray_head):
    # No working_dir: the driver starts in the directory `ray start` ran in (as in the image, its WORKDIR),
    # so the relative --config resolves; the error is then the config's, not a missing file.
    entry = [sys.executable, "-m", "noprop_dist.run", "--config", "noprop_dist/configs/quickstart.yaml", "--set", "train.epoch=3"]
    _submit(ray_head, "bad-key", entry)
    assert _wait_for_job(ray_head, "bad-key", timeout=60) == "FAILED"
    logs = _job_logs(ray_head, "bad-key")
    errors = [line for line in logs.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: train.epoch: unknown key"), logs[-3000:]
    assert "Traceback" not in logs


def test_metrics_endpoint_serves_the_dashboard_node_metrics(ray_head):
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
            text = urllib.request.urlopen(ray_head.metrics_url, timeout=5).read().decode()
        except urllib.error.URLError:
            text = ""
        exported = set(re.findall(r"^(ray_[a-z_]+)\{", text, re.M))
        if cpu_side <= exported or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert cpu_side <= exported, sorted(cpu_side - exported)

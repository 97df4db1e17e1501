"""Shared fixtures: tiny model specs, the real digits data, and one real Ray head per session.

The head is a `ray start --head` on loopback with token authentication on, as docs/deploying.md starts one: this
process joins it (``ray_cluster``), and so do the training subprocesses of the tests that do not test a cluster's
start itself (``ray_head.driver_env()``). A cluster start costs a subprocess run more than its training does.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from noprop_dist.config import Config
from noprop_dist.core import ModelSpec

REPO = Path(__file__).resolve().parent.parent
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of this interpreter


def make_spec(embedding: str = "learned", num_shards: int = 4, class_prob: str = "softmax",
              image_shape: tuple[int, int, int] = (1, 8, 8), num_classes: int = 10, *,
              method: str = "noprop_dt", **fields) -> ModelSpec:
    """A small spec for unit tests, with the paper's CT / FM forms and sampler (SNR'(t), the head, velocity; sampler
    None: the paper's), which the unit tests check; ``fields`` set any other ModelSpec field (shard_partition, ...)."""
    c, h, w = image_shape
    d = {"one_hot": num_classes, "learned": 20, "prototype": c * h * w}[embedding]
    paper = {"ct_loss_weight": "snr_prime", "ct_readout": "head", "fm_target": "velocity", "sampler": None}
    return ModelSpec(image_shape=image_shape, num_classes=num_classes, num_shards=num_shards, embedding=embedding,
                     embed_dim=d, dropout=0.1, class_prob=class_prob, radial_sigma=1.0, eta=0.1, abar_max=0.999,
                     method=method, **(paper | fields))


@pytest.fixture(scope="session")
def digits():
    from noprop_dist.data import load_dataset

    return load_dataset("digits")


@dataclass
class Head:
    address: str              # job server (dashboard) URL, what --address takes
    metrics_url: str
    env: dict                 # what a user's shell has: RAY_AUTH_MODE=token, token in ~/.ray/auth_token
    temp_dir: Path
    proc: subprocess.Popen
    gcs: str                  # the GCS address ray.init() joins (RAY_ADDRESS for a driver on this machine)

    def driver_env(self) -> dict:
        """The environment of a driver subprocess (`python -m noprop_dist.run`, ...) that joins this head."""
        return self.env | {"RAY_ADDRESS": self.gcs}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ray_cli(head: Head, *args: str, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """The `ray` command line run against ``head``'s environment (or ``env``), in the repository root."""
    return subprocess.run([*RAY, *args], capture_output=True, text=True, timeout=timeout,
                          env=head.env if env is None else env, cwd=cwd or REPO)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_head(auth_mode: str) -> Iterator[Head]:
    """A `ray start --head --block` on loopback with its own ports and temp dir, RAY_AUTH_MODE=auth_mode; yields
    its Head and stops what it started afterwards.

    The head runs in the foreground as a child of this process, on free ports and in its own temp dir, so it
    never becomes the default cluster of other processes. Teardown sends it SIGTERM (it stops the Ray processes
    it started) and kills, by pid, whatever of its process tree is left. `ray stop` is not used: it ends every
    Ray process on the machine, other test sessions' included.
    """
    from noprop_dist.distributed.cluster import listening

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
        # The dashboard's port first (a connect attempt costs nothing), then the job server through the CLI: each
        # `ray job list` is a process that imports Ray, about a CPU-second, and the head takes seconds to come up.
        while not listening(h.address.removeprefix("http://"), timeout=1):
            assert proc.poll() is None, (temp_dir / "ray_start.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the dashboard did not listen within 90s"
            time.sleep(0.2)
        while ray_cli(h, "job", "list", "--address", h.address).returncode != 0:
            assert proc.poll() is None, (temp_dir / "ray_start.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the job server did not come up in 90s"
            time.sleep(1)
        yield h
    finally:
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        # SIGKILL to every process of the head at once: nothing of a test head is kept, and on SIGTERM
        # `ray start --block` waits as long as its GCS does to stop (seconds; some 30 s once Ray Train ran).
        for p in [*tree, psutil.Process(proc.pid)] if proc.poll() is None else tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        proc.wait()
        psutil.wait_procs(tree, timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not [p for p in tree if _alive(p)], "Ray processes of the head were left running"


@pytest.fixture(scope="session")
def ray_head() -> Iterator[Head]:
    """The session's Ray head (2 CPUs, token authentication on), for this process and joining subprocesses."""
    yield from start_head("token")


@pytest.fixture(scope="session")
def ray_cluster(ray_head):
    """This process joined to the session's head: the cluster of the in-process runs (2 CPUs, on loopback)."""
    import ray

    from noprop_dist.distributed.cluster import keep_on_loopback, require_token_auth

    require_token_auth(allow_unauthenticated=False)  # as a driver that joins a cluster does: the token is sent
    keep_on_loopback()
    ray.init(address=ray_head.gcs, logging_level="WARNING")
    yield ray
    ray.shutdown()


@dataclass
class FinishedRun:
    cfg: Config
    summary: dict  # what run_training returned


@pytest.fixture(scope="session")
def finished_run(ray_cluster, tmp_path_factory) -> FinishedRun:
    """One tiny run on the session's cluster, finished (2 blocks, 1 worker, 1 epoch, metrics off), for the tests
    that only read a finished run or run it again: none may change what it trained."""
    from noprop_dist.config import load_config
    from noprop_dist.distributed.driver import run_training

    cfg = load_config(None, ["data.train_limit=300", "data.test_limit=120", "train.batch_size=64",
                             "model.num_blocks=2", "cluster.num_workers=1", "train.epochs=1", "metrics.enabled=false",
                             f"run.dir={tmp_path_factory.mktemp('finished')}"])
    return FinishedRun(cfg, run_training(cfg, log=lambda s: None))


# The slowest files, slowest first (their real clusters, runs and timeouts; `--durations` in a CI log says what
# they take now). They are collected first so that scripts/test.sh's two processes (pytest-xdist, a file whole
# in one process) start on them and end on the short files together, instead of one waiting on the other's last
# long file (scripts/test.sh keeps xdist from reordering them). A stale order costs minutes, never a result.
SLOW_FIRST = ("test_supervision.py", "test_lost_node.py", "test_ray.py", "test_cli.py", "test_ray_blocks.py",
              "test_faults.py", "test_connect.py", "test_runs.py", "test_examples.py", "test_reproduce.py",
              "test_prometheus_e2e.py", "test_gpu_defaults.py", "test_ray_continuous.py", "test_job_submit.py",
              "test_ray_train.py", "test_methods.py", "test_plots.py", "test_export.py", "test_rundir_safety.py",
              "test_protocol.py", "test_embeddings.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of :data:`SLOW_FIRST` first, in its order; every file's tests stay together and in order."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(1)
    yield


def stop_process_tree(proc: subprocess.Popen, tree: list[psutil.Process] | None = None, timeout: float = 30) -> None:
    """SIGTERM a process a test started, then kill by pid whatever of its tree is left (Ray's daemons).

    ``tree``: its descendants captured earlier (they may have been re-parented since); default: now.
    Never `ray stop`: that would end every Ray process on the machine, other runs' too.
    """
    if tree is None:
        tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def run_main(module, args: list[str]) -> tuple[int, list[str], str]:
    """(exit code, non-empty stderr lines, stdout) of an entry point's ``module.main(args)`` run in this process."""
    import io

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = module.main(args)
    return code, [ln for ln in err.getvalue().splitlines() if ln.strip()], out.getvalue()


def one_error_line(code: int, lines: list[str], *names: str) -> str:
    """The one ``error:`` line an entry point printed with exit code 2, after checking it names ``names``."""
    assert code == 2, (code, lines)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]

"""Which Ray cluster a run joins: a stale address file left by a dead `ray start` is not joined. The runs here
start their own local clusters, which is what they test: slow, and not on the session's cluster."""
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from conftest import stop_process_tree
from ray._private.utils import get_ray_address_file, write_ray_address

from noprop_dist.distributed.cluster import existing_cluster_address, listening


@pytest.fixture
def address_file(monkeypatch):
    """Ray's address file, restored afterwards (a session cluster of the tests may have written one)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = get_ray_address_file(None)
    os.makedirs(os.path.dirname(path), exist_ok=True)  # Ray's temp dir exists only once a cluster has started here
    before = open(path).read() if os.path.exists(path) else None
    yield path
    if before is None:
        if os.path.exists(path):
            os.remove(path)
    else:
        write_ray_address(before, None)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the socket is: nothing listens there afterwards


def test_a_stale_address_file_is_ignored_with_a_warning(address_file):
    """Bug seen: a driver joined the address of a cluster that had died and waited on it until its timeout."""
    write_ray_address(f"127.0.0.1:{_closed_port()}", None)
    with pytest.warns(UserWarning, match="nothing listens there any more; starting a local cluster"):
        assert existing_cluster_address() is None


def test_a_live_address_in_the_file_is_joined(address_file):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        write_ray_address(address, None)
        assert listening(address) and existing_cluster_address() == address


def _start_run(run_dir) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """A long quickstart run in a subprocess, followed until its first checkpoint: (process, its tree)."""
    proc = subprocess.Popen([sys.executable, "-m", "noprop_dist.run", "--set", "train.epochs=50",
                             f"run.dir={run_dir}", "data.train_limit=300", "data.test_limit=100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, tree = psutil.Process(proc.pid), []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (run_dir / "manifest.json").exists():
        tree = root.children(recursive=True) or tree
        time.sleep(0.3)
    assert (run_dir / "manifest.json").exists(), "the run did not get to its first checkpoint"
    tree = root.children(recursive=True) or tree
    assert any("raylet" in p.name() for p in tree), [p.name() for p in tree]
    return proc, tree


@pytest.mark.ray
def test_a_driver_stopped_by_sigterm_ends_as_ctrl_c_does(tmp_path):
    """SIGTERM (kill, a container stopping) ends the run as Ctrl-C does: Ray shut down on the way out, exit code
    130 and how to resume, instead of Ray's abort with a C++ stack trace."""
    run_dir = tmp_path / "run"
    proc, tree = _start_run(run_dir)
    try:
        proc.send_signal(signal.SIGTERM)  # the driver alone, not its process group
        _, err = proc.communicate(timeout=120)
        gone, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"left running after the driver stopped: {[p.name() for p in alive]}"
        assert proc.returncode == 130 and f"--resume {run_dir}" in err, (proc.returncode, err[-2000:])
    finally:
        stop_process_tree(proc, tree)

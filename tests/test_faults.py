"""Faults injected into real runs: the driver killed mid-training, then the same command again.

The kills happen at points the fault-injection hooks fix (noprop_dist/distributed/faults.py), not after a
number of epochs a poll happened to see: the runs are short and the outcome exact.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
import torch
from conftest import run_main

from noprop_dist import run
from noprop_dist.config import load_config
from noprop_dist.data import load_dataset
from noprop_dist.distributed.faults import ENV_VAR
from noprop_dist.storage.checkpoints import CheckpointStore
from noprop_dist.training import train_in_process

pytestmark = pytest.mark.ray

ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
ARGS = ["model.num_blocks=2", "cluster.num_workers=1", "train.epochs=4", "train.batch_size=64",
        "data.train_limit=640", "data.test_limit=200"]


def _sets(run_dir, args: list[str] = ARGS) -> list[str]:
    return [a for kv in [*args, f"run.dir={run_dir}"] for a in ("--set", kv)]


def _cmd(run_dir, args: list[str] = ARGS) -> list[str]:
    return [sys.executable, "-m", "noprop_dist.run", *_sets(run_dir, args)]


def _assert_matches_an_uninterrupted_run(run_dir, args: list[str], tmp_path) -> None:
    """The run's last checkpoint is the one an uninterrupted run ends with (1 worker, sync: deterministic)."""
    cfg = load_config(None, [*args, f"run.dir={tmp_path / 'ref'}"])
    ref_blocks, ref_shared, _ = train_in_process(cfg, load_dataset("digits", train_limit=640, test_limit=200))
    saved = CheckpointStore(str(run_dir)).load_resume(2)
    assert saved.epochs_done == cfg.train.epochs
    for t in (1, 2):
        for k, v in ref_blocks[t]["block"].items():
            assert torch.equal(saved.block_states[t]["block"][k], v), f"block {t} {k} differs"
    assert saved.shared_state["version"] == ref_shared["version"]


def test_driver_killed_then_rerun_resumes_and_matches_an_uninterrupted_run(ray_head, tmp_path):
    """A crash: the driver SIGKILLed alone (as the OOM killer picks one process), which leaves no process of the
    local cluster it started running, and a rerun that resumes exactly. Its worker stops itself (SIGSTOP) as
    epoch 3 begins, so the kill comes once epoch 2's checkpoint is listed and before anything of epoch 3 is.

    Bug seen: a driver killed alone left its cluster's dashboard and runtime-env agents running and listening,
    re-parented, for good. The reaper that watches the driver stops them (and the stopped worker)."""
    run_dir = tmp_path / "run"
    # Its own Ray temp dir (short: it holds sockets), so that the run starts its own cluster: a `ray start` head
    # recorded in the default one would be joined instead.
    ray_tmp = tempfile.mkdtemp(prefix="rf", dir="/tmp")
    p = subprocess.Popen(_cmd(run_dir), env=ENV | {ENV_VAR: "stop:0@3.0", "RAY_TMPDIR": ray_tmp},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tree, killed_at = [], None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and p.poll() is None:
            manifest = run_dir / "manifest.json"
            if manifest.exists():
                try:
                    done = json.loads(manifest.read_text())["epochs_done"]
                except ValueError:
                    done = 0
                if done >= 2:
                    killed_at = done
                    break
            time.sleep(0.1)
        # Its processes now, the driver's descendants until it dies (those it leaves are re-parented then).
        tree = psutil.Process(p.pid).children(recursive=True)
        names = [q.name() for q in tree]
    finally:
        p.kill()  # the driver alone, not its process group
        p.wait(timeout=30)
        _, alive = psutil.wait_procs(tree, timeout=30)
        left = [q.name() for q in alive]
        for q in alive:  # not left to the tests after this one; the assertion below reports them
            q.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert "raylet" in names, names
    assert not left, f"left running after the driver was killed: {left}"
    assert killed_at == 2, "the run must be killed part-way, with epoch 2 checkpointed"
    assert not (run_dir / "summary.json").exists()

    # The same command again, here on the session's cluster (the crashed one is gone).
    again = subprocess.run(_cmd(run_dir), env=ray_head.driver_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from epoch" in again.stdout
    resumed_from = int(again.stdout.split("resuming from epoch ")[1].split()[0])
    assert resumed_from >= killed_at  # nothing that was checkpointed is trained again
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 4

    # The interrupted run ends exactly where an uninterrupted one does.
    _assert_matches_an_uninterrupted_run(run_dir, ARGS, tmp_path)

    # Once more: a finished run is reported as finished, not retrained.
    code, _, out = run_main(run, _sets(run_dir))
    assert code == 0 and "already finished" in out


def test_corrupted_checkpoint_is_reported_and_the_run_resumes_from_the_previous_epoch(ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    code, err, _ = run_main(run, [*_sets(run_dir), "--set", "train.epochs=2"])
    assert code == 0, err[-20:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    bad = run_dir / "checkpoints" / manifest["files"]["block_1"]["file"]
    with open(bad, "r+b") as f:  # a torn write: the file is cut in half
        f.truncate(bad.stat().st_size // 2)
    code, err, out = run_main(run, [*_sets(run_dir), "--set", "train.epochs=3"])
    assert code == 0, err[-20:]
    assert str(bad) in out and "corrupted" in out and "falling back to the checkpoints of epoch 1" in out
    assert "resuming from epoch 1" in out
    assert json.loads((run_dir / "manifest.json").read_text())["epochs_done"] == 3


def test_driver_killed_alone_inside_a_checkpoint_save_resumes_exactly(ray_head, ray_cluster, tmp_path):
    """The kill the test above cannot reach: the driver alone SIGKILLed while it saves epoch 2's checkpoint, its
    files written and the manifest not yet. Epoch 1's checkpoint stays whole, the rerun resumes from it, and the
    result is an uninterrupted run's."""
    run_dir = tmp_path / "run"
    args = [*ARGS[:2], "train.epochs=3", *ARGS[3:]]
    first = subprocess.run(_cmd(run_dir, args), env=ray_head.driver_env() | {ENV_VAR: "kill_driver@2.save"},
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == -signal.SIGKILL, (first.returncode, first.stderr[-2000:])
    assert "fault injection: kill_driver while saving the checkpoint of epoch 2" in first.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["epochs_done"] == 1  # epoch 2's files are on disk, unlisted
    assert (run_dir / "checkpoints" / "block_01.e0002.pt").exists()

    code, err, out = run_main(run, _sets(run_dir, args))
    assert code == 0, err[-20:]
    assert "resuming from epoch 1" in out
    _assert_matches_an_uninterrupted_run(run_dir, args, tmp_path)

"""Faults injected into real runs: the driver killed mid-training, then the same command again."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from noprop_dist.config import load_config
from noprop_dist.data import load_dataset
from noprop_dist.storage.run_dir import RunDir
from noprop_dist.training import train_in_process

pytestmark = pytest.mark.ray

ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
ARGS = ["model.num_blocks=2", "cluster.num_workers=1", "train.epochs=25", "train.batch_size=64",
        "data.train_limit=640", "data.test_limit=200"]


def _cmd(run_dir):
    sets = [a for kv in [*ARGS, f"run.dir={run_dir}"] for a in ("--set", kv)]
    return [sys.executable, "-m", "noprop_dist.run", *sets]


def test_driver_killed_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    run_dir = tmp_path / "run"
    # Own process group: SIGKILL takes the driver and the local Ray cluster it started, as a crash would.
    p = subprocess.Popen(_cmd(run_dir), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    killed_at = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and p.poll() is None:
            manifest = run_dir / "manifest.json"
            if manifest.exists():
                try:
                    done = json.loads(manifest.read_text())["epochs_done"]
                except ValueError:
                    done = 0
                if done >= 3:
                    killed_at = done
                    break
            time.sleep(0.1)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    assert killed_at is not None and killed_at < 25, "the run must be killed part-way"
    assert not (run_dir / "summary.json").exists()

    again = subprocess.run(_cmd(run_dir), env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from epoch" in again.stdout
    resumed_from = int(again.stdout.split("resuming from epoch ")[1].split()[0])
    assert resumed_from >= killed_at  # nothing that was checkpointed is trained again
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 25

    # The interrupted run ends exactly where an uninterrupted one does (1 worker, sync: deterministic).
    cfg = load_config(None, [*ARGS, f"run.dir={tmp_path / 'ref'}"])
    ref_blocks, ref_shared, _ = train_in_process(cfg, load_dataset("digits", train_limit=640, test_limit=200))
    saved = RunDir(str(run_dir)).load_resume(2)
    for t in (1, 2):
        for k, v in ref_blocks[t]["block"].items():
            assert torch.equal(saved.block_states[t]["block"][k], v), f"block {t} {k} differs"
    assert saved.shared_state["version"] == ref_shared["version"]

    # Once more: a finished run is reported as finished, not retrained.
    third = subprocess.run(_cmd(run_dir), env=ENV, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "already finished" in third.stdout


def test_corrupted_checkpoint_is_reported_and_the_run_resumes_from_the_previous_epoch(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.run([*_cmd(run_dir), "--set", "train.epochs=2"], env=ENV, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    bad = run_dir / "checkpoints" / manifest["files"]["block_1"]["file"]
    with open(bad, "r+b") as f:  # a torn write: the file is cut in half
        f.truncate(bad.stat().st_size // 2)
    again = subprocess.run([*_cmd(run_dir), "--set", "train.epochs=3"], env=ENV, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout
    assert str(bad) in out and "corrupted" in out and "falling back to the checkpoints of epoch 1" in out
    assert "resuming from epoch 1" in out
    assert json.loads((run_dir / "manifest.json").read_text())["epochs_done"] == 3


def test_driver_killed_alone_inside_a_checkpoint_save_resumes_exactly(tmp_path):
    """The kill the test above cannot reach: the driver alone (not its process group: its Ray processes are left
    to the watchdog) SIGKILLed while it saves epoch 2's checkpoint, its files written and the manifest not yet.
    Epoch 1's checkpoint stays whole, the rerun resumes from it, and the result is an uninterrupted run's."""
    run_dir = tmp_path / "run"
    args = [*ARGS[:2], "train.epochs=3", *ARGS[3:]]
    cmd = [sys.executable, "-m", "noprop_dist.run", *[a for kv in [*args, f"run.dir={run_dir}"] for a in ("--set", kv)]]
    first = subprocess.run(cmd, env=ENV | {"NOPROP_FAULTS": "kill_driver@2.save"}, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == -signal.SIGKILL, (first.returncode, first.stderr[-2000:])
    assert "fault injection: kill_driver while saving the checkpoint of epoch 2" in first.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["epochs_done"] == 1  # epoch 2's files are on disk, unlisted
    assert (run_dir / "checkpoints" / "block_01.e0002.pt").exists()

    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from epoch 1" in again.stdout
    cfg = load_config(None, [*args, f"run.dir={tmp_path / 'ref'}"])
    ref_blocks, ref_shared, _ = train_in_process(cfg, load_dataset("digits", train_limit=640, test_limit=200))
    saved = RunDir(str(run_dir)).load_resume(2)
    assert saved.epochs_done == 3
    for t in (1, 2):
        for k, v in ref_blocks[t]["block"].items():
            assert torch.equal(saved.block_states[t]["block"][k], v), f"block {t} {k} differs"
    assert saved.shared_state["version"] == ref_shared["version"]

"""The entry points as a user runs them: the default command end to end, and config errors."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
import yaml
from conftest import one_error_line, run_main

from noprop_dist import evaluate, run
from noprop_dist.config import load_config

ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}


def _run(*args, timeout=600, env=ENV):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.ray
def test_default_command_end_to_end(ray_head, tmp_path):
    """`python -m noprop_dist.run` with only the run directory moved: the README's quickstart, here on the session's
    cluster (a run that starts its own: test_connect.py, and the GPU refusal below). Slow for its 20 epochs of 10
    blocks: the command a new user runs first, and the README's accuracy."""
    run_dir = tmp_path / "quickstart"
    p = _run("noprop_dist.run", "--set", f"run.dir={run_dir}", env=ray_head.driver_env())
    assert p.returncode == 0, p.stderr[-3000:]
    assert "test accuracy of the assembled chain" in p.stdout
    assert f"run saved in {run_dir}" in p.stdout
    assert "block 10" in p.stdout and "samples/s" in p.stdout  # per-block progress was shown
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.9, summary["test_accuracy"]  # README states ~0.98
    assert summary["num_workers"] == 2 and len(summary["blocks"]) == 10
    assert all(b["samples_per_second"] > 0 for b in summary["blocks"])
    for name in ("config.yaml", "manifest.json", "chain.pt"):
        assert (run_dir / name).exists()
    ev = _run("noprop_dist.evaluate", str(run_dir))
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["test_accuracy"] == summary["test_accuracy"]


@pytest.mark.parametrize("args,key", [
    (["--set", "train.epoch=3"], "train.epoch"),
    (["--set", "model.num_blocks=abc"], "model.num_blocks"),
    (["--set", "cluster.num_workers=12"], "cluster.num_workers"),
    (["--config", "does/not/exist.yaml"], "does/not/exist.yaml"),
    (["--set", "data.name=mnist", "--set", "data.root=/nonexistent/mnist"], "train-images-idx3-ubyte"),
])
def test_config_errors_are_one_line_exit_2(tmp_path, args, key):
    run_dir = tmp_path / "run"
    one_error_line(*run_main(run, [*args, "--set", f"run.dir={run_dir}"])[:2], key)
    assert not run_dir.exists(), "a failed config must not write a run directory"


def test_a_config_error_of_the_command_is_one_line_exit_2(tmp_path):
    """The entry point as a process: what reaches the terminal (the cases above run its main in this process)."""
    run_dir = tmp_path / "run"
    p = _run("noprop_dist.run", "--set", "train.epoch=3", "--set", f"run.dir={run_dir}", timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.epoch: unknown key"), p.stderr
    assert "Traceback" not in p.stderr
    assert not run_dir.exists(), "a failed config must not write a run directory"


@pytest.mark.ray
def test_a_local_cluster_without_the_gpus_asked_for_refuses_at_once(tmp_path):
    """A cluster the run starts itself has no autoscaler: GPUs it lacks will not come, so the run is refused at
    once (well inside cluster.placement_timeout_s, which a joined cluster is given), exit 2, nothing written.
    Before the cluster starts: nothing of Ray is started (its temp dir stays empty), nothing waited for."""
    run_dir = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="rg", dir="/tmp")  # short: a cluster started there would put sockets in it
    try:
        p = _run("noprop_dist.run", "--set", "cluster.gpus_per_worker=1", "cluster.placement_timeout_s=300",
                 f"run.dir={run_dir}", timeout=120, env=ENV | {"RAY_TMPDIR": ray_tmp})
        started = os.listdir(ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    last = p.stderr.strip().splitlines()[-1]
    assert last == "error: cluster.gpus_per_worker: 2 workers x 1 GPU = 2 GPUs, the cluster has 0", p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not run_dir.exists()
    assert not started, f"a local cluster was started before the refusal: {started}"


def test_run_dir_of_another_config_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = load_config(None, ["model.embedding=one_hot", f"run.dir={run_dir}"])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(other.to_dict()))
    one_error_line(*run_main(run, ["--set", f"run.dir={run_dir}"])[:2], "model.embedding='one_hot'")
    assert sorted(os.listdir(run_dir)) == ["config.yaml"], "the refused run wrote into the directory"


def test_evaluate_without_chain_is_a_clear_error(tmp_path):
    one_error_line(*run_main(evaluate, [str(tmp_path)])[:2], "no chain.pt")


def test_evaluate_of_a_broken_chain_is_one_line(tmp_path):
    """A chain whose weights do not fit its network: one error line, exit 2, no traceback."""
    from test_chain import _chain

    path = tmp_path / "chain.pt"
    _chain().save(str(path))
    payload = torch.load(path, weights_only=True)
    payload["blocks"][0] = {}
    torch.save(payload, path)
    one_error_line(*run_main(evaluate, [str(tmp_path)])[:2], "chain.pt: shard 1 of 3", "Missing key")


def test_set_takes_several_overrides_and_repeats():
    from noprop_dist.run import parse_args

    args = parse_args(["--set", "train.epochs=3", "cluster.num_workers=1", "--config", "c.yaml", "--set", "train.seed=2"])
    assert args.overrides == ["train.epochs=3", "cluster.num_workers=1", "train.seed=2"] and args.config == "c.yaml"

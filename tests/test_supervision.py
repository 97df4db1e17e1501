"""Faults injected into runs on a real local Ray cluster: a worker process or the parameter server is
SIGKILLed mid-epoch, a block's weights turn NaN; restart limits; refusals that write nothing."""

import pytest
import torch

from noprop_dist.checkpoint import RunDir
from noprop_dist.config import ConfigError, load_config
from noprop_dist.distributed.driver import run_training
from noprop_dist.distributed.faults import ENV_VAR, parse_faults
from noprop_dist.distributed.supervisor import RestartBudget, TrainingFailed
from noprop_dist.shared_server import SharedStateServer

from conftest import make_spec

pytestmark = pytest.mark.ray

# 4 blocks on 2 workers, 8 epochs: small enough for CI, long enough that accuracy has left its steep climb
# (after 4 epochs two clean runs of one seed differed by 1.7 pt and a killed-worker run by 3.9 pt).
RUN = ["model.num_blocks=4", "cluster.num_workers=2", "train.epochs=8", "metrics.enabled=false",
       "eval.every_epochs=0"]
# With 2 workers the order in which their pushes reach the server depends on timing, so two clean runs
# of one seed already differ: 1.1 pt on these 359 test images (measured). A restarted worker must stay
# within a few such steps; the exact claim (nothing lost, nothing repeated) is tested with 1 worker below.
TOLERANCE_PT = 3.0


def _run(tmp_path, name, faults, monkeypatch, *extra):
    monkeypatch.setenv(ENV_VAR, faults)
    cfg = load_config(None, [*RUN, f"run.dir={tmp_path / name}", *extra])
    return run_training(cfg, log=print)


@pytest.fixture(scope="module")
def clean(ray_cluster, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        return _run(tmp_path_factory.mktemp("clean"), "run", "", mp)
    finally:
        mp.undo()


def _finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_killed_worker_restarts_from_checkpoint_others_go_on(clean, tmp_path, monkeypatch, capsys):
    s = _run(tmp_path, "run", "kill:1@2.5", monkeypatch)
    out = capsys.readouterr().out
    assert "worker 1 (blocks 3-4) died in epoch 2" in out and "redo epoch 2 from the checkpoint of epoch 1" in out
    assert [(e["kind"], e["worker"], e["resumed_from_epoch"]) for e in s["restarts"]] == [("worker", 1, 1)]
    by_rank = {w["rank"]: w for w in s["workers"]}
    assert by_rank[0]["restarts"] == 0 and by_rank[1]["restarts"] == 1
    assert [b["block"] for b in s["blocks"]] == [1, 2, 3, 4]
    # Worker 0 kept its process: its blocks did every step of every epoch without a break (12 a epoch).
    assert all(b["steps"] == 8 * 12 for b in s["blocks"] if b["worker"] == 0)
    diff = 100 * abs(s["test_accuracy"] - clean["test_accuracy"])
    print(f"clean {clean['test_accuracy']:.4f} killed-worker {s['test_accuracy']:.4f}: {diff:.2f} pt")
    assert diff <= TOLERANCE_PT, f"{diff:.2f} pt from the clean run"


def test_killed_worker_loses_and_repeats_nothing(ray_cluster, tmp_path, monkeypatch, capsys):
    """1 worker, sync: deterministic. Killed before its first step of epoch 2, the restarted worker redoes
    epoch 2 from the epoch-1 checkpoint against a server that saw no push since: bit-identical weights."""
    one = ["model.num_blocks=2", "cluster.num_workers=1", "train.epochs=3", "data.train_limit=300",
           "train.batch_size=64"]
    _run(tmp_path, "clean", "", monkeypatch, *one)
    s = _run(tmp_path, "killed", "kill:0@2.0", monkeypatch, *one)
    assert "worker 0 (blocks 1-2) died in epoch 2" in capsys.readouterr().out and len(s["restarts"]) == 1
    a, b = RunDir(str(tmp_path / "clean")).load_resume(2), RunDir(str(tmp_path / "killed")).load_resume(2)
    for t in (1, 2):
        for k, v in a.block_states[t]["block"].items():
            assert torch.equal(b.block_states[t]["block"][k], v), f"block {t} {k} differs"
    for k, v in a.shared_state["shared"].items():
        assert torch.equal(b.shared_state["shared"][k], v), f"shared {k} differs"
    assert a.shared_state["version"] == b.shared_state["version"]


def test_killed_server_restores_its_checkpoint_workers_resync_and_nan_rolls_back(clean, tmp_path, monkeypatch,
                                                                                 capsys):
    # Two faults in one run: the parameter server SIGKILLed in epoch 2, block 3's weights NaN in epoch 3.
    s = _run(tmp_path, "run", "kill_ps:0@2.5,nan:1:3@3.3", monkeypatch)
    out = capsys.readouterr().out
    events = [e for e in s["restarts"] if e["kind"] == "server"]
    assert len(events) == 1 and events[0]["restored_from_epoch"] == 1
    # It came back with the version of its epoch-1 checkpoint: 4 blocks x 12 steps.
    assert events[0]["version"] == 48 and "restored the checkpoint of epoch 1, version 48" in out
    assert all(w["server_resyncs"] >= 1 for w in s["workers"]) and all(w["restarts"] == 0 for w in s["workers"])
    # Every push after the restore was applied once: the final version is the restored one plus at most
    # one per block step trained after it (pushes in flight at the kill are lost, none counts twice).
    steps_after = sum(b["steps"] for b in s["blocks"]) - 48
    assert 48 < s["shared_state_version"] <= 48 + steps_after
    assert {b["block"]: b["nonfinite_events"] for b in s["blocks"]} == {1: 0, 2: 0, 3: 1, 4: 0}
    assert "block 3: loss nan (non-finite) at epoch 3" in out and "rolled back" in out
    assert all(not b["stopped"] for b in s["blocks"])
    saved = RunDir(str(tmp_path / "run")).load_resume(4)
    assert all(_finite(saved.block_states[t]["block"]) for t in range(1, 5)) and _finite(saved.shared_state["shared"])
    diff = 100 * abs(s["test_accuracy"] - clean["test_accuracy"])
    # Half an epoch of shared-state updates and of block 3's training are lost (5.3 pt measured after
    # 4 epochs, while accuracy still climbed fast); the run must still have trained well past chance.
    print(f"clean {clean['test_accuracy']:.4f} killed-server+nan {s['test_accuracy']:.4f}: {diff:.2f} pt")
    assert s["test_accuracy"] > 0.4


def test_past_max_restarts_the_run_fails_naming_the_limit(ray_cluster, tmp_path, monkeypatch):
    with pytest.raises(TrainingFailed, match=r"worker 0 \(blocks 1-2\) died in epoch 1.*cluster.max_restarts_per_worker=0"):
        _run(tmp_path, "run", "kill:0@1.2", monkeypatch, "cluster.max_restarts_per_worker=0")


def test_more_gpus_than_the_cluster_has_writes_nothing(ray_cluster, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="cluster.gpus_per_worker: 2 workers x 1 GPU = 2 GPUs, the cluster has 0"):
        _run(tmp_path, "run", "", monkeypatch, "cluster.gpus_per_worker=1")
    assert not run_dir.exists()


def test_restart_budget_counts_per_worker_and_per_run():
    b = RestartBudget(per_worker=2, per_run=3)
    assert b.worker_restart(0, "w0") == 1 and b.worker_restart(1, "w1") == 1
    assert b.server_restart("ps") == 1
    with pytest.raises(TrainingFailed, match="restart 4 of the run, more than cluster.max_restarts=3"):
        b.worker_restart(0, "w0 again")
    b = RestartBudget(per_worker=1, per_run=10)
    b.worker_restart(3, "w3")
    with pytest.raises(TrainingFailed, match="w3 twice; it has died 2 times, more than cluster.max_restarts_per_worker=1"):
        b.worker_restart(3, "w3 twice")


def test_a_repeated_push_is_applied_once_also_after_a_restore():
    spec = make_spec("learned", num_blocks=2)
    server = SharedStateServer(spec, 1e-3, 0.0, seed=0)
    grads = {n: torch.ones_like(p) for n, p in server.params.items()}
    assert server.push(grads, ("w0-a", 1)) == 1
    assert server.push(grads, ("w0-a", 1)) == 1 and server.repeats == 1  # the retry changes nothing
    assert server.push(grads, ("w1-b", 1)) == 2  # another source's seq 1 is its own
    restored = SharedStateServer(spec, 1e-3, 0.0, seed=0)
    restored.load_state_dict(server.state_dict())
    assert restored.push(grads, ("w0-a", 1)) == 2 and restored.push(grads, ("w0-a", 2)) == 3
    assert restored.push(grads, ("w0-new", 1)) == 4  # a restarted worker's client is a new source


def test_fault_plan_parsing_names_a_bad_item():
    f = parse_faults("kill:1@2.5, nan:0:3@1.4,kill_ps:0@3.1")
    assert [(x.kind, x.worker, x.block, x.epoch, x.step) for x in f] == [
        ("kill", 1, None, 2, 5), ("nan", 0, 3, 1, 4), ("kill_ps", 0, None, 3, 1)]
    with pytest.raises(ValueError, match="'nan:0@1.2'"):
        parse_faults("nan:0@1.2")
    assert parse_faults(None) == [] and parse_faults("") == []

"""Distributed runs on a real local Ray cluster (loopback, 2 CPUs): parity, two workers, async, resume."""
import json
import os

import pytest
import torch

import noprop_dist
from noprop_dist.config import ConfigError, load_config
from noprop_dist.data import load_dataset
from noprop_dist.distributed.driver import run_training
from noprop_dist.evaluate import evaluate_run, predict
from noprop_dist.storage.checkpoints import CheckpointStore
from noprop_dist.storage.summary import RunSummary
from noprop_dist.training import train_in_process

pytestmark = pytest.mark.ray

SMALL = ["data.train_limit=300", "data.test_limit=120", "train.batch_size=64"]


def _cfg(run_dir, *overrides):
    return load_config(None, [*SMALL, f"run.dir={run_dir}", *overrides])


def _assert_same_states(a: dict, b: dict) -> None:
    for t in b:
        for k, v in b[t]["block"].items():
            assert torch.equal(a[t]["block"][k], v), f"block {t}: {k} differs"


def test_one_worker_sync_equals_in_process_reference(ray_cluster, tmp_path):
    cfg = _cfg(tmp_path, "model.num_blocks=3", "cluster.num_workers=1", "train.epochs=2", "train.sync_mode=sync")
    summary = run_training(cfg, log=lambda s: None)
    saved = CheckpointStore(str(tmp_path)).load_resume(3)
    ds = load_dataset("digits", train_limit=300, test_limit=120)
    ref_blocks, ref_shared, _ = train_in_process(cfg, ds)
    _assert_same_states(saved.block_states, ref_blocks)
    for k, v in ref_shared["shared"].items():
        assert torch.equal(saved.shared_state["shared"][k], v), f"shared {k} differs"
    assert saved.shared_state["version"] == ref_shared["version"] == summary["shared_state_version"]


def test_two_workers_train_assemble_and_evaluate_above_chance(ray_cluster, tmp_path):
    """Through the Python API (noprop_dist.train, load_chain), with the TensorBoard event files on."""
    result = noprop_dist.train("quickstart", run={"dir": str(tmp_path)}, train={"epochs": 3},
                               cluster={"num_workers": 2}, log=lambda s: None,
                               **{"metrics.tensorboard": True, "eval.paper_sampler": True})
    summary = result.summary
    assert result.run_dir == str(tmp_path)
    assert summary["test_accuracy"] > 0.5, summary["test_accuracy"]  # chance is 0.1
    assert summary["num_workers"] == 2 and summary["train_seconds"] > 0
    assert set(RunSummary.__annotations__) <= set(summary), "the keys every run's summary has"
    assert [b["block"] for b in summary["blocks"]] == list(range(1, 11))
    assert {b["worker"] for b in summary["blocks"]} == {0, 1}
    assert all(b["samples_per_second"] > 0 for b in summary["blocks"])
    assert all(b["nonfinite_events"] == 0 and b["stopped"] == "" for b in summary["blocks"])
    assert len({w["pid"] for w in summary["workers"]}) == 2
    assert all(w["zero_copy_data"] for w in summary["workers"]), "workers copied the dataset"
    assert all(w["precision"] == "fp32" for w in summary["workers"])  # the default, as the workers ran it
    assert all(w["sync_every"] == 1 for w in summary["workers"])  # auto, on a CPU
    # between each two of the 3 epochs: the workers' wait for the driver (gather, checkpoint, evaluation)
    assert len(summary["epoch_boundary_seconds"]) == 2 and all(0 <= b < 60 for b in summary["epoch_boundary_seconds"])
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["test_accuracy"] == summary["test_accuracy"]
    # The run's sampler (the default, mean) and the paper's (eq3, asked for) side by side, scored on the workers
    # in parts (mean) and whole (eq3): the same counts as the driver's own evaluation below.
    assert summary["sampler"] == "mean" and summary["paper_sampler"] == "eq3"
    by = summary["test_accuracy_by_sampler"]
    assert set(by) == {"mean", "eq3"} and by["mean"] == summary["test_accuracy"]
    assert [s["block"] for s in summary["stages"]] == list(range(1, 11))
    assert summary["stages"][-1]["chain_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert all(0 <= s["own_accuracy"] <= 1 for s in summary["stages"])
    report = (tmp_path / "report.md").read_text()
    assert "## Inference" in report and "`eq3` " in report and "| 10 |" in report
    # The saved chain, without Ray, gives the same accuracy and usable predictions, with either sampler.
    assert evaluate_run(str(tmp_path)) == summary["test_accuracy"]
    assert evaluate_run(str(tmp_path), sampler="eq3") == by["eq3"]
    ds = load_dataset("digits")
    preds = predict(str(tmp_path), ds.test_x[:50])
    assert preds.shape == (50,) and (preds == ds.test_y[:50]).mean() > 0.5
    chain = noprop_dist.load_chain(result.run_dir)  # a torch module that takes raw images
    assert isinstance(chain, torch.nn.Module)
    assert (chain.predict(ds.test_x[:50]) == preds).all()
    assert (chain.predict(torch.from_numpy(ds.test_x[:50]).float() / 255) == preds).all()  # floats in [0, 1]
    assert chain(ds.test_x[:4]).shape == (4, 10)
    # TensorBoard's own reader finds every block's loss, one run per block, and the chain's accuracy.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for t in (1, 10):
        acc = EventAccumulator(str(tmp_path / "tensorboard" / f"shard_{t:02d}")).Reload()
        losses = acc.Scalars("loss")
        mine = [r for r in rows if r["block"] == t and r["loss"] is not None]
        assert [e.step for e in losses] == [r["total_steps"] for r in mine]
        assert [e.value for e in losses] == pytest.approx([r["loss"] for r in mine], rel=1e-6)
    curve = EventAccumulator(str(tmp_path / "tensorboard" / "chain")).Reload().Scalars("test_accuracy")
    assert curve[-1].step == 3 and curve[-1].value == pytest.approx(summary["test_accuracy"], rel=1e-6)


def test_training_figures_survive_a_driver_killed_during_the_final_evaluation(ray_cluster, tmp_path, monkeypatch):
    """The per-block figures live only in the driver until summary.json holds them: a driver stopped
    during the final evaluation (here by an exception there) must leave them for the re-evaluation."""
    import noprop_dist.distributed.driver as driver

    cfg = _cfg(tmp_path, "model.num_blocks=2", "cluster.num_workers=1", "train.epochs=1")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(driver, "final_report", killed)  # once the workers have scored the chain
        with pytest.raises(KeyboardInterrupt):
            run_training(cfg, log=lambda s: None)
    partial = json.loads((tmp_path / "summary.json").read_text())
    assert partial["status"] == "evaluating" and partial["test_accuracy"] is None
    summary = run_training(cfg, log=lambda s: None)  # the run is finished: re-evaluated, not retrained
    assert summary["status"] == "done" and summary["test_accuracy"] is not None
    assert [b["block"] for b in summary["blocks"]] == [1, 2]
    assert summary["blocks"] == partial["blocks"] and summary["epoch_seconds"] == partial["epoch_seconds"]


def test_async_mode_trains_and_applies_every_push(ray_cluster, tmp_path):
    cfg = _cfg(tmp_path, "model.num_blocks=4", "cluster.num_workers=2", "train.epochs=2",
               "train.sync_mode=async", "train.sync_every=2", "data.train_limit=1438", "data.test_limit=359")
    summary = run_training(cfg, log=lambda s: None)
    steps = sum(b["steps"] for b in summary["blocks"])
    assert summary["shared_state_version"] == steps, "a push was lost or applied twice"
    assert summary["test_accuracy"] > 0.3


def test_resume_continues_where_it_stopped(ray_cluster, tmp_path):
    """Also what the run reports: the summary's step counts cover the whole run, not the last invocation, and
    metrics.jsonl holds each epoch once, although a driver that crashed in epoch 2 had written lines of it
    (here: the straight run's lines of epoch 2, appended as such a driver leaves them)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("model.num_blocks=2", "cluster.num_workers=1", "metrics.write_every_seconds=0.2")
    whole = run_training(_cfg(straight, *common, "train.epochs=2"), log=lambda s: None)
    run_training(_cfg(split, *common, "train.epochs=1"), log=lambda s: None)
    assert CheckpointStore(str(split)).read_manifest()["epochs_done"] == 1
    leftovers = [line for line in (straight / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["epoch"] > 1]
    assert leftovers
    with open(split / "metrics.jsonl", "a") as f:
        f.write("\n".join(leftovers) + "\n")
    logs: list[str] = []
    resumed = run_training(_cfg(split, *common, "train.epochs=2"), log=logs.append)
    assert any("resuming from epoch 1" in line for line in logs), logs
    a, b = CheckpointStore(str(straight)).load_resume(2), CheckpointStore(str(split)).load_resume(2)
    assert b.epochs_done == 2
    _assert_same_states(b.block_states, a.block_states)  # the resumed run lost and repeated nothing
    assert a.shared_state["version"] == b.shared_state["version"]
    for key in ("steps", "final_loss", "last_epoch_mean_loss"):
        assert [blk[key] for blk in resumed["blocks"]] == [blk[key] for blk in whole["blocks"]], key
    rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    ends = [(r["block"], r["epoch"]) for r in rows if r["event"] == "epoch"]
    assert sorted(ends) == [(1, 1), (1, 2), (2, 1), (2, 2)], ends


def test_finished_run_is_not_retrained(finished_run):
    first, manifest = finished_run.summary, os.path.join(finished_run.cfg.run.dir, "manifest.json")
    with open(manifest) as f:
        manifest_before = f.read()
    logs: list[str] = []
    again = run_training(finished_run.cfg, log=logs.append)
    assert any("already finished" in line for line in logs), logs
    with open(manifest) as f:
        assert f.read() == manifest_before
    assert again["test_accuracy"] == first["test_accuracy"]
    assert again["train_seconds"] == first["train_seconds"]
    assert again["blocks"] == first["blocks"]


def test_a_fractional_budget_trains_part_of_the_last_epoch_and_cannot_be_stretched(ray_cluster, tmp_path):
    """train.epochs = 1.5 on 2 workers: every block takes one epoch and half of the next (300 images, batch 64:
    5 batches, then round(0.5 x 5) = 2), the last curve point says 1.5 epochs, and the cosine rate is nearly
    spent at the end. The run is finished for the same budget; another budget would count the half epoch as
    whole, so it is refused."""
    cfg = _cfg(tmp_path, "model.num_blocks=2", "cluster.num_workers=2", "train.epochs=1.5", "train.lr_schedule=cosine")
    summary = run_training(cfg, log=lambda s: None)
    assert summary["epochs"] == 1.5
    assert [b["steps"] for b in summary["blocks"]] == [5 + 2, 5 + 2]
    assert [p["epoch"] for p in summary["curve"]] == [1, 1.5]
    assert CheckpointStore(str(tmp_path)).read_manifest()["epochs_done"] == 2
    states = CheckpointStore(str(tmp_path)).load_resume(2).block_states
    last_lr = states[1]["optimizer"]["param_groups"][0]["lr"]
    assert last_lr < 0.1 * cfg.train.lr  # the last step ran at 1.2 of 1.5 epochs: 0.5 (1 + cos 0.8 pi) = 0.095
    logs: list[str] = []
    run_training(cfg, log=logs.append)
    assert any("already finished" in line for line in logs), logs
    with pytest.raises(ConfigError, match=r"train.epochs=3: .*part-way through an epoch \(train.epochs=1.5\)"):
        run_training(_cfg(tmp_path, "model.num_blocks=2", "cluster.num_workers=2", "train.epochs=3",
                          "train.lr_schedule=cosine"), log=lambda s: None)

"""From the first run to a model in use: every run gets a directory of its own and resuming is explicit; with a
validation split the best epoch's chain is kept, the last beside it, and early stopping ends a run that stopped
improving; a per-epoch callback follows a run; the command line lists every key and prints the config."""
import json
import os
import time

import pytest
from custom_block import tiny_block

import noprop_dist
from noprop_dist.config import ConfigError, key_table, load_config
from noprop_dist.core.chain_file import read_chain_file
from noprop_dist.run import main

SMALL = {"data.train_limit": 300, "data.test_limit": 100, "train.batch_size": 64, "model.num_blocks": 2,
         "cluster.num_workers": 1, "metrics.enabled": False}


def test_a_run_without_run_dir_gets_a_new_directory_each_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    now = time.localtime()  # both calls in one second, as two runs started together would be
    monkeypatch.setattr(time, "localtime", lambda *a: now)
    first = load_config("quickstart").run.dir
    os.makedirs(first)  # taken (a run started in the same second): the next one does not reuse it
    second = load_config("quickstart").run.dir
    assert first.startswith(os.path.join("runs", "quickstart", "")) and second.startswith(first) and second != first
    assert load_config("mnist").run.dir.startswith(os.path.join("runs", "mnist", ""))
    assert load_config(None, ["run.dir=mine"]).run.dir == "mine"


def test_help_lists_every_config_key_with_its_default_and_print_config_prints_it(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for key, default, takes in key_table():
        assert any(line.split()[:2] == [key, default] and line.rstrip().endswith(takes)
                   for line in out.splitlines()), key
    assert {k for k, _, _ in key_table()} >= {"model.block", "data.val_fraction", "train.early_stop_patience"}
    assert main(["--print-config", "--config", "mnist", "--set", "train.epochs=3"]) == 0
    printed = capsys.readouterr().out
    assert "epochs: 3" in printed and "name: mnist" in printed


def test_resume_takes_the_runs_own_config_and_refuses_another(tmp_path, capsys):
    assert main(["--resume", str(tmp_path)]) == 2
    assert "no config.yaml there: not a run directory" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("data: {name: digits}\nmodel: {}\ntrain: {}\n")
    assert main(["--resume", str(tmp_path), "--config", "mnist"]) == 2
    assert "continues that run with its own config" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs a validation accuracy"):
        load_config(None, ["train.early_stop_patience=2", "eval.every_epochs=0"])


@pytest.mark.ray
def test_the_readme_commands_work_in_any_order(ray_cluster, tmp_path, monkeypatch, capsys):
    """Bug seen: the quickstart and then the README's Python API example both wrote runs/quickstart, and the
    second refused ("already holds 20 epochs"). Here each makes a run of its own, and --resume continues one."""
    monkeypatch.chdir(tmp_path)
    sets = [f"{k}={v}" for k, v in SMALL.items()]
    assert main(["--set", *sets, "train.epochs=2"]) == 0
    first = capsys.readouterr().out.split("run saved in ")[1].split()[0]
    seen: list[dict] = []
    result = noprop_dist.train("quickstart", log=lambda s: None, train={"epochs": 3}, on_epoch=seen.append, **SMALL)
    assert result.run_dir != first and os.path.isdir(first) and result.summary["epochs"] == 3
    # every epoch reported, the last one with the final chain's accuracy (no validation split: the test set's)
    assert [i["epoch"] for i in seen] == [1, 2, 3] and all("test_accuracy" in i for i in seen)
    assert seen[-1]["test_accuracy"] == result.summary["test_accuracy"]
    assert main(["--resume", first, "--set", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "resuming from epoch 2" in out and f"run saved in {first}" in out


@pytest.mark.ray
def test_the_best_validation_epoch_is_kept_early_stopping_ends_the_run_and_a_resume_keeps_it_exact(ray_cluster,
                                                                                                     tmp_path):
    """A block that cannot learn (a learning rate below fp32's resolution, and no BatchNorm whose running statistics
    would move): the validation accuracy is the same every epoch, so epoch 1 stays the best and patience 2 ends
    the run after epoch 3. chain.pt is epoch 1's chain, chain_last.pt epoch 3's. The same run interrupted by its
    on_epoch callback after epoch 2 and resumed ends exactly the same; run again it is not retrained."""
    common = SMALL | {"data.val_fraction": 0.2, "train.lr": 1e-30, "train.epochs": 10,
                      "train.early_stop_patience": 2}
    seen: list[dict] = []
    whole = noprop_dist.train(None, block=tiny_block, on_epoch=seen.append, log=lambda s: None,
                              **common | {"run.dir": str(tmp_path / "whole")}).summary
    assert [i["epoch"] for i in seen] == [1, 2, 3] and [i["stopping_early"] for i in seen] == [False, False, True]
    assert all("val_accuracy" in i and i["best_epoch"] == 1 for i in seen) and set(seen[0]["losses"]) == {1, 2}
    assert whole["early_stop"] == {"epoch": 3, "best_epoch": 1, "patience": 2} and whole["epochs_trained"] == 3
    assert whole["best_epoch"] == 1 and whole["last_chain"].endswith("chain_last.pt")
    assert [p["epoch"] for p in whole["curve"]] == [1, 2, 3] and all("val_accuracy" in p for p in whole["curve"])
    _, best = read_chain_file(str(tmp_path / "whole" / "chain.pt"))
    _, last = read_chain_file(str(tmp_path / "whole" / "chain_last.pt"))
    assert best["extra"]["best_epoch"] == 1 and last["extra"]["epoch"] == 3
    assert best["extra"]["test_accuracy"] == whole["test_accuracy"]

    class Interrupt(Exception):
        pass

    def stop_after_2(info):
        if info["epoch"] == 2:
            raise Interrupt

    run_dir = str(tmp_path / "interrupted")
    with pytest.raises(Interrupt):
        noprop_dist.train(None, block=tiny_block, on_epoch=stop_after_2, log=lambda s: None,
                          **common | {"run.dir": run_dir})
    resumed = noprop_dist.train(None, block=tiny_block, log=lambda s: None, **common | {"run.dir": run_dir}).summary
    for key in ("early_stop", "best_epoch", "val_accuracy", "test_accuracy", "epochs_trained", "curve"):
        assert resumed[key] == whole[key] or key == "curve" and [
            {k: v for k, v in p.items() if k != "train_seconds"} for p in resumed[key]] == [
            {k: v for k, v in p.items() if k != "train_seconds"} for p in whole[key]], key
    again_log: list[str] = []
    noprop_dist.train(None, block=tiny_block, log=again_log.append, **common | {"run.dir": run_dir})
    assert any("run already finished (3 epochs)" in line for line in again_log)
    assert json.loads((tmp_path / "interrupted" / "manifest.json").read_text())["epochs_done"] == 3


@pytest.mark.ray
def test_an_evaluation_longer_than_an_epoch_never_holds_the_workers_and_on_epoch_keeps_the_order(ray_cluster,
                                                                                                  tmp_path, capsys):
    """CT's 200-step evaluation of 200 images takes longer than an epoch of 64 images: the epochs after
    it are not evaluated while it runs (one line says so), the workers go on, and on_epoch still gets every epoch
    once and in order, the evaluated one with its accuracy (it lands after the epochs that followed it)."""
    seen: list[dict] = []
    summary = noprop_dist.train(
        "quickstart", on_epoch=seen.append, log=lambda s: None,
        **SMALL | {"model.method": "noprop_ct", "model.num_blocks": 1, "model.inference_steps": 200,
                   "data.train_limit": 64, "data.test_limit": 200, "train.epochs": 30, "run.dir": str(tmp_path)},
    ).summary
    # In order although an evaluation lands epochs later and the next one starts as it lands (here, typically,
    # after epoch 1's a second one some 25 epochs on: the figures of the epochs between wait for both).
    assert [i["epoch"] for i in seen] == list(range(1, 31))
    measured = [i["epoch"] for i in seen if "test_accuracy" in i]
    assert measured[0] == 1 and measured[-1] == 30 and len(measured) < 30, measured  # some epochs not evaluated
    assert [p["epoch"] for p in summary["curve"]] == measured
    assert all(b < 5 for b in summary["epoch_boundary_seconds"]), summary["epoch_boundary_seconds"]
    assert "epoch 2: not evaluated, the evaluation of epoch 1 is still running" in capsys.readouterr().out


@pytest.mark.ray
def test_an_evaluation_in_flight_when_training_ends_runs_beside_the_final_one(ray_cluster, tmp_path, capsys):
    """Two CT epochs, the chain evaluated after the first: that evaluation (200 steps on 200 images) outlasts
    epoch 2 (64 images), so it is in flight when training ends. The final evaluation is sent to the workers
    before it is waited for (the two then run side by side, not one after the other), and its figures still
    land: the curve and on_epoch have epoch 1's accuracy."""
    seen: list[dict] = []
    summary = noprop_dist.train(
        "quickstart", on_epoch=seen.append, log=lambda s: None,
        **SMALL | {"model.method": "noprop_ct", "model.num_blocks": 1, "model.inference_steps": 200,
                   "data.train_limit": 64, "data.test_limit": 200, "train.epochs": 2, "eval.every_epochs": 1,
                   "run.dir": str(tmp_path)},
    ).summary
    out = capsys.readouterr().out
    final = out.index("scoring the trained chain on the workers: 200 test images, mean stage by stage")
    assert final < out.index("epoch 1: test accuracy of the chain as it stands"), out
    assert [p["epoch"] for p in summary["curve"]] == [1, 2]
    assert [i["epoch"] for i in seen] == [1, 2] and all("test_accuracy" in i for i in seen)

"""The Table 1 harness (noprop_dist.paper.harness), the paper's numbers, and the time-to-accuracy logic.

The end-to-end test trains two tiny digits runs through the real command (Ray, subprocesses) and
checks table.md, results.json and the Fig. 3 plot; everything else runs on hand-made summaries.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import one_error_line, run_main

from noprop_dist.paper import harness as reproduce
from noprop_dist.paper import numbers as paper
from noprop_dist.paper.harness import HarnessError, build_row, mean_se, seed_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["model.num_blocks=2", "cluster.num_workers=1", "train.epochs=2", "data.train_limit=300",
        "data.test_limit=100", "metrics.enabled=false"]


def _cli(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "noprop_dist.reproduce", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def _benchmark_module(name: str = "time_to_accuracy"):
    """benchmarks/<name>.py, which imports its sibling `common` as a script does: put it on the path."""
    bench = os.path.join(REPO, "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    spec = importlib.util.spec_from_file_location(name, os.path.join(bench, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



def _summary(test: float, train: float | None = 0.9, mem: float | None = 900.0, kind: str = "rss",
             epochs: int = 2, run_dir: str = "/nonexistent") -> dict:
    return {"method": "noprop_dt", "dataset": "mnist", "embedding": "one_hot", "num_workers": 1, "epochs": epochs,
            "seed": 0, "test_accuracy": test, "train_accuracy": train, "train_seconds": 10.0,
            "curve": [{"epoch": epochs, "train_seconds": 10.0, "test_accuracy": test}],
            "peak_memory_mb": mem, "peak_memory_kind": kind, "run_dir": run_dir}


# ----------------------------------------------------------------------------- statistics

def test_mean_se_is_std_ddof1_over_sqrt_n():
    mean, se = mean_se([0.90, 0.92, 0.97])
    assert mean == pytest.approx(0.93)
    sd = math.sqrt(((0.90 - 0.93) ** 2 + (0.92 - 0.93) ** 2 + (0.97 - 0.93) ** 2) / 2)
    assert se == pytest.approx(sd / math.sqrt(3))
    assert mean_se([0.5, 0.5]) == (0.5, 0.0)  # no spread: a true 0, unlike n = 1


def test_mean_se_of_one_value_has_no_se():
    assert mean_se([0.8]) == (0.8, None)
    assert reproduce.format_pct(reproduce.stats([0.8])) == "80.00 ± n/a"
    with pytest.raises(ValueError):
        mean_se([])
    assert reproduce.stats([]) is None and reproduce.format_pct(None) == "-"


def test_format_pct():
    assert reproduce.format_pct(reproduce.stats([0.99, 0.98])) == "98.50 ± 0.50"


# ----------------------------------------------------------------------------- the paper's numbers

def test_paper_numbers_match_noprop_md():
    assert paper.paper_test_accuracy("noprop_dt", "mnist", "one_hot") == 99.47
    assert paper.paper_test_accuracy("noprop_dt", "cifar10", "prototype") == 80.54
    assert paper.paper_test_accuracy("noprop_fm", "cifar100", "one_hot") == 6.38
    assert paper.paper_test_accuracy("noprop_ct", "cifar100", "learned") == 33.99
    assert paper.paper_test_accuracy("backprop", "cifar100", "prototype") == 47.80
    assert paper.paper_test_accuracy("adjoint", "cifar10", "one_hot") == 66.78
    assert paper.paper_test_accuracy("adjoint", "cifar10", "learned") is None  # '-' in the paper
    assert paper.paper_test_accuracy("dtp", "cifar10", "learned") == 50.71  # no embedding in DTP
    assert paper.paper_test_accuracy("noprop_dt", "digits", "one_hot") is None
    assert paper.EARLIER_METHODS["Forward-Forward"] == {"mnist": 98.63}
    assert paper.EARLIER_METHODS["LG-FG-A"] == {"mnist": 97.45, "cifar10": 69.32}
    assert paper.paper_memory_gb("adjoint", "cifar100", "one_hot") == 6.45
    assert paper.paper_memory_gb("noprop_dt", "mnist", "learned") is None  # Table 2 is one-hot only
    assert paper.paper_epochs("noprop_ct", "cifar100") == 1000 and paper.paper_epochs("backprop", "cifar10") == 150


def test_table1_cells_cover_every_number():
    cells = paper.table1_cells()
    assert len(cells) == len(set(cells)) == 3 * 3 * 4 + 3 + 2  # 4 full rows, adjoint one-hot, DTP
    assert all(paper.paper_test_accuracy(*c) is not None for c in cells)


# ----------------------------------------------------------------------------- configs and arguments

def test_config_path(tmp_path):
    for name in ("mnist.yaml", "quickstart.yaml", "cifar10_ct.yaml"):
        (tmp_path / name).write_text("{}\n")
    d = str(tmp_path)
    assert reproduce.config_path("noprop_dt", "mnist", d) == os.path.join(d, "mnist.yaml")
    assert reproduce.config_path("noprop_ct", "cifar10", d) == os.path.join(d, "cifar10_ct.yaml")
    assert reproduce.config_path("noprop_dt", "digits", d) == os.path.join(d, "quickstart.yaml")
    with pytest.raises(HarnessError, match="mnist_backprop.yaml does not exist"):
        reproduce.config_path("backprop", "mnist", d)
    with pytest.raises(HarnessError, match="quickstart_fm.yaml does not exist"):
        reproduce.config_path("noprop_fm", "digits", d)


def test_missing_config_is_one_line_exit_2(tmp_path):
    code, lines, _ = run_main(reproduce, ["--method", "noprop_fm", "--dataset", "cifar100", "--config-dir",
                                          str(tmp_path), "--out", str(tmp_path / "out")])
    one_error_line(code, lines, "cifar100_fm.yaml")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override,key", [("run.dir=x", "run.dir"), ("train.seed=3", "train.seed"),
                                          ("train.epochs=zero", "train.epochs")])
def test_bad_set_is_one_line_exit_2(tmp_path, override, key):
    one_error_line(*run_main(reproduce, ["--dataset", "digits", "--seeds", "0", "--out", str(tmp_path / "out"),
                                         "--set", override])[:2], key)
    assert not (tmp_path / "out" / "runs").exists(), "nothing may run after a bad --set"


def test_all_lists_every_cell_and_runs_nothing(tmp_path):
    code, errors, out = run_main(reproduce, ["--all", "--seeds", "0", "1", "--out", str(tmp_path / "out")])
    assert code == 0, errors
    lines = out.strip().splitlines()
    assert len(lines) == len(paper.table1_cells())
    assert any(line.startswith("python -m noprop_dist.reproduce --method noprop_dt --dataset mnist "
                               "--embedding one_hot --seeds 0 1") and "# needs" not in line for line in lines)
    assert not (tmp_path / "out").exists()


def test_run_overrides_put_the_harness_keys_last():
    o = reproduce.run_overrides("noprop_dt", "digits", "learned", 3, "out/x", ["train.epochs=2"])
    assert o[0] == "train.epochs=2" and o[-2:] == ["train.seed=3", "run.dir=out/x"]
    assert "eval.train_accuracy=true" in o  # Table 1's train column
    cmd = reproduce.run_command("configs/quickstart.yaml", o)
    assert cmd[1:5] == ["-m", "noprop_dist.run", "--config", "configs/quickstart.yaml"]
    assert cmd[5:7] == ["--set", "train.epochs=2"]


# ----------------------------------------------------------------------------- rows, results.json, table.md

def test_a_training_subprocess_log_shows_each_line_while_the_run_goes_on(tmp_path):
    """A long run's progress must reach its log as it is printed, not when the run ends (a file written
    through Python's default block buffer stays empty for the first 8 KB)."""
    import threading
    import time

    go_on, log = tmp_path / "go_on", tmp_path / "run.log"
    child = ("import os, time\nprint('epoch 1/2 step 10/469', flush=True)\n"
             f"while not os.path.exists({str(go_on)!r}):\n    time.sleep(0.05)\n")
    run = threading.Thread(target=reproduce.train_subprocess, args=([sys.executable, "-c", child], str(log), False))
    run.start()
    try:
        deadline, seen = time.monotonic() + 30, ""
        while time.monotonic() < deadline and "step 10/469" not in seen:
            time.sleep(0.1)
            seen = log.read_text() if log.exists() else ""
    finally:
        go_on.touch()
        run.join(timeout=30)
    assert "step 10/469" in seen, f"the log held {seen!r} while the run was still going"
    assert "step 10/469" in log.read_text()


def test_inference_runs_use_consecutive_noise_seeds():
    calls = []

    def fake_evaluate(run_dir, seed):
        calls.append((run_dir, seed))
        return 0.5 + seed / 1000

    assert reproduce.inference_accuracies("r", 3, 1234, fake_evaluate) == [1.734, 1.735, 1.736]
    assert calls == [("r", 1234), ("r", 1235), ("r", 1236)]


def test_peak_memory_falls_back_to_worker_rss():
    assert reproduce.peak_memory({"peak_memory_mb": 512.0, "peak_memory_kind": "gpu"}) == (512.0, "gpu")
    old = {"workers": [{"peak_rss_mb": 800.0}, {"peak_rss_mb": 950.5}]}
    assert reproduce.peak_memory(old) == (950.5, "rss")
    assert reproduce.peak_memory({}) == (None, None)


def _row(method="noprop_dt", dataset="mnist", embedding="one_hot", values=((0.99, 0.98), (0.97, 0.99))):
    summaries = [_summary(v[0]) for v in values]
    seeds = [seed_record(k, f"/nonexistent/seed{k}", s, list(v)) for k, (s, v) in enumerate(zip(summaries, values))]
    return build_row(method, dataset, embedding, "configs/mnist.yaml", ["train.epochs=2"], len(values[0]),
                     seeds, summaries)


def test_build_row_statistics_over_seeds_and_inference_runs():
    row = _row()
    assert row["test"]["n"] == 4 and row["test"]["mean"] == pytest.approx(0.9825)
    assert row["test"]["se"] == pytest.approx(mean_se([0.99, 0.98, 0.97, 0.99])[1])
    assert row["train"]["n"] == 2 and row["train"]["se"] == 0.0  # one train accuracy per seed
    assert row["paper"] == {"test_accuracy": 99.47, "memory_gb": 0.49, "epochs": 100}
    assert row["peak_memory_mb"] == 900.0 and row["peak_memory_kind"] == "rss" and row["epochs"] == [2]
    baseline = _row(method="backprop", values=((0.99,), (0.98,)))
    assert baseline["inference_runs"] == 1 and baseline["test"]["n"] == 2


def test_results_merge_and_table(tmp_path):
    out = str(tmp_path)
    reproduce.merge_row(out, _row())
    reproduce.merge_row(out, _row(method="backprop", values=((0.995,), (0.993,))))
    results = reproduce.merge_row(out, _row(values=((0.96, 0.95), (0.97, 0.96))))  # same cell again: replaced
    assert sorted(results["rows"]) == ["backprop-mnist-one_hot", "noprop_dt-mnist-one_hot"]
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert results["rows"]["noprop_dt-mnist-one_hot"]["test"]["mean"] == pytest.approx(0.96)
    table = reproduce.render_table(results, ["fig3_mnist_one_hot.png"])
    lines = table.splitlines()
    backprop = next(line for line in lines if line.startswith("| Backprop (DT setting) | mnist | one-hot | 99.46 |"))
    dt = next(line for line in lines if line.startswith("| NoProp-DT | mnist | one-hot | 99.47 |"))
    assert lines.index(backprop) < lines.index(dt)  # the paper's order
    assert "| 96.00 ± 0.41 | 96.00 ± 0.41 | 4 (2 x 2) |" in dt and "| 2 / 100 |" in dt and "900 MiB (rss) | 0.49 |" in dt
    assert "| 99.40 ± 0.10 | - | 2 (2 x 1) |" in backprop
    assert "98.63 (mnist)" in table  # Forward-Forward, for reference
    assert "![fig3_mnist_one_hot](fig3_mnist_one_hot.png)" in table


def test_row_reports_the_papers_sampler_beside_the_runs():
    """A run evaluated with `mean` keeps Table 1's sampler (eq3) in its own column, from its own values."""
    summary = _summary(0.99) | {"sampler": "mean"}
    seeds = [seed_record(0, "/nonexistent/seed0", summary, [0.99, 0.99], paper_values=[0.97, 0.96])]
    row = build_row("noprop_dt", "mnist", "one_hot", "configs/mnist.yaml", [], 2, seeds, [summary])
    assert row["sampler"] == "mean" and row["paper_sampler"] == "eq3"
    assert row["test"]["mean"] == pytest.approx(0.99) and row["test_paper_sampler"]["mean"] == pytest.approx(0.965)
    assert "| 99.00 ± 0.00 | 96.50 ± 0.50 |" in reproduce.table_line(row)


# ----------------------------------------------------------------------------- time to accuracy

def test_time_to_accuracy_first_epoch_reaching_target():
    tta = _benchmark_module().time_to_accuracy
    curve = [{"epoch": 3, "train_seconds": 30.0, "test_accuracy": 0.91},
             {"epoch": 1, "train_seconds": 10.0, "test_accuracy": 0.50},
             {"epoch": 2, "train_seconds": 20.5, "test_accuracy": 0.90},
             {"epoch": 4, "train_seconds": 40.0, "test_accuracy": 0.85}]
    assert tta(curve, 0.9) == {"epoch": 2, "train_seconds": 20.5, "test_accuracy": 0.90}  # >=, out of order
    assert tta(curve, 0.905)["epoch"] == 3
    assert tta(curve, 0.95) is None
    assert tta([], 0.1) is None


def test_time_to_accuracy_table():
    m = _benchmark_module()
    s = _summary(0.93)
    s["curve"] = [{"epoch": 1, "train_seconds": 5.0, "test_accuracy": 0.7},
                  {"epoch": 2, "train_seconds": 9.5, "test_accuracy": 0.93}]
    rows = [m.result_row("noprop_dt", 2, s, [0.9, 0.7]), m.result_row("backprop", 1, s, [0.95, 0.7])]
    assert rows[0]["epochs_to_target"] == [2, 1] and rows[0]["seconds_to_target"] == [9.5, 5.0]
    assert rows[1]["epochs_to_target"] == [None, 1]
    table = m.format_table(rows).splitlines()
    assert "90%" in table[0] and "70%" in table[0]
    assert table[1].split()[:6] == ["noprop_dt", "2", "2", "9.5", "1", "5.0"]
    assert table[2].split()[:6] == ["backprop", "1", "-", "-", "1", "5.0"]
    # At equal epochs: a run with fewer epochs shows '-' where it has no point.
    short = _summary(0.8, epochs=1)
    short["curve"] = [{"epoch": 1, "train_seconds": 4.0, "test_accuracy": 0.8}]
    epochs = m.format_epoch_table([rows[0], m.result_row("backprop", 2, short, [0.9])]).splitlines()
    assert epochs[0].split() == ["epoch", "noprop_dt", "w2", "backprop", "w2"]
    assert epochs[1].split() == ["1", "70.00%", "80.00%"] and epochs[2].split() == ["2", "93.00%", "-"]


def test_time_to_accuracy_names_budgets_and_reads_a_reference_run(tmp_path):
    """Budgets of one method get their own columns; another code's result file (public_noprop.py's) becomes a row
    like a run's, and a file that is not one is refused naming it."""
    m = _benchmark_module()
    half, whole = _summary(0.88, epochs=0.5), _summary(0.9, epochs=1)
    half["curve"] = [{"epoch": 0.5, "train_seconds": 140.0, "test_accuracy": 0.88}]
    whole["curve"] = [{"epoch": 1, "train_seconds": 280.0, "test_accuracy": 0.90}]
    ref = tmp_path / "public.json"
    ref.write_text(json.dumps({"method": "public_dt", "workers": 1, "label": "public, 1 process", "epochs": 1,
                               "curve": [{"epoch": 1, "train_seconds": 309.0, "test_accuracy": 0.883}]}))
    rows = [m.result_row("noprop_dt", 2, half, [0.88]), m.result_row("noprop_dt", 2, whole, [0.88]),
            m.reference_row(str(ref), [0.88])]
    assert rows[2]["label"] == "public, 1 process" and rows[2]["seconds_to_target"] == [309.0]
    table = m.format_table(rows).splitlines()
    assert [ln.split()[:4] + ln.split()[-1:] for ln in table[1:]] == [
        ["noprop_dt", "2", "0.5", "140.0", "0.5"], ["noprop_dt", "2", "1", "280.0", "1"],
        ["public_dt", "1", "1", "309.0", "1"]]
    assert m.format_epoch_table(rows).splitlines()[0].split() == [
        "epoch", "noprop_dt", "w2", "e0.5", "noprop_dt", "w2", "e1", "public_dt", "w1", "e1"]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(HarnessError, match="--reference .*bad.json"):
        m.reference_row(str(tmp_path / "bad.json"), [0.88])


def test_public_noprop_reads_its_metrics_log_and_writes_the_idx_files_torchvision_reads(tmp_path):
    """The public code's per-batch log in its format: training time runs from the first batch's start to the last
    batch's end of each epoch (its evaluation between epochs left out); its IDX files round-trip."""
    m = _benchmark_module("public_noprop")
    log = tmp_path / "metrics.csv"
    log.write_text("batch,epoch,wall_time_seconds,batch_time_seconds,val_accuracy\n"
                   "-1,0,100.0,,9.99\n0,1,101.0,0.5,0.0\n1,1,130.5,0.6,0.0\n-1,1,160.0,,88.31\n"
                   "0,2,161.0,0.4,0.0\n1,2,190.6,0.5,0.0\n-1,2,220.0,,89.50\n")
    curve = m.epoch_curve(str(log))
    assert [p["epoch"] for p in curve] == [1, 2]
    assert curve[0]["train_seconds"] == pytest.approx(30.0) and curve[1]["train_seconds"] == pytest.approx(60.0)
    assert [p["test_accuracy"] for p in curve] == pytest.approx([0.8831, 0.895])
    from noprop_dist.data import read_idx

    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    m.write_idx(str(tmp_path / "x-idx3-ubyte"), images)
    assert np.array_equal(read_idx(str(tmp_path / "x-idx3-ubyte"), 3), images)


def test_time_to_accuracy_config_fallbacks():
    """Without a config of its own, backprop takes the dataset's NoProp-DT config and a CT-setting method
    its MNIST config (Table 3's settings for that method)."""
    m = _benchmark_module()
    assert os.path.basename(m.method_config("backprop", "digits")) == "quickstart.yaml"
    assert os.path.basename(m.method_config("noprop_ct", "digits")) == "mnist_ct.yaml"
    assert os.path.basename(m.method_config("adjoint", "digits")) == "mnist_adjoint.yaml"
    assert os.path.basename(m.method_config("noprop_fm", "fashion_mnist")) == "fashion_mnist_fm.yaml"  # its own


# ----------------------------------------------------------------------------- end to end

@pytest.mark.ray
def test_harness_end_to_end_on_tiny_digits_runs(ray_head, tmp_path):
    """Two seeds x two inference runs of a tiny real NoProp-DT run, on the session's cluster; then the same command
    again. Slow: the harness runs each seed's training as a process of its own, as it does for real."""
    out = tmp_path / "out"
    reproduce.merge_row(str(out), _row())  # an earlier invocation's row (MNIST): the table must keep it
    args = ["--method", "noprop_dt", "--dataset", "digits", "--embedding", "learned", "--seeds", "0", "1",
            "--inference-runs", "2", "--out", str(out), "--quiet", "--set", *TINY]
    p = _cli(*args, env=ray_head.driver_env())
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert sorted(results["rows"]) == ["noprop_dt-digits-learned", "noprop_dt-mnist-one_hot"]
    row = results["rows"]["noprop_dt-digits-learned"]
    assert row["seeds"] == [0, 1] and row["inference_runs"] == 2 and row["epochs"] == [2]
    assert row["test"]["n"] == 4 and row["paper"]["test_accuracy"] is None
    summaries = []
    for rec in row["per_seed"]:
        s = json.loads((tmp_path / "out" / "runs" / "noprop_dt-digits-learned" / f"seed{rec['seed']}" /
                        "summary.json").read_text())
        summaries.append(s)
        assert s["method"] == "noprop_dt" and s["seed"] == rec["seed"] and s["num_workers"] == 1
        # The first inference run uses the run's own noise seed: it is the run's own evaluation.
        assert rec["test_accuracies"][0] == s["test_accuracy"] and len(rec["test_accuracies"]) == 2
        assert rec["peak_memory_mb"] == s["peak_memory_mb"] and rec["peak_memory_kind"] == s["peak_memory_kind"]
    all_values = [v for rec in row["per_seed"] for v in rec["test_accuracies"]]
    assert (row["test"]["mean"], row["test"]["se"]) == pytest.approx(mean_se(all_values))
    train = [s["train_accuracy"] for s in summaries if s.get("train_accuracy") is not None]
    assert (row["train"] or {}).get("n", 0) == len(train)

    table = (out / "table.md").read_text()
    ours = next(line for line in table.splitlines() if line.startswith("| NoProp-DT | digits | dim=20 | - |"))
    assert f"| {reproduce.format_pct(row['test'])} | 4 (2 x 2) |" in ours and " ± " in ours
    assert "| 2 / - |" in ours and "(rss)" in ours and "CPU" in ours
    assert "| NoProp-DT | mnist | one-hot | 99.47 | 98.25 ± " in table  # the paper's number beside ours

    fig = out / "fig3_digits_learned.png"
    assert fig.read_bytes()[:8] == PNG_MAGIC and fig.stat().st_size > 1000
    assert "fig3_digits_learned.png" in table

    # A learned d = 20 embedding is no image: Fig. 2 refuses it, naming the dimension.
    from noprop_dist.paper.plots import PlotError, plot_embeddings
    with pytest.raises(PlotError, match="d = 20 is not the image size 1x8x8 = 64"):
        plot_embeddings(row["per_seed"][0]["run_dir"], str(tmp_path / "fig2.png"))

    # The time-to-accuracy logic on a real curve: every epoch is there, target 0 is met at once.
    tta = _benchmark_module().time_to_accuracy
    assert [p["epoch"] for p in summaries[0]["curve"]] == [1, 2]
    assert tta(summaries[0]["curve"], 0.0)["epoch"] == 1
    assert tta(summaries[0]["curve"], 1.01) is None

    # The same command again (its main, in this process): finished runs are re-evaluated, not retrained; the
    # numbers do not move.
    code, errors, _ = run_main(reproduce, args)
    assert code == 0, errors[-20:]
    assert "already finished" in (out / "runs" / "noprop_dt-digits-learned" / "seed0.log").read_text()
    row2 = json.loads((out / "results.json").read_text())["rows"]["noprop_dt-digits-learned"]
    assert row2["test"] == row["test"]

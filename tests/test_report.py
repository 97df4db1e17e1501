"""<run.dir>/metrics.jsonl and report.md, from the counters the driver polls (no Ray needed)."""
from __future__ import annotations

import json
import math
import time

import pytest

from noprop_dist.observability.run_log import MetricsLog, read_metrics, write_report
from noprop_dist.training import ShardStats


def _blocks(steps: int, spe: int = 10) -> dict[int, dict]:
    out = {}
    for t in (1, 2):
        st = ShardStats(shard=t)
        st.start_epoch(spe)
        for _ in range(steps):
            st.record(loss=2.0 / t, batch=32, compute_s=0.01, sync_s=0.002)
        out[t] = st.as_dict()
    return out


WORKERS = {0: {"embedding_version_lag": 2, "push_seconds": 0.1, "pull_seconds": 0.3}}
OWNER = {1: 0, 2: 0}


def test_polls_are_throttled_epoch_ends_always_written(tmp_path):
    log = MetricsLog(str(tmp_path), "r-1", every_seconds=3600)
    assert log.record(_blocks(1), WORKERS, OWNER)
    assert not log.record(_blocks(2), WORKERS, OWNER), "a second poll within the interval is skipped"
    assert log.record(_blocks(3), WORKERS, OWNER, event="epoch")
    rows = read_metrics(str(tmp_path))
    assert [(r["event"], r["block"]) for r in rows] == [("poll", 1), ("poll", 2), ("epoch", 1), ("epoch", 2)]
    last = rows[-1]
    assert last["run"] == "r-1" and last["worker"] == 0 and last["embedding_version_lag"] == 2
    assert last["samples"] == 96 and math.isclose(last["epoch"], 0.3)
    assert math.isclose(last["step_seconds_mean"], 0.012)
    assert rows[0]["samples_per_second"] is None  # no earlier line to measure from
    assert last["samples_per_second"] > 0


def test_blocks_not_started_and_nan_losses(tmp_path):
    log = MetricsLog(str(tmp_path), "r-1", every_seconds=0.0)
    assert not log.record({1: ShardStats(shard=1).as_dict()}, WORKERS, {1: 0}), "nothing to say yet"
    fresh = ShardStats(shard=1)
    fresh.start_epoch(5)  # started, no step yet: loss is NaN, which JSON cannot hold
    assert log.record({1: fresh.as_dict()}, WORKERS, {1: 0})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and json.loads(text)["loss"] is None


def test_a_restarted_worker_gives_no_negative_rate(tmp_path):
    log = MetricsLog(str(tmp_path), "r-1", every_seconds=0.0)
    log.record(_blocks(5), WORKERS, OWNER)
    time.sleep(0.01)
    log.record(_blocks(1), WORKERS, OWNER)  # counters back near 0: a new worker process
    assert all(r["samples_per_second"] is None for r in read_metrics(str(tmp_path)))


def _summary() -> dict:
    return {
        "dataset": "digits", "num_blocks": 2, "num_workers": 1, "epochs": 1, "sync_mode": "sync",
        "test_accuracy": 0.5, "train_seconds": 3.0, "epoch_seconds": [3.0],
        "blocks": [{"block": t, "worker": 0, "samples_per_second": 1000.0, "final_loss": 1.0,
                    "last_epoch_mean_loss": 1.5, "steps": 10, "compute_seconds": 0.3, "sync_seconds": 0.1}
                   for t in (1, 2)],
        "workers": [{"rank": 0, "device": "cpu", "push_seconds": 0.1, "pull_seconds": 0.2, "peak_rss_mb": 500.0}],
    }


def test_report_tables_blocks_and_workers(tmp_path):
    log = MetricsLog(str(tmp_path), "r-1", every_seconds=0.0)
    for steps in (1, 2, 3):
        log.record(_blocks(steps), WORKERS, OWNER)
        time.sleep(0.01)
    report = open(write_report(str(tmp_path), _summary(), "r-1"), encoding="utf-8").read()
    assert report.startswith("# Run report: r-1") and 'run="r-1"' in report and "**0.5000**" in report
    rows = [line for line in report.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and "| 40.00 |" in rows[0] and "25.0%" in rows[0]  # 400 ms / 10 steps; 0.1 of 0.4 s
    assert "| 0 | cpu | 0.10 | 0.20 | 500 |" in report
    assert "6 lines in `metrics.jsonl`" in report


def test_report_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    log = MetricsLog(str(tmp_path), "r-1", every_seconds=0.0)
    for steps in (1, 2, 3):
        log.record(_blocks(steps), WORKERS, OWNER)
        time.sleep(0.01)
    report = open(write_report(str(tmp_path), _summary(), "r-1"), encoding="utf-8").read()
    png = (tmp_path / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "![loss and samples/s per block over time](metrics.png)" in report


def test_report_of_a_run_without_metrics_file(tmp_path):
    report = open(write_report(str(tmp_path), _summary(), "r-1"), encoding="utf-8").read()
    assert "0 lines in `metrics.jsonl`" in report and not (tmp_path / "metrics.png").exists()


def test_report_of_a_run_whose_metrics_file_has_a_torn_line(tmp_path):
    """A driver killed mid-append leaves half a line; the report (and a re-evaluation) still works."""
    log = MetricsLog(str(tmp_path), "r-1", every_seconds=0.0)
    log.record(_blocks(1), WORKERS, OWNER)
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"time": 17, "run": "r-1", "blo')
    report = open(write_report(str(tmp_path), _summary(), "r-1"), encoding="utf-8").read()
    assert "2 lines in `metrics.jsonl`" in report


def test_report_skips_metrics_lines_without_the_fields_it_reads(tmp_path, capsys):
    """A valid JSON line that lacks samples_per_second (say) used to end the run in a KeyError after
    summary.json was written."""
    from noprop_dist.observability.run_log import METRICS_FILE

    (tmp_path / METRICS_FILE).write_text(json.dumps({"block": 1, "time": 1.0}) + "\n")
    summary = {"dataset": "digits", "num_blocks": 2, "num_workers": 1, "epochs": 1, "sync_mode": "sync",
               "test_accuracy": 0.5, "train_seconds": 1.0, "epoch_seconds": [1.0], "blocks": [], "workers": []}
    write_report(str(tmp_path), summary, "r")
    assert "0 lines in `metrics.jsonl`" in (tmp_path / "report.md").read_text()
    assert "1 lines without the fields" in capsys.readouterr().out

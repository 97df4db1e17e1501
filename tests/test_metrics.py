"""The metric definitions (names, types, labels), the run label, and the recorders' bookkeeping."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from noprop_dist.config import load_config
from noprop_dist.observability import metrics as M
from noprop_dist.training import ShardStats
from noprop_dist.training.shared_state import ExchangeStats

PROMETHEUS_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def test_names_are_unique_valid_and_namespaced():
    names = [s.name for s in M.ALL_METRICS]
    assert len(names) == len(set(names))
    for s in M.ALL_METRICS:
        assert PROMETHEUS_NAME.match(s.family) and s.name.startswith("noprop_"), s.name
        assert not s.name.endswith("_total"), "Ray appends _total to counters itself"
        assert s.help and s.help.endswith("."), s.name
    assert set(M.WORKER_METRICS) | set(M.SERVER_METRICS) == set(M.ALL_METRICS)
    assert not set(M.WORKER_METRICS) & set(M.SERVER_METRICS)


def test_types_and_the_series_prometheus_sees():
    assert {s.kind for s in M.ALL_METRICS} <= set(M.KINDS)
    assert M.SHARD_SAMPLES.series_names() == ("ray_noprop_shard_samples_total",)
    assert M.SHARD_LOSS.series_names() == ("ray_noprop_shard_loss",)
    assert M.SHARD_STEP_SECONDS.series_names() == tuple(
        f"ray_noprop_shard_step_seconds_{x}" for x in ("bucket", "sum", "count"))
    for s in M.ALL_METRICS:  # p50 / p95 need histograms; latencies and step times are histograms
        if s.name.endswith("_seconds"):
            assert s.kind == "histogram", s.name
        if s.kind == "histogram":
            assert list(s.buckets) == sorted(set(s.buckets)) and s.buckets[0] > 0, s.name
        else:
            assert s.buckets == (), s.name


def test_labels_are_run_and_shard_or_worker_never_a_ray_id():
    for s in M.ALL_METRICS:
        assert s.labels[0] == "run", s.name
        assert not {"WorkerId", "worker_id", "pid", "actor_id", "node"} & set(s.labels), s.name
    per_shard = [s for s in M.ALL_METRICS if s.name.startswith("noprop_shard_")]
    assert per_shard == list(M.SHARD_METRICS) and all(s.labels == ("run", "shard", "worker") for s in per_shard)
    assert all(s.labels == ("run", "worker") for s in M.WORKER_METRICS if s not in per_shard)
    assert M.PS_APPLY_SECONDS.labels == ("run",)


def test_legacy_rules_give_every_per_shard_series_its_old_name_and_label():
    """Dashboards written for noprop_block_* {block} keep working: one recording rule per series."""
    (group,) = M.legacy_recording_rules()["groups"]
    records = {r["record"]: r["expr"] for r in group["rules"]}
    new = [n for s in M.SHARD_METRICS for n in s.series_names()]
    assert sorted(records) == sorted(n.replace("_shard_", "_block_") for n in new)
    assert records["ray_noprop_block_step_seconds_bucket"] == \
        'label_replace(ray_noprop_shard_step_seconds_bucket, "block", "$1", "shard", "(.*)")'
    assert not {n for s in M.ALL_METRICS for n in s.series_names()} & set(records), "an old name is in use again"


def test_run_id_is_stable_across_a_resume_and_differs_between_runs(tmp_path):
    base = [f"run.dir={tmp_path}/fmnist w10"]
    rid = M.run_id(load_config(None, base))
    assert re.fullmatch(r"fmnist_w10-[0-9a-f]{8}", rid), rid
    # What a resume may change keeps the id; what makes another run changes it.
    for same in ("train.epochs=40", "cluster.num_workers=5", "metrics.write_every_seconds=1"):
        assert M.run_id(load_config(None, [*base, same])) == rid, same
    for other in ("train.seed=1", "model.num_blocks=4", "data.name=mnist", f"run.dir={tmp_path}/other"):
        assert M.run_id(load_config(None, [*base, other])) != rid, other
    assert M.run_id(load_config(None, [*base, "metrics.run_id=exp-7"])) == "exp-7"
    # A derived id is itself a valid metrics.run_id.
    assert load_config(None, [f"metrics.run_id={rid}"]).metrics.run_id == rid


def test_definitions_and_report_import_neither_ray_nor_prometheus_client():
    code = ("import sys, noprop_dist.observability.metrics, noprop_dist.observability.run_log; "
            "bad = [m for m in ('ray', 'prometheus_client') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


# --- the recorders (ray.util.metrics objects record without a cluster; nothing is exported then) ---------

def _stepped(stats: ShardStats, steps: int, seconds: float, batch: int = 32) -> None:
    for _ in range(steps):
        stats.record(loss=1.0, batch=batch, compute_s=seconds * 0.75, sync_s=seconds * 0.25)


def test_step_tracker_turns_totals_into_per_step_times():
    from noprop_dist.distributed.telemetry import StepTracker

    stats = {1: ShardStats(shard=1), 2: ShardStats(shard=2)}
    tracker = StepTracker(stats)
    assert tracker.advance() == []
    _stepped(stats[1], 1, 0.004)
    _stepped(stats[2], 1, 0.010)
    assert [(t, n, round(s, 9)) for t, n, s in tracker.advance()] == [(1, 1, 0.004), (2, 1, 0.010)]
    _stepped(stats[2], 3, 0.002)  # read late: three steps, their mean time
    assert [(t, n, round(s, 9)) for t, n, s in tracker.advance()] == [(2, 3, 0.002)]
    assert tracker.advance() == []


def test_worker_telemetry_counts_each_sample_once():
    from noprop_dist.distributed.telemetry import WorkerTelemetry

    stats = {3: ShardStats(shard=3)}
    stats[3].start_epoch(10)
    exchange = ExchangeStats()
    tel = WorkerTelemetry("unit-test", 0, stats, total_epochs=2, device=torch.device("cpu"), exchange=exchange)
    try:
        assert set(tel.m) == {s.name for s in M.WORKER_METRICS if not s.gpu_only}  # no GPU series on CPU
        _stepped(stats[3], 2, 0.01)
        tel.on_step()
        tel.flush()
        tel.flush()  # nothing new: Ray's Counter.inc(0) would raise, so this also checks the guard
        assert tel.counted == {3: 64}
        tel.on_pull(0.001)
        exchange.lag = 3  # the replica's last refresh; the next flush exports it (tests/test_prometheus_e2e.py)
        tel.flush()
    finally:
        tel.close()


@pytest.mark.ray
def test_metrics_off_still_writes_the_run_files(finished_run):
    """The session's finished run: 2 blocks, metrics.enabled=false."""
    assert not finished_run.cfg.metrics.enabled
    run_dir = Path(finished_run.cfg.run.dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {(r["block"], r["event"]) for r in rows if r["event"] == "epoch"} == {(1, "epoch"), (2, "epoch")}
    assert finished_run.summary["run_id"] in (run_dir / "report.md").read_text()

"""Every metric noprop_dist exports to Prometheus, defined once: name, type, help, labels, buckets.

This module is plain data (it imports neither Ray nor prometheus_client), so the recorders, the
dashboard test and the docs all read the same definitions. The recorders live in
``distributed/telemetry.py``: workers and the parameter server are Ray actors, so they record through
``ray.util.metrics`` and Ray's metrics agent on each node serves the values on that node's
metrics-export port. Ray prefixes every name with ``ray_`` and appends ``_total`` to counters, so
``noprop_shard_samples`` is scraped as ``ray_noprop_shard_samples_total``.

Labels are the run and the shard (a NoProp-DT block or a NoProp-CT/FM time-shard; or the worker's rank,
which the driver assigns and which survives a restart), never Ray's worker id. Ray adds its own
``WorkerId`` label to every series it exports; the dashboard aggregates it away (``sum by (run, shard)``)
so a restarted actor continues the same line.

The per-shard metrics were called ``noprop_block_*`` with a ``block`` label before; dashboards written for
those names keep working through the Prometheus recording rules :func:`legacy_recording_rules` writes
(``cluster/prometheus/rules.yml``), which give every new series again under its old name and label.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

from ..config import Config
from ..storage.run_dir import _IDENTITY_SECTIONS, _IDENTITY_TRAIN_KEYS

RAY_PREFIX = "ray_"  # what Ray's exporter puts in front of every application metric
KINDS = ("counter", "gauge", "histogram")

SHARD_LABELS = ("run", "shard", "worker")
WORKER_LABELS = ("run", "worker")
SERVER_LABELS = ("run",)

# Seconds. A shard step takes milliseconds on a GPU or for digits, up to seconds for CIFAR on one CPU core.
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# Seconds. Parameter-server calls are sub-millisecond on one machine, milliseconds across nodes.
LATENCY_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    gpu_only: bool = False  # recorded only by workers that train on a GPU

    @property
    def family(self) -> str:
        """The metric family's name in Prometheus (what its metadata API lists): Ray's prefix + name."""
        return RAY_PREFIX + self.name

    def series_names(self) -> tuple[str, ...]:
        """Every series name the metric produces in Prometheus."""
        if self.kind == "histogram":
            return tuple(self.family + s for s in ("_bucket", "_sum", "_count"))
        return (self.family + "_total",) if self.kind == "counter" else (self.family,)


SHARD_SAMPLES = MetricSpec(
    "noprop_shard_samples", "counter", "Training samples the shard has taken a step on.", SHARD_LABELS)
SHARD_STEP_SECONDS = MetricSpec(
    "noprop_shard_step_seconds", "histogram",
    "Wall time of one shard step: forward, backward, optimizer steps, and its share of the worker's "
    "parameter-server exchanges.",
    SHARD_LABELS, STEP_BUCKETS)
SHARD_LOSS = MetricSpec(
    "noprop_shard_loss", "gauge", "The shard's training loss, exponential moving average (weight 0.9).", SHARD_LABELS)
SHARD_EPOCHS_DONE = MetricSpec(
    "noprop_shard_epochs_done", "gauge", "Epochs the shard has completed, with the current one as a fraction.",
    SHARD_LABELS)
SHARD_PROGRESS = MetricSpec(
    "noprop_shard_progress_ratio", "gauge", "Fraction of the run's training steps the shard has done (0 to 1).",
    SHARD_LABELS)
PS_PUSH_SECONDS = MetricSpec(
    "noprop_ps_push_seconds", "histogram",
    "Time a worker spends sending one shared-state delta (its shards' updates since its last exchange) to the "
    "parameter server (sent, not awaited).", WORKER_LABELS, LATENCY_BUCKETS)
PS_PULL_SECONDS = MetricSpec(
    "noprop_ps_pull_seconds", "histogram",
    "Time a worker spends taking the shared state it asked for one exchange earlier; in sync mode it includes "
    "waiting for a slower worker.", WORKER_LABELS, LATENCY_BUCKETS)
PS_APPLY_SECONDS = MetricSpec(
    "noprop_ps_apply_seconds", "histogram",
    "Time the parameter server takes to receive one push (adding the delta to the shared state).",
    SERVER_LABELS, LATENCY_BUCKETS)
EMBEDDING_LAG = MetricSpec(
    "noprop_worker_embedding_version_lag", "gauge",
    "Shard steps of the other workers that the worker's shared-state replica had missed, measured at its last "
    "refresh (0 with one worker).", WORKER_LABELS)
WORKER_RESTARTS = MetricSpec(
    "noprop_worker_restarts", "gauge",
    "Times this worker's actor has been restarted. A gauge, not a counter: Ray cannot export a counter at 0, "
    "and a restarted process would start a new counter series.", WORKER_LABELS)
GPU_UTILIZATION = MetricSpec(
    "noprop_worker_gpu_utilization_percent", "gauge", "Utilisation of the worker's GPU (NVML), percent.",
    WORKER_LABELS, gpu_only=True)
GPU_MEMORY = MetricSpec(
    "noprop_worker_gpu_memory_bytes", "gauge", "GPU memory the worker's tensors occupy (torch.cuda.memory_allocated).",
    WORKER_LABELS, gpu_only=True)

SHARD_METRICS = (SHARD_SAMPLES, SHARD_STEP_SECONDS, SHARD_LOSS, SHARD_EPOCHS_DONE, SHARD_PROGRESS)
WORKER_METRICS = (*SHARD_METRICS, PS_PUSH_SECONDS, PS_PULL_SECONDS, EMBEDDING_LAG, WORKER_RESTARTS,
                  GPU_UTILIZATION, GPU_MEMORY)
SERVER_METRICS = (PS_APPLY_SECONDS,)
ALL_METRICS = WORKER_METRICS + SERVER_METRICS

LEGACY_PREFIX, LEGACY_LABEL = "noprop_block_", "block"  # the per-shard metrics' names before "shard"


def legacy_series_name(series: str) -> str:
    """The name a per-shard series had before: ``ray_noprop_shard_loss`` -> ``ray_noprop_block_loss``."""
    return series.replace(RAY_PREFIX + "noprop_shard_", RAY_PREFIX + LEGACY_PREFIX, 1)


def legacy_recording_rules() -> dict:
    """Prometheus recording rules (a rule file's mapping) that give every per-shard series again under its
    old name with a ``block`` label equal to ``shard``: dashboards and alerts written for ``noprop_block_*``
    keep working. Each histogram series (``_bucket``, ``_sum``, ``_count``) and counter (``_total``) is
    recorded as it is, so rate() and histogram_quantile() apply to the old names as before."""
    rules = [{"record": legacy_series_name(series),
              "expr": f'label_replace({series}, "{LEGACY_LABEL}", "$1", "shard", "(.*)")'}
             for spec in SHARD_METRICS for series in spec.series_names()]
    return {"groups": [{"name": "noprop_dist_legacy_block_names", "rules": rules}]}


def run_id(cfg: Config) -> str:
    """The `run` label: ``metrics.run_id`` if set, else ``<run.dir's name>-<8 hex of the run's identity>``."""
    if cfg.metrics.run_id:
        return cfg.metrics.run_id
    # Hash the keys RunDir refuses to change on resume: a resumed run keeps its id, so its lines continue.
    full = cfg.to_dict()
    identity = {sec: full[sec] for sec in _IDENTITY_SECTIONS}
    identity["train"] = {k: full["train"][k] for k in _IDENTITY_TRAIN_KEYS}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(os.path.normpath(cfg.run.dir))).lstrip("._-")
    return f"{name or 'run'}-{digest}"

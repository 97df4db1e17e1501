"""Every metric noprop_dist exports to Prometheus, defined once: name, type, help, labels, buckets.

This module is plain data (it imports neither Ray nor prometheus_client), so the recorders, the
dashboard test and the docs all read the same definitions. The recorders live in
``distributed/telemetry.py``: workers and the parameter server are Ray actors, so they record through
``ray.util.metrics`` and Ray's metrics agent on each node serves the values on that node's
metrics-export port. Ray prefixes every name with ``ray_`` and appends ``_total`` to counters, so
``noprop_block_samples`` is scraped as ``ray_noprop_block_samples_total``.

Labels are the run and the block (or the worker's rank, which the driver assigns and which survives a
restart), never Ray's worker id. Ray adds its own ``WorkerId`` label to every series it exports; the
dashboard aggregates it away (``sum by (run, block)``) so a restarted actor continues the same line.
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

BLOCK_LABELS = ("run", "block", "worker")
WORKER_LABELS = ("run", "worker")
SERVER_LABELS = ("run",)

# Seconds. A block step is ~1 ms for digits on a CPU core and up to seconds for CIFAR on one core.
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


BLOCK_SAMPLES = MetricSpec(
    "noprop_block_samples", "counter", "Training samples the block has taken a step on.", BLOCK_LABELS)
BLOCK_STEP_SECONDS = MetricSpec(
    "noprop_block_step_seconds", "histogram",
    "Wall time of one block step: forward, backward, optimizer steps, and its share of the worker's "
    "parameter-server exchanges.",
    BLOCK_LABELS, STEP_BUCKETS)
BLOCK_LOSS = MetricSpec(
    "noprop_block_loss", "gauge", "The block's training loss, exponential moving average (weight 0.9).", BLOCK_LABELS)
BLOCK_EPOCHS_DONE = MetricSpec(
    "noprop_block_epochs_done", "gauge", "Epochs the block has completed, with the current one as a fraction.",
    BLOCK_LABELS)
BLOCK_PROGRESS = MetricSpec(
    "noprop_block_progress_ratio", "gauge", "Fraction of the run's training steps the block has done (0 to 1).",
    BLOCK_LABELS)
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
    "Block steps of the other workers that the worker's shared-state replica had missed, measured at its last "
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

WORKER_METRICS = (BLOCK_SAMPLES, BLOCK_STEP_SECONDS, BLOCK_LOSS, BLOCK_EPOCHS_DONE, BLOCK_PROGRESS,
                  PS_PUSH_SECONDS, PS_PULL_SECONDS, EMBEDDING_LAG, WORKER_RESTARTS, GPU_UTILIZATION, GPU_MEMORY)
SERVER_METRICS = (PS_APPLY_SECONDS,)
ALL_METRICS = WORKER_METRICS + SERVER_METRICS


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

"""Recording the metrics of ``noprop_dist.observability.metrics`` from inside the actors, through ``ray.util.metrics``.

A recorded value goes to the process's Ray core worker, which sends it to its node's metrics agent every
``metrics_report_interval_ms`` (10 s by default); the agent serves it on the node's metrics-export port,
where Prometheus scrapes it. One record costs a few microseconds, so the training loop records every
step's time (the histogram needs each one); counters and gauges are set once a second.
"""
from __future__ import annotations

import math
import threading
from typing import Union

import torch
from ray.util.metrics import Counter, Gauge, Histogram

from ..observability.metrics import (
    EMBEDDING_LAG,
    GPU_MEMORY,
    GPU_UTILIZATION,
    PS_APPLY_SECONDS,
    PS_PULL_SECONDS,
    PS_PUSH_SECONDS,
    SHARD_EPOCHS_DONE,
    SHARD_LOSS,
    SHARD_PROGRESS,
    SHARD_SAMPLES,
    SHARD_STEP_SECONDS,
    WORKER_METRICS,
    WORKER_RESTARTS,
    MetricSpec,
)
from ..training import ShardStats
from ..training.shared_state import ExchangeStats

Instrument = Union[Counter, Gauge, Histogram]


def instrument(spec: MetricSpec) -> Instrument:
    """The ray.util.metrics object for a definition (its name gets Ray's ``ray_`` prefix on export)."""
    if spec.kind == "counter":
        return Counter(spec.name, spec.help, spec.labels)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, spec.labels)
    return Histogram(spec.name, spec.help, list(spec.buckets), spec.labels)


class StepTracker:
    """Turns a shard group's cumulative ShardStats into per-step times.

    ShardGroup counts totals (steps, compute and sync seconds per block); a histogram needs each step's
    own time. Read after every mini-batch, the difference since the last read is one step per block.
    """

    def __init__(self, stats: dict[int, ShardStats]) -> None:
        self.stats = stats
        self.last = {t: (st.total_steps, st.compute_seconds + st.sync_seconds) for t, st in stats.items()}

    def advance(self) -> list[tuple[int, int, float]]:
        """(block, steps, seconds per step) for every block that stepped since the last call."""
        out = []
        for t, st in self.stats.items():
            steps0, seconds0 = self.last[t]
            steps = st.total_steps - steps0
            if steps <= 0:
                continue
            seconds = st.compute_seconds + st.sync_seconds
            out.append((t, steps, (seconds - seconds0) / steps))
            self.last[t] = (st.total_steps, seconds)
        return out


class WorkerTelemetry:
    """One worker's metrics: its blocks' throughput, step times, loss and progress; its parameter-server
    latencies and replica lag; its restarts; its GPU where it has one.

    The training thread records each step's time (``on_step``), each push and each pull taken. Counters and
    gauges are set from the ShardStats by a background thread once a second, while the actor lives:
    Ray's metrics agent drops a gauge not set again within two export intervals, which would blank the
    dashboard between epochs (checkpoints) and lose the restart count that is set only once.
    """

    FLUSH_SECONDS = 1.0

    def __init__(self, run: str, rank: int, stats: dict[int, ShardStats], total_epochs: int,
                 device: torch.device, restarts: int = 0, exchange: ExchangeStats | None = None) -> None:
        """exchange: the worker replica's counters (the embedding lag comes from them); None: no lag."""
        self.gpu = device if device.type == "cuda" else None
        self.m = {s.name: instrument(s) for s in WORKER_METRICS if self.gpu is not None or not s.gpu_only}
        self.worker_tags = {"run": run, "worker": str(rank)}
        self.shard_tags = {t: {"run": run, "shard": str(t), "worker": str(rank)} for t in stats}
        self.stats, self.total_epochs, self.restarts = stats, total_epochs, restarts
        self.tracker = StepTracker(stats)
        self.counted = {t: st.samples for t, st in stats.items()}  # samples already added to the counter
        self.exchange = exchange or ExchangeStats()
        self._lock = threading.Lock()  # one flush at a time: the counter increments must not overlap
        self._stop = threading.Event()
        self.flush()
        threading.Thread(target=self._keep_exporting, name="noprop-telemetry", daemon=True).start()

    # --- hooks, called from the training thread --------------------------------------------
    def on_step(self) -> None:
        """After every mini-batch (ShardGroup.train_epoch's ``on_step``)."""
        hist = self.m[SHARD_STEP_SECONDS.name]
        for t, steps, seconds in self.tracker.advance():
            for _ in range(steps):
                hist.observe(seconds, tags=self.shard_tags[t])

    def on_push(self, seconds: float) -> None:
        self.m[PS_PUSH_SECONDS.name].observe(seconds, tags=self.worker_tags)

    def on_pull(self, seconds: float) -> None:
        self.m[PS_PULL_SECONDS.name].observe(seconds, tags=self.worker_tags)

    # --- counters and gauges ----------------------------------------------------------------
    def flush(self) -> None:
        """Counters and gauges from the current ShardStats (also called at the end of every epoch).

        Reads counters the training thread writes; a read that straddles an epoch's end may be one
        flush late, never lost (the counter adds the difference to what it already counted).
        """
        with self._lock:
            for t, st in self.stats.items():
                tags = self.shard_tags[t]
                new = st.samples - self.counted[t]
                if new > 0:  # Ray's Counter.inc refuses 0
                    self.m[SHARD_SAMPLES.name].inc(new, tags=tags)
                    self.counted[t] += new
                if math.isfinite(st.loss_ema):
                    self.m[SHARD_LOSS.name].set(st.loss_ema, tags=tags)
                if st.steps_per_epoch > 0:
                    epochs = min(st.epochs_done + st.step / st.steps_per_epoch, self.total_epochs)
                    self.m[SHARD_EPOCHS_DONE.name].set(epochs, tags=tags)
                    self.m[SHARD_PROGRESS.name].set(epochs / self.total_epochs, tags=tags)
            if self.exchange.lag is not None:
                self.m[EMBEDDING_LAG.name].set(self.exchange.lag, tags=self.worker_tags)
            self.m[WORKER_RESTARTS.name].set(self.restarts, tags=self.worker_tags)
            if self.gpu is not None:
                self._record_gpu(self.gpu)

    def close(self) -> None:
        self._stop.set()

    def _keep_exporting(self) -> None:
        while not self._stop.wait(self.FLUSH_SECONDS):
            self.flush()

    def _record_gpu(self, device: torch.device) -> None:
        self.m[GPU_MEMORY.name].set(torch.cuda.memory_allocated(device), tags=self.worker_tags)
        try:
            util = torch.cuda.utilization(device)
        except Exception:  # noqa: BLE001 - needs NVML (pynvml); without it only memory is recorded
            return
        self.m[GPU_UTILIZATION.name].set(util, tags=self.worker_tags)


class ServerTelemetry:
    """The parameter server's own metric: how long applying one push takes."""

    def __init__(self, run: str) -> None:
        self.apply = instrument(PS_APPLY_SECONDS)
        self.tags = {"run": run}

    def on_apply(self, seconds: float) -> None:
        self.apply.observe(seconds, tags=self.tags)

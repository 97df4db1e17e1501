"""The worker actor: trains its shard group; talks to the parameter server through :class:`RayClient`."""
from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np
import ray
import torch

from ..config import TrainConfig
from ..core import ModelSpec
from ..shared_server import TensorDict
from ..training import ShardGroup, peak_rss_mb
from .telemetry import WorkerTelemetry


class RayClient:
    """Parameter-server access from a worker; one Ray round trip per pull, none per push.

    Ray runs one caller's calls on an actor in the order they were sent, so a pull sent after a push
    sees that push applied without waiting for the push itself.

    sync: ``pull`` waits for the server's current state (which includes every push this worker sent),
    so with one worker the updates are exactly those of the in-process reference run.
    async: ``pull`` never waits: it takes the state of a pull sent earlier if that has arrived (else the
    replica stays as it is) and sends the next one; the replica lags by up to one pull.

    ``lag`` is the embedding-version lag: the server's version in a pull's reply minus the version the
    replica held until then, i.e. how many shared-state updates the replica had missed when refreshed.
    """

    MAX_PENDING_PUSHES = 64  # bounds held references and surfaces server errors early

    def __init__(self, server: "ray.actor.ActorHandle", mode: str) -> None:
        self.server, self.mode = server, mode
        self.pending: list[ray.ObjectRef] = []
        self.prefetch: ray.ObjectRef | None = None
        self.push_seconds = 0.0
        self.pull_seconds = 0.0
        self.version = -1  # of the state the last pull returned: what the worker's replica holds
        self.lag: int | None = None
        # Per-call observers (the worker's telemetry); None when metrics are off.
        self.on_push: Callable[[float], None] | None = None
        self.on_pull: Callable[[float, int | None], None] | None = None

    def push(self, grads: TensorDict) -> None:
        t0 = time.perf_counter()
        self.pending.append(self.server.push.remote(grads))
        if len(self.pending) >= self.MAX_PENDING_PUSHES:
            self.flush()
        seconds = time.perf_counter() - t0
        self.push_seconds += seconds
        if self.on_push is not None:
            self.on_push(seconds)

    def pull(self) -> tuple[int, TensorDict] | None:
        t0 = time.perf_counter()
        out = self._pull()
        seconds = time.perf_counter() - t0
        self.pull_seconds += seconds
        if out is not None:
            if self.version >= 0:  # the first pull replaces a locally initialised replica: no lag to speak of
                self.lag = out[0] - self.version
            self.version = out[0]
        if self.on_pull is not None:
            self.on_pull(seconds, self.lag)
        return out

    def _pull(self) -> tuple[int, TensorDict] | None:
        if self.mode == "sync" or self.prefetch is None:
            out = ray.get(self.server.pull.remote())
            if self.mode == "sync":  # applied before the pull ran: collect them (and any error)
                self.flush()
            else:
                self.prefetch = self.server.pull.remote()
            return out
        ready, _ = ray.wait([self.prefetch], timeout=0)
        if not ready:
            return None
        out = ray.get(self.prefetch)
        self.prefetch = self.server.pull.remote()
        return out

    def flush(self) -> None:
        """Wait until every push sent so far is applied (raises the server's error, if any)."""
        ray.get(self.pending)
        self.pending = []


# max_concurrency=2: `progress` answers while `train_epoch` runs (it only reads counters).
@ray.remote(max_concurrency=2)
class Worker:
    def __init__(
        self, rank: int, spec: ModelSpec, block_ids: list[int], train: TrainConfig, threads: int, device: str,
        train_x: np.ndarray, train_y: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
        server: "ray.actor.ActorHandle", states: dict[int, dict] | None,
        run_id: str | None = None, restarts: int = 0,
    ) -> None:
        """run_id: the `run` label of the exported metrics, None to export none; restarts: how many times
        the driver has re-created this worker (exported as a metric; 0 until workers are restarted)."""
        # Its share of the cores: two 1-thread processes beat one 2-thread process on 2 cores.
        torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.rank = rank
        self.client = RayClient(server, train.sync_mode)
        # train_x arrives as a zero-copy, read-only view of the object store: batches are gathered from it.
        self.group = ShardGroup(spec, block_ids, train, train_x, train_y, mean, std, self.client, torch.device(device))
        if states:
            self.group.load_state_dicts(states)
        self.device = device
        self.epoch_seconds = 0.0
        self.telemetry: WorkerTelemetry | None = None
        if run_id is not None:
            self.telemetry = WorkerTelemetry(run_id, rank, self.group.stats, train.epochs, torch.device(device),
                                             restarts)
            self.client.on_push, self.client.on_pull = self.telemetry.on_push, self.telemetry.on_pull

    def train_epoch(self, epoch: int) -> dict:
        t0 = time.perf_counter()
        stats = self.group.train_epoch(epoch, self.telemetry.on_step if self.telemetry else None)
        self.client.flush()
        if self.telemetry:
            self.telemetry.flush()  # the epoch's last counts, and epochs_done at the whole epoch
        self.epoch_seconds += time.perf_counter() - t0
        return self.report() | {"blocks": stats}

    def report(self) -> dict:
        return {
            "rank": self.rank, "pid": os.getpid(), "device": self.device, "peak_rss_mb": peak_rss_mb(),
            "push_seconds": self.client.push_seconds, "pull_seconds": self.client.pull_seconds,
            "embedding_version_lag": self.client.lag,
            "epoch_seconds": self.epoch_seconds, "zero_copy_data": not self.group.train_x.flags.writeable,
        }

    def progress(self) -> dict:
        """What ``train_epoch`` returns, mid-epoch: the worker's report and its blocks' counters."""
        return self.report() | {"blocks": {t: st.as_dict() for t, st in self.group.stats.items()}}

    def state_dicts(self) -> dict[int, dict]:
        return self.group.state_dicts()

"""The worker actor: trains its shard group; talks to the parameter server through :class:`RayClient`."""
from __future__ import annotations

import os
import time
import uuid
from typing import Callable

import numpy as np
import ray
import torch

from ..config import TrainConfig
from ..core import ModelSpec
from ..shared_server import TensorDict
from ..training import ShardGroup, peak_rss_mb
from .faults import Fault, fault_hook
from .telemetry import WorkerTelemetry

# The server's process died or cannot be reached (ActorUnavailableError is a RayActorError).
SERVER_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError)
RESYNC_TIMEOUT_S = 120.0


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

    Every push carries the id (source, seq): source names this client incarnation (rank and a random
    tag: a restarted worker counts from 1 again under a new source), and the server ignores a repeat.
    When the server dies, the pushes in flight are lost with the state it had since its last checkpoint; the client waits
    until Ray has restarted it, re-syncs the replica with the restored state (a lower version) and goes on.
    """

    MAX_PENDING_PUSHES = 64  # bounds held references and surfaces server errors early

    def __init__(self, server: "ray.actor.ActorHandle", mode: str, rank: int = 0,
                 log: Callable[[str], None] = print) -> None:
        self.server, self.mode, self.rank, self.log = server, mode, rank, log
        self.source = f"w{rank}-{uuid.uuid4().hex[:12]}"
        self.seq = 0  # of the last push sent
        self.resyncs = 0  # times the server was found restarted
        self.stash: tuple[int, TensorDict] | None = None  # state a re-sync fetched, for the next pull
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
        self.seq += 1
        self.pending.append(self.server.push.remote(grads, (self.source, self.seq)))
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
        if self.stash is not None:
            out, self.stash = self.stash, None
            return out
        try:
            return self._pull_once()
        except SERVER_ERRORS as e:
            return self._resync(e)

    def _pull_once(self) -> tuple[int, TensorDict] | None:
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
        """Wait until every push sent so far is applied (raises the server's own errors, e.g. a bad push).

        If the server died meanwhile, wait for its restart and keep its restored state for the next pull.
        """
        try:
            ray.get(self.pending)
        except SERVER_ERRORS as e:
            self.stash = self._resync(e)
        self.pending = []

    def _resync(self, error: Exception) -> tuple[int, TensorDict]:
        """The server failed: drop what was in flight, wait for the restarted server, return its state."""
        self.pending, self.prefetch = [], None
        deadline = time.monotonic() + RESYNC_TIMEOUT_S
        while True:
            try:
                out = ray.get(self.server.pull.remote(), timeout=30)
                break
            except SERVER_ERRORS:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"parameter server unreachable for {RESYNC_TIMEOUT_S:.0f}s after "
                                       f"{type(error).__name__}: {error}") from None
                time.sleep(0.5)
        self.resyncs += 1
        self.log(f"worker {self.rank}: parameter server failed ({type(error).__name__}); re-synced with its "
                 f"restored state, version {out[0]} (the replica had version {self.version})")
        self.version = -1  # a fresh start: no lag to report for this pull
        return out


# max_concurrency=2: `progress` answers while `train_epoch` runs (it only reads counters).
@ray.remote(max_concurrency=2)
class Worker:
    def __init__(
        self, rank: int, spec: ModelSpec, block_ids: list[int], train: TrainConfig, threads: int, device: str,
        train_x: np.ndarray, train_y: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
        server: "ray.actor.ActorHandle", states: dict[int, dict] | None,
        run_id: str | None = None, restarts: int = 0, faults: list[Fault] | None = None,
    ) -> None:
        """run_id: the `run` label of the exported metrics, None to export none; restarts: how many times
        the driver has re-created this worker (also exported as a metric); faults: injected faults
        (tests, fault benchmarks; see faults.py)."""
        # Its share of the cores: two 1-thread processes beat one 2-thread process on 2 cores.
        torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.rank, self.restarts = rank, restarts
        self.client = RayClient(server, train.sync_mode, rank=rank)
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
        self.faults = None
        if faults:
            self.faults = fault_hook(faults, {t: tr.block for t, tr in self.group.trainers.items()},
                                     lambda: ray.get(server.identity.remote())["pid"], print)

    def train_epochs(self, epochs: list[int]) -> dict:
        """Several epochs in a row (a restarted worker catching up from its checkpoint); the last report."""
        for epoch in epochs:
            out = self.train_epoch(epoch)
        return out

    def train_epoch(self, epoch: int) -> dict:
        t0 = time.perf_counter()
        step = 0

        def on_step() -> None:
            nonlocal step
            step += 1
            if self.telemetry is not None:
                self.telemetry.on_step()
            if self.faults is not None:
                self.faults(epoch, step)

        if self.faults is not None:
            self.faults(epoch, 0)  # step 0: before the epoch's first step
        stats = self.group.train_epoch(epoch, on_step)
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
            "restarts": self.restarts, "server_resyncs": self.client.resyncs,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if self.device.startswith("cuda") else None,
        }

    def progress(self) -> dict:
        """What ``train_epoch`` returns, mid-epoch: the worker's report and its blocks' counters."""
        return self.report() | {"blocks": {t: st.as_dict() for t, st in self.group.stats.items()}}

    def state_dicts(self) -> dict[int, dict]:
        return self.group.state_dicts()

"""The worker actor: trains its shard group; its replica talks to the parameter server through :class:`RayClient`."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import numpy as np
import ray
import torch

from ..config import TrainConfig
from ..core import ModelSpec
from ..core.scoring import StageCounts
from ..training import ShardGroup, peak_rss_mb
from ..training.evaluation import EvalJob, score
from ..training.shared_state import Round, ServerRestarted, Snapshot, SyncEveryChoice
from .faults import END, EVAL, Fault, fault_hook
from .telemetry import WorkerTelemetry
from .wire import WireSnapshot, snapshot_from_wire, state_to_wire, to_wire

# The server's process died or cannot be reached (ActorUnavailableError is a RayActorError).
SERVER_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError)
RESYNC_TIMEOUT_S = 120.0


class RayClient:
    """The shared-state protocol's transport through Ray (``training.shared_state.SharedStateClient``).

    An exchange is one call: it carries the delta and returns the state asked for, and nobody waits for it;
    the replica takes its answer at its next exchange, by then long arrived. Ray runs one caller's calls on the
    server in the order they were sent. In sync mode an answer may be "not yet" (a slower worker has not
    reached the round asked for); ``take(wait=True)`` then asks again, backing off.

    Every exchange names the server incarnation it is meant for, and every answer names the one that gave it:
    when the server dies, the calls in flight fail or come back from a new incarnation, which refused them;
    the client then waits until Ray has restarted it and raises ``ServerRestarted`` with the restored state,
    and the replica sends again what the restored server lacks.
    """

    MAX_PENDING = 64  # bounds held references and surfaces server errors early
    POLL_SECONDS = (0.0005, 0.05)  # first and longest pause before asking again for an incomplete round

    def __init__(self, server: "ray.actor.ActorHandle", mode: str, rank: int = 0,
                 log: Callable[[str], None] = print) -> None:
        self.server, self.mode, self.rank, self.log = server, mode, rank, log
        self.source = f"w{rank}"
        self.incarnation = ""  # of the server this client last saw
        self.pending: list[ray.ObjectRef] = []
        self.answer: ray.ObjectRef | None = None  # the exchange whose answer the replica will take
        self.want: Round | None = None
        self.polls = 0  # times a sync answer was "not yet" and asked again
        # Per-call observers (the worker's telemetry); None when metrics are off.
        self.on_push: Callable[[float], None] | None = None
        self.on_pull: Callable[[float], None] | None = None

    def fetch(self) -> Snapshot:
        try:
            incarnation, wire = ray.get(self.server.pull.remote())
        except SERVER_ERRORS as e:
            self._resync(e)
            incarnation, wire = ray.get(self.server.pull.remote())
        self.incarnation = incarnation
        return snapshot_from_wire(wire)

    def exchange(self, delta: torch.Tensor, steps: int, round_: Round, want: Round | None) -> None:
        t0 = time.perf_counter()
        ref = self.server.exchange.remote(to_wire(delta), steps, self.source, round_, want, self.incarnation)
        self.pending.append(ref)
        self.answer, self.want = (ref, want) if want is not None else (None, None)
        if len(self.pending) >= self.MAX_PENDING:
            self.flush()
        if self.on_push is not None:
            self.on_push(time.perf_counter() - t0)

    def take(self, wait: bool) -> Snapshot | None:
        if self.answer is None:
            return None
        t0 = time.perf_counter()
        try:
            if not wait and not ray.wait([self.answer], timeout=0)[0]:
                return None
            incarnation, wire = self._checked(ray.get(self.answer))
            pause = self.POLL_SECONDS[0]
            while wire is None:  # sync: a slower worker has not pushed the round asked for yet
                if not wait:
                    self.answer = self.server.pull.remote(self.source, self.want)
                    return None
                time.sleep(pause)
                pause = min(2 * pause, self.POLL_SECONDS[1])
                self.polls += 1
                incarnation, wire = self._checked(ray.get(self.server.pull.remote(self.source, self.want)))
        except SERVER_ERRORS as e:
            self._resync(e)  # the same server, only out of reach a moment: ask again
            self.answer = self.server.pull.remote(self.source, self.want)
            return None
        self.answer = None
        self._collect()
        if self.on_pull is not None:
            self.on_pull(time.perf_counter() - t0)
        return snapshot_from_wire(wire)

    def settle_sync_every(self, proposal: SyncEveryChoice | None) -> SyncEveryChoice | None:
        """The run's sync_every for auto on GPUs (``SharedStateServer.settle_sync_every``): one blocking call,
        sent after this worker's exchanges (Ray keeps their order). A restarted server raises ServerRestarted."""
        try:
            reply = ray.get(self.server.settle_sync_every.remote(proposal))
        except SERVER_ERRORS as e:
            self._resync(e)  # the same server, only out of reach a moment: ask again
            if self.want is not None:  # and again for the state the replica waits for (_resync dropped it)
                self.answer = self.server.pull.remote(self.source, self.want)
            reply = ray.get(self.server.settle_sync_every.remote(proposal))
        incarnation, chosen = reply
        self._checked((incarnation, None))
        return None if chosen is None else (int(chosen[0]), int(chosen[1]))

    def _checked(self, reply: tuple[str, WireSnapshot | None]) -> tuple[str, WireSnapshot | None]:
        if reply[0] != self.incarnation:  # a restarted server answered: it refused what we sent before
            self._resync(RuntimeError("a restarted parameter server answered"))
        return reply

    def _collect(self) -> None:
        """Drop the exchanges already done, raising the server's own errors (e.g. a bad delta) among them."""
        if self.pending:
            done, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
            for reply in ray.get(done):
                self._checked(reply)

    def flush(self) -> None:
        """Wait until every exchange sent so far is done (raises the server's own errors, e.g. a bad delta)."""
        try:
            replies = ray.get(self.pending)
        except SERVER_ERRORS as e:
            self._resync(e)
            replies = []
        self.pending = []
        for reply in replies:
            self._checked(reply)

    def _resync(self, error: Exception) -> None:
        """A call failed: wait for the server. A new incarnation (Ray restarted it from its checkpoint) raises
        ServerRestarted with its state; the same one (it was only out of reach) lets the caller go on."""
        self.pending, self.answer = [], None
        deadline = time.monotonic() + RESYNC_TIMEOUT_S
        while True:
            try:
                incarnation, wire = ray.get(self.server.pull.remote(), timeout=30)
                break
            except SERVER_ERRORS:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"parameter server unreachable for {RESYNC_TIMEOUT_S:.0f}s after "
                                       f"{type(error).__name__}: {error}") from None
                time.sleep(0.5)
        snap = snapshot_from_wire(wire)
        if incarnation == self.incarnation:
            self.log(f"worker {self.rank}: parameter server out of reach for a moment ({type(error).__name__}); "
                     f"it kept its state (version {snap.version})")
            return
        self.incarnation = incarnation
        self.log(f"worker {self.rank}: parameter server failed ({type(error).__name__}); it came back with its "
                 f"restored state, version {snap.version}")
        raise ServerRestarted(snap)


@dataclass(frozen=True)
class WorkerSpec:
    """What one incarnation of a :class:`Worker` is made of (the training data travel beside it)."""

    rank: int
    model: ModelSpec
    shard_ids: list[int]
    train: TrainConfig
    threads: int  # torch threads: its share of the cores
    device: str  # cluster.device: auto | cpu | cuda
    mean: tuple[float, ...]  # the data's per-channel normalisation
    std: tuple[float, ...]
    server: "ray.actor.ActorHandle"  # the parameter server
    states: dict[int, dict] | None = None  # the shards' checkpointed states; None: a fresh start
    replica_state: dict | None = None  # its shared-state replica's optimizer state; None: a fresh one
    run_id: str | None = None  # the `run` label of the exported metrics; None: export none
    restarts: int = 0  # how many times the driver has re-created this worker (also exported as a metric)
    faults: list[Fault] | None = None  # injected faults (tests, fault benchmarks; see faults.py)
    paced: bool = False  # the run's workers are meant for GPUs: ShardGroup.paced, whatever this one's device


@dataclass(frozen=True)
class WorkerReport:
    """A worker's figures, as ``Worker.progress`` (mid-epoch) and ``Worker.train_epoch`` (its end) return
    them. The fields up to ``sync_every`` are summary.json's ``workers`` rows (:meth:`as_dict`), in order."""

    rank: int
    pid: int
    device: str
    precision: str
    peak_rss_mb: float
    peak_gpu_mb: float | None  # None: not on a GPU
    exchanges: int
    exchange_seconds: float
    push_seconds: float
    pull_seconds: float
    embedding_version_lag: int | None
    max_embedding_version_lag: int
    max_stale_exchanges: int
    polls: int
    epoch_seconds: float
    zero_copy_data: bool
    data_on_device: bool
    restarts: int
    server_resyncs: int
    sync_every: int  # mini-batches between exchanges: train.sync_every, or what auto resolved to (1 while it measures)
    blocks: dict[int, dict] = field(default_factory=dict)  # shard -> training.ShardStats.as_dict()
    epoch_started: float | None = None  # train_epoch's: its wall-clock start and end (time.time())
    epoch_ended: float | None = None

    @property
    def total_steps(self) -> int:
        """The steps of all its shards so far."""
        return sum(b["total_steps"] for b in self.blocks.values())

    def as_dict(self) -> dict[str, Any]:
        """The worker's row of summary.json's ``workers`` (metrics.jsonl rows read it too)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_IN_ROW}


_NOT_IN_ROW = ("blocks", "epoch_started", "epoch_ended")


def shard_counters(reports: list[WorkerReport]) -> dict[int, dict]:
    """Workers' reports -> shard -> its counters (training.ShardStats.as_dict())."""
    return {t: b for r in reports for t, b in r.blocks.items()}


# max_concurrency=3: `progress` answers while `train_epoch` runs (it only reads counters), and `evaluate` scores
# the last epoch's chain on the worker's device while the next epoch trains (it touches nothing of training's).
@ray.remote(max_concurrency=3)
class Worker:
    def __init__(self, spec: WorkerSpec, train_x: np.ndarray, train_y: np.ndarray) -> None:
        """train_x, train_y: passed apart from ``spec`` because Ray resolves object references only among a
        call's own arguments: they arrive as zero-copy, read-only views of the object store, batches are
        gathered from them (on a GPU the set is copied there once when it fits)."""
        # Its share of the cores: two 1-thread processes beat one 2-thread process on 2 cores.
        torch.set_num_threads(spec.threads)
        device = spec.device
        if device == "auto":
            device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.rank, self.restarts = spec.rank, spec.restarts
        self.client = RayClient(spec.server, spec.train.sync_mode, rank=spec.rank)
        self.group = ShardGroup(spec.model, spec.shard_ids, spec.train, train_x, train_y, spec.mean, spec.std,
                                self.client, torch.device(device), paced=spec.paced)
        if spec.states:
            self.group.load_state_dicts(spec.states)
        if spec.replica_state:
            self.group.replica.load_state_dict(spec.replica_state)
        self.device, self.mean, self.std = device, spec.mean, spec.std
        self.epoch_seconds = 0.0
        self.telemetry: WorkerTelemetry | None = None
        if spec.run_id is not None:
            self.telemetry = WorkerTelemetry(spec.run_id, spec.rank, self.group.stats, spec.train.epochs,
                                             torch.device(device), spec.restarts, exchange=self.group.replica.stats)
            self.client.on_push, self.client.on_pull = self.telemetry.on_push, self.telemetry.on_pull
        self.faults = None
        if spec.faults:
            server = spec.server
            self.faults = fault_hook(spec.faults, {t: tr.block for t, tr in self.group.trainers.items()},
                                     lambda: ray.get(server.identity.remote())["pid"], print)

    def train_epochs(self, epochs: list[int]) -> WorkerReport:
        """Several epochs in a row (a restarted worker catching up from its checkpoint); the last report."""
        for epoch in epochs:
            out = self.train_epoch(epoch)
        return out

    def train_epoch(self, epoch: int) -> WorkerReport:
        t0 = time.perf_counter()
        started = time.time()  # wall clock: the driver compares it with other workers' (epoch_boundary_seconds)
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
        stats = self.group.train_epoch(epoch, on_step)  # its last exchange waits until every push is applied
        if self.telemetry:
            self.telemetry.flush()  # the epoch's last counts, and epochs_done at the whole epoch
        self.epoch_seconds += time.perf_counter() - t0
        return self.report(stats, started, time.time())

    def report(self, blocks: dict[int, dict], epoch_started: float | None = None,
               epoch_ended: float | None = None) -> WorkerReport:
        """The worker's figures with its shards' counters ``blocks`` (shard -> ShardStats.as_dict())."""
        ex = self.group.replica.stats
        return WorkerReport(
            rank=self.rank, pid=os.getpid(), device=self.device, precision=self.group.precision,
            peak_rss_mb=peak_rss_mb(),
            peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if self.device.startswith("cuda") else None,
            exchanges=ex.exchanges, exchange_seconds=ex.seconds, push_seconds=ex.push_seconds,
            pull_seconds=ex.take_seconds, embedding_version_lag=ex.lag, max_embedding_version_lag=ex.max_lag,
            max_stale_exchanges=ex.max_stale_exchanges, polls=self.client.polls,
            epoch_seconds=self.epoch_seconds, zero_copy_data=not self.group.train_x.flags.writeable,
            data_on_device=self.group.data.on_device, restarts=self.restarts, server_resyncs=ex.resyncs,
            sync_every=self.group.sync_every, blocks=blocks, epoch_started=epoch_started, epoch_ended=epoch_ended,
        )

    def progress(self) -> WorkerReport:
        """What ``train_epoch`` returns, mid-epoch: the worker's figures and its shards' counters."""
        return self.report({t: st.as_dict() for t, st in self.group.stats.items()})

    def state_dicts(self, epoch: int | None = None) -> dict[int, dict]:
        """The blocks' states, their tensors as they travel (``wire.state_from_wire`` gives them back); epoch
        (0-based): the one just trained, for faults injected at its gather."""
        if self.faults is not None and epoch is not None:
            self.faults(epoch, END)
        return state_to_wire(self.group.state_dicts())

    def replica_state(self) -> tuple[str, dict]:
        """(the group's key, its shared-state replica's optimizer state), for checkpoints."""
        return self.group.key, self.group.replica.state_dict()

    def evaluate(self, chain: torch.nn.Module, images: dict[str, tuple[np.ndarray, np.ndarray]],
                 tasks: list[tuple[EvalJob, range]], batch_size: int, seed: int, epoch: int) -> list[StageCounts]:
        """Score ``chain`` (this worker's own copy, trained ``epoch`` epochs) on its device: ``images``: split ->
        (uint8 (N, C, H, W), labels (N,)), ``tasks``: (job, batch range) pairs. Returns the counts of each task,
        in order."""
        if self.faults is not None:
            self.faults(epoch - 1, EVAL)
        return [score(chain, images[job.split], job, batches, batch_size, seed, self.mean, self.std, self.device)
                for job, batches in tasks]

"""The shared-state protocol without Ray: the parameter server's logic, a worker's replica of the shared
state, and the in-process client. ``docs/parameter_server.md`` describes it with its guarantees.

Shared state: W_embed, the head and (NoProp-CT) the noise schedule. Every shard's loss reaches it.

- **Nothing waits on the step path.** A worker trains against its own *replica* of the shared state, and each
  of its shards' steps applies that shard's shared-state gradient to the replica at once, with the worker's
  own AdamW (:class:`SharedReplica`). With one worker this is exactly one process with one AdamW for the
  shared state, stepped after every block step.
- **One exchange every** ``train.sync_every`` **mini-batches**, one call to the server: the worker pushes its
  *delta*, the change of its replica since its last push (the sum of all its shards' updates over those
  mini-batches), and the call's answer is a state of the server that the worker takes at its next exchange.
  The replica then becomes that state plus the worker's own updates the state does not hold yet. The server
  only adds deltas: its work per block step is one call divided by the block steps a delta carries.
- **sync**: the answer to exchange k is the state after every worker's exchanges up to k - 1 (each round's
  deltas added in rank order, so runs repeat bit for bit for any number of workers); it is taken at exchange
  k + 1, waiting only if another worker has not reached exchange k - 1 by then. **async**: the answer is the
  server's state right after the push, which holds whatever the others had pushed; it is taken once it
  has arrived, never waited for.
- **Exactly once.** A push is identified by (source, round): source names the worker's rank, round is
  (epoch, exchange). A round not above the last one received from its source is a repeat (a restarted worker
  redoing an epoch whose deltas the server already holds) and is ignored; the last round per source is part
  of the server's checkpoint. ``version`` counts the block steps whose updates the state holds.

State travels as one flat float32 vector of the trainable parameters (:class:`FlatLayout`); buffers (the
one-hot identity) never change during training.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol

import torch
from torch import nn

from ..config import TrainConfig
from ..core import ModelSpec, SharedState, build_shared
from .hardware import on_host
from .optimizer import FusedAdamW

Round = tuple[int, int]  # (epoch, exchange within the epoch, from 1): increases along a run
NO_ROUND: Round = (-1, 0)  # below every real round: nothing received yet
# train.sync_every=auto on a GPU: (mini-batches between exchanges, the epoch whose first batches measured it).
# One per run, kept by the server (SharedStateServer.settle_sync_every): rounds are numbered by exchange, so
# every worker must exchange after the same mini-batches, and so must a restarted or resumed one.
SyncEveryChoice = tuple[int, int]


class FlatLayout:
    """The trainable parameters of a module as one flat vector: their names, shapes and sizes, in
    ``named_parameters`` order (the same on every worker and the server, as they build the same module)."""

    def __init__(self, module: nn.Module) -> None:
        params = list(module.named_parameters())
        self.names = [n for n, _ in params]
        self.shapes = [tuple(p.shape) for _, p in params]
        self.numels = [p.numel() for _, p in params]
        self.size = sum(self.numels)

    def bind(self, module: nn.Module) -> torch.Tensor:
        """Make the module's parameters views of one flat tensor (returned): an update of either is the other's."""
        params = [p for _, p in module.named_parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in params]) if params else torch.zeros(0)
        for p, view in zip(params, self.split(flat), strict=True):
            p.data = view
        return flat

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` (size,) shaped like the parameters."""
        return [v.view(s) for v, s in zip(flat.split(self.numels), self.shapes, strict=True)]


class Snapshot(NamedTuple):
    """A state of the server, as it answers an exchange or a pull."""

    version: int  # block steps whose updates the state holds
    flat: torch.Tensor  # (layout.size,) float32, CPU: the trainable shared parameters
    holds: Round  # the asking worker's own pushes up to this round are in it
    incarnation: str  # changes when the server process is restarted (it then restored a checkpoint)
    after: Round | None = None  # sync: the round this is the state after (the same for every worker asking)


class SharedStateServer:
    """Holds the shared state; adds the deltas workers push; counts versions.

    sources: the workers' names in rank order. In sync mode a round is applied once every source has pushed
    it or a later one (a round a source never pushed, e.g. one lost with a restarted server, counts as
    empty), the deltas of one round in rank order, and the state after each round is kept a while for the
    exchanges that ask for it. In async mode every delta is applied when it arrives.
    """

    KEEP_ROUNDS = 4  # states after the last rounds, for answers; a worker asks at most 2 rounds back

    def __init__(
        self, spec: ModelSpec, seed: int, prototype_init: torch.Tensor | None = None, *,
        sources: list[str] | None = None, mode: str = "sync",
    ) -> None:
        self.shared: SharedState = build_shared(spec, seed, prototype_init)
        self.layout = FlatLayout(self.shared)
        self.flat = self.layout.bind(self.shared)
        self.sources = list(sources or ["w0"])
        self.mode = mode
        self.version = 0
        self.pushes = 0  # deltas applied
        self.received: dict[str, Round] = {}  # source -> last round received from it (applied or held)
        self.held: dict[Round, dict[str, tuple[torch.Tensor, int]]] = {}  # sync: rounds not complete yet
        self.after: dict[Round, tuple[int, torch.Tensor]] = {}  # sync: (version, state) after recent rounds
        self.repeats = 0  # pushes ignored as repeats
        self.refused = 0  # pushes meant for an earlier incarnation
        self.incarnation = f"{os.getpid()}-{os.urandom(4).hex()}"
        self.sync_every: SyncEveryChoice | None = None  # train.sync_every=auto on GPUs: the run's value, once chosen

    def settle_sync_every(self, proposal: SyncEveryChoice | None) -> SyncEveryChoice | None:
        """The run's sync_every for ``auto`` on GPUs: the first proposal wins, every later one (and a query,
        None) gets it back. Each worker measures its own step time, but in sync mode round k is every worker's
        k-th exchange: workers that exchanged after different numbers of mini-batches would wait for rounds the
        others push only later, or (at an epoch's end) never. It is part of the checkpoint, so a restarted or
        resumed worker exchanges as the run did."""
        if self.sync_every is None and proposal is not None:
            self.sync_every = (int(proposal[0]), int(proposal[1]))
        return self.sync_every

    @property
    def complete(self) -> Round:
        """The last round every source has pushed (sync: the state holds every delta up to it)."""
        return min(self.received.get(s, NO_ROUND) for s in self.sources)

    def exchange(self, delta: torch.Tensor, steps: int, source: str, round_: Round, want: Round | None,
                 incarnation: str | None = None) -> Snapshot | None:
        """Receive ``source``'s delta for ``round_`` (``steps`` block steps), then :meth:`answer` ``want``.

        incarnation: the server the worker meant; a delta meant for an earlier incarnation (sent before the
        worker noticed a restart) is refused, since the worker sends it again with the others it lost.
        """
        if incarnation is not None and incarnation != self.incarnation:
            self.refused += 1
            return None
        self.push(delta, steps, source, round_)
        return None if want is None else self.answer(source, want)

    def push(self, delta: torch.Tensor, steps: int, source: str, round_: Round) -> int:
        """Add a delta (layout.size,) carrying ``steps`` block steps; returns the version after it. A repeat
        of a round already received from ``source`` is ignored."""
        round_ = (int(round_[0]), int(round_[1]))
        if source not in self.sources:
            raise ValueError(f"push from unknown source {source!r}; sources: {self.sources}")
        if round_ <= self.received.get(source, NO_ROUND):
            self.repeats += 1
            return self.version
        if tuple(delta.shape) != (self.layout.size,):
            raise ValueError(f"push from {source}: delta of shape {tuple(delta.shape)}, the shared state has "
                             f"{self.layout.size} values ({', '.join(self.layout.names)})")
        self.received[source] = round_
        if self.mode == "async":
            self._apply(delta, steps)
            return self.version
        self.held.setdefault(round_, {})[source] = (delta, steps)
        done = self.complete
        for r in sorted(r for r in self.held if r <= done):
            by_source = self.held.pop(r)
            for s in self.sources:  # rank order: the same sum whatever order the pushes arrived in
                if s in by_source:
                    self._apply(*by_source[s])
            self.after[r] = (self.version, self.flat.clone())
        for r in sorted(self.after)[: -self.KEEP_ROUNDS]:
            del self.after[r]
        return self.version

    def _apply(self, delta: torch.Tensor, steps: int) -> None:
        self.flat.add_(delta.to(self.flat.dtype))
        self.version += int(steps)
        self.pushes += 1

    def ready(self, source: str, want: Round) -> bool:
        """Whether :meth:`answer` can answer ``want``: sync, once every source reached that round; async, once
        this source's own push of it has arrived (Ray delivers one caller's calls in order)."""
        want = (int(want[0]), int(want[1]))
        if self.mode == "async":
            return self.received.get(source, NO_ROUND) >= want
        return self.complete >= want

    def answer(self, source: str, want: Round) -> Snapshot | None:
        """The state a worker asked for, None while it is not :meth:`ready`. sync: the state right after round
        ``want`` (or after the last kept round before it: a restarted worker replaying old rounds); async: the
        state now."""
        if not self.ready(source, want):
            return None
        want = (int(want[0]), int(want[1]))
        kept = [r for r in self.after if r <= want]
        if self.mode == "async" or not kept:
            return self.pull(want)
        version, flat = self.after[max(kept)]
        return Snapshot(version, flat, want, self.incarnation, max(kept))

    def pull(self, holds: Round = NO_ROUND) -> Snapshot:
        """The state now (a copy)."""
        return Snapshot(self.version, self.flat.clone(), holds, self.incarnation)

    def state_dict(self) -> dict:
        """For checkpoints, taken between epochs (nothing held then)."""
        state = {"shared": {k: v.detach().cpu().clone() for k, v in self.shared.state_dict().items()},
                 "version": self.version, "pushes": self.pushes,
                 "received": {s: list(r) for s, r in self.received.items()}}
        if self.sync_every is not None:  # only GPU runs with sync_every=auto have one
            state["sync_every"] = list(self.sync_every)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.shared.load_state_dict(state["shared"])  # copies into the parameters: into self.flat
        self.version = int(state["version"])
        self.pushes = int(state.get("pushes", 0))
        # Checkpoints of the per-step protocol have "applied" (and a server optimizer) instead: nothing of
        # them carries over but the state and its version.
        self.received = {str(s): (int(r[0]), int(r[1])) for s, r in state.get("received", {}).items()}
        self.held, self.after = {}, {}
        chosen = state.get("sync_every")  # absent: not chosen yet, or a checkpoint from before it was kept
        self.sync_every = None if chosen is None else (int(chosen[0]), int(chosen[1]))


class ServerRestarted(Exception):
    """The server was restarted while a call was in flight; ``snapshot`` is the state it came back with."""

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__(f"parameter server restarted with version {snapshot.version}")
        self.snapshot = snapshot


class SharedStateClient(Protocol):
    """How a worker's replica talks to the server (in process, or through Ray: distributed.worker.RayClient).

    Any method may raise :class:`ServerRestarted`.
    """

    def fetch(self) -> Snapshot:
        """The server's state now; blocks (once per epoch, not on the step path)."""
        ...

    def exchange(self, delta: torch.Tensor, steps: int, round_: Round, want: Round | None) -> None:
        """Send a delta (CPU, flat) and, with ``want``, ask for a state (SharedStateServer.answer); does not
        wait. The answer comes with the next ``take``."""
        ...

    def take(self, wait: bool) -> Snapshot | None:
        """The answer to the last exchange that wanted one: None when there is none, or (wait=False) when it
        has not arrived or is not ready; wait=True waits until it is."""
        ...

    def flush(self) -> None:
        """Wait until every delta sent so far is received by the server."""
        ...

    def settle_sync_every(self, proposal: SyncEveryChoice | None) -> SyncEveryChoice | None:
        """SharedStateServer.settle_sync_every on the server; blocks (once per epoch, GPUs with auto only)."""
        ...


class LocalClient:
    """Direct calls on an in-process server: the reference run's 'network', with the same protocol."""

    def __init__(self, server: SharedStateServer, source: str = "w0") -> None:
        self.server, self.source = server, source
        self.want: Round | None = None
        self.answer: Snapshot | None = None

    def fetch(self) -> Snapshot:
        return self.server.pull()

    def exchange(self, delta: torch.Tensor, steps: int, round_: Round, want: Round | None) -> None:
        # Answered at once, as the Ray actor answers the call: in async mode that fixes what the state holds.
        self.answer = self.server.exchange(delta, steps, self.source, round_, want)
        self.want = want

    def take(self, wait: bool) -> Snapshot | None:
        if self.want is None:
            return None
        snap = self.answer or self.server.answer(self.source, self.want)
        if snap is None and wait:  # nothing else runs in this process that could complete the round
            raise RuntimeError(f"round {self.want} cannot complete: the sources {self.server.sources} "
                               f"have reached {self.server.received}")
        if snap is not None:
            self.want, self.answer = None, None
        return snap

    def flush(self) -> None:
        pass

    def settle_sync_every(self, proposal: SyncEveryChoice | None) -> SyncEveryChoice | None:
        return self.server.settle_sync_every(proposal)


@dataclass
class ExchangeStats:
    """A replica's counters: the time the protocol costs the worker, and what its refreshes brought."""

    exchanges: int = 0
    seconds: float = 0.0  # in exchanges and epoch-start fetches: all the worker spends on the protocol
    push_seconds: float = 0.0  # sending exchanges
    take_seconds: float = 0.0  # taking answers (sync: includes waiting for a slower worker)
    lag: int | None = None  # other workers' block steps the last refresh brought (the replica had missed them)
    max_lag: int = 0
    max_stale_exchanges: int = 0  # sync: exchange taking a state minus the last round it holds
    resyncs: int = 0  # server restarts noticed


class SharedReplica:
    """A worker's copy of the shared state, the AdamW its shards' steps apply to it, and the exchange.

    ``shared`` is what the shards train against (on the worker's device); its parameters are views of one
    flat vector. ``anchor`` is that vector as of the last push (the next delta is ``flat - anchor``);
    ``pushed[r]`` is the vector right after the push of round r, kept until a state that holds round r
    arrives. Taking such a state S adds ``S - pushed[r]`` to the replica, to the anchor and to the later
    ``pushed`` entries: the replica gets the other workers' updates and keeps its own that S lacks.
    """

    def __init__(self, spec: ModelSpec, train: TrainConfig, client: SharedStateClient, device: torch.device,
                 log: Callable[[str], None] = print) -> None:
        self.client, self.device, self.log = client, device, log
        self.mode = train.sync_mode
        self.shared = SharedState(spec).to(device)
        self.layout = FlatLayout(self.shared)
        self.flat = self.layout.bind(self.shared)
        self.params = dict(self.shared.named_parameters())
        # fused: its step takes ``found_inf`` and skips itself on the device, with no host sync (ShardTrainer).
        self.optimizer = FusedAdamW(self.params.values(), lr=train.lr, weight_decay=train.weight_decay)
        self.base_lr = train.lr
        self.anchor = self.flat.clone()
        self.pushed: dict[Round, torch.Tensor] = {}
        self.waiting = False  # an exchange asked for a state not taken yet
        self.version = -1  # of the last server state taken
        self.epoch_start_version = -1
        # This epoch's pushed deltas and their block steps: sent again if a restarted server lost them.
        self.own_since_epoch = torch.zeros_like(self.flat)
        self.own_steps_epoch = 0
        self.own_steps: dict[Round, int] = {}  # block steps of the pushes no state taken holds yet, by round
        self.unsent_steps = 0  # block steps in ``flat - anchor`` that no push has carried yet
        self.stats = ExchangeStats()

    # --- the shards' side -------------------------------------------------------------------
    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, factor: float) -> None:
        """Learning rate of the shared-state updates = train.lr x ``factor`` (the lr schedule's)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * factor

    def step(self, found_inf: torch.Tensor) -> None:
        """Apply the shared-state gradient of the block step just taken, unless ``found_inf`` (a 0-d float
        tensor on the device) is 1."""
        self.optimizer.found_inf = found_inf
        self.optimizer.step()

    # --- the exchange ----------------------------------------------------------------------
    def begin_epoch(self) -> None:
        """Take the server's state (blocking, once per epoch: every worker has finished the previous one)."""
        t0 = time.perf_counter()
        try:
            snap = self.client.fetch()
        except ServerRestarted as e:
            snap = e.snapshot
        with torch.no_grad():
            self.flat.copy_(snap.flat.to(self.device))
        self.anchor, self.waiting = self.flat.clone(), False
        self.pushed = {NO_ROUND: self.anchor.clone()}
        self.version = self.epoch_start_version = snap.version
        self.own_since_epoch.zero_()
        self.own_steps, self.own_steps_epoch, self.unsent_steps = {}, 0, 0
        self.stats.seconds += time.perf_counter() - t0

    def exchange(self, round_: Round, steps: int, last: bool) -> None:
        """Take the state the previous exchange asked for (sync: waiting if a slower worker has not reached
        the round it holds), then push the delta of the ``steps`` block steps since and ask for the next
        state (not at the epoch's last exchange: the next epoch starts with a fetch)."""
        t0 = time.perf_counter()
        self.stats.exchanges += 1
        self.unsent_steps += steps
        try:
            if self.waiting:
                snap = self.client.take(wait=self.mode == "sync")
                self.stats.take_seconds += time.perf_counter() - t0
                if snap is not None:
                    self._refresh(snap, round_)
            if last:
                want = None
            elif self.mode == "async":
                want = round_  # the state right after this push
            else:  # the state after the previous round, which every worker has normally pushed by now
                want = (round_[0], round_[1] - 1) if round_[1] > 1 else None
            self._push(round_, want)
        except ServerRestarted as e:
            self._restored(e.snapshot)
        if last:
            self._finish(round_)
        self.stats.seconds += time.perf_counter() - t0

    def _push(self, round_: Round, want: Round | None) -> None:
        t0 = time.perf_counter()
        with torch.no_grad():
            now = self.flat.clone()
            delta = now - self.anchor
            self.own_since_epoch.add_(delta)
        self.anchor = now
        self.pushed[round_] = now.clone()  # shifted apart from the anchor by later refreshes
        steps, self.unsent_steps = self.unsent_steps, 0
        self.own_steps[round_] = self.own_steps.get(round_, 0) + steps
        self.own_steps_epoch += steps
        self.waiting = want is not None
        self.client.exchange(delta.cpu(), steps, round_, want)
        self.stats.push_seconds += time.perf_counter() - t0

    def _refresh(self, snap: Snapshot, round_: Round) -> None:
        # The vector as of this worker's last push that the state holds (a round it skipped, after a server
        # restart, holds what the push before it did).
        base = max(r for r in self.pushed if r <= snap.holds)
        with torch.no_grad():
            shift = snap.flat.to(self.device) - self.pushed[base]
            self.flat.add_(shift)
            self.anchor.add_(shift)
            for r in list(self.pushed):
                if r < base:
                    del self.pushed[r]  # no later state holds less than this one
                else:
                    self.pushed[r].add_(shift)
        # Versions the new state holds beyond the last one taken: this worker's own steps up to the round it
        # holds, and the other workers' steps (which the replica had missed).
        own = sum(n for r, n in self.own_steps.items() if r <= snap.holds)
        self.stats.lag = snap.version - self.version - own
        self.stats.max_lag = max(self.stats.max_lag, self.stats.lag)
        self.own_steps = {r: n for r, n in self.own_steps.items() if r > snap.holds}
        if self.mode == "sync" and snap.holds[0] == round_[0]:
            self.stats.max_stale_exchanges = max(self.stats.max_stale_exchanges, round_[1] - snap.holds[1])
        self.version, self.waiting = snap.version, False

    def _finish(self, round_: Round) -> None:
        """The epoch's end: wait until every delta is received; a server that restarted meanwhile gets this
        epoch's deltas again, under the same round (its checkpoint predates it)."""
        while True:
            try:
                if self.unsent_steps or not torch.equal(self.flat, self.anchor):
                    self._push(round_, None)
                self.client.flush()
                return
            except ServerRestarted as e:
                self._restored(e.snapshot)

    def _restored(self, snap: Snapshot) -> None:
        """The server restarted from its last checkpoint. If that holds this epoch's start state, the deltas
        this worker pushed since go out again with its next push (every worker does so): nothing is lost.
        From an older checkpoint, the shared-state updates since it are lost."""
        self.stats.resyncs += 1
        carry = snap.version == self.epoch_start_version
        with torch.no_grad():
            base = snap.flat.to(self.device)
            self.flat.copy_(base + (self.flat - self.anchor) + (self.own_since_epoch if carry else 0))
            self.anchor = base.clone()
            self.own_since_epoch.zero_()
        if carry:
            self.unsent_steps += self.own_steps_epoch
        self.own_steps, self.own_steps_epoch, self.waiting = {}, 0, False
        self.pushed = {NO_ROUND: self.anchor.clone()}  # the restored state holds nothing of this worker's since
        self.version = snap.version
        self.log(f"parameter server restarted with the shared state of version {snap.version}; "
                 + ("this worker's updates since the epoch started go out again with its next push" if carry
                    else "the shared-state updates since that checkpoint are lost"))

    def settle_sync_every(self, proposal: SyncEveryChoice | None) -> SyncEveryChoice | None:
        """The run's sync_every for ``auto`` on GPUs, from the server (``SharedStateServer.settle_sync_every``):
        ``proposal`` if it is the first, else the one chosen before. A server restart noticed on the way is
        handled as at an exchange, and the proposal made again to the restored server."""
        t0 = time.perf_counter()
        while True:
            try:
                chosen = self.client.settle_sync_every(proposal)
                break
            except ServerRestarted as e:
                self._restored(e.snapshot)
        self.stats.seconds += time.perf_counter() - t0
        return chosen

    # --- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The replica's optimizer state, on the CPU (it leaves the worker for the driver's checkpoint)."""
        return {"optimizer": on_host(self.optimizer.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

"""The parameter-server actor: a :class:`SharedStateServer` behind Ray, restartable from checkpoints."""
from __future__ import annotations

import os
import time
import warnings

import ray
import torch

from ..core import ModelSpec
from ..storage.checkpoints import CheckpointStore
from ..training.shared_state import Round, SharedStateServer, Snapshot, SyncEveryChoice
from .telemetry import ServerTelemetry
from .wire import Wire, WireSnapshot, from_wire, to_wire


@ray.remote(num_cpus=0, max_restarts=0)
class ParameterServer:
    """Shared state (W_embed, head; CT: the noise schedule) with a version; adds the deltas workers push.

    num_cpus=0: it does little and must not take a worker's core. A plain (single-threaded) actor on purpose:
    Ray runs one caller's calls on it in the order they were sent, which the protocol relies on (a pull sent
    after a push sees it); asyncio and threaded actors do not keep that order. The driver creates it with
    ``max_restarts`` > 0 on the driver's node; when its process dies Ray runs ``__init__`` again, which then
    restores the last checkpoint of ``run_dir`` (version and rounds received included) instead of the initial
    state. Calls in flight when it died fail (no task retries): the workers notice, take the restored state
    and send again what it lacks (``training.shared_state.SharedReplica``).

    The state travels as one flat vector (``to_wire``).
    """

    def __init__(
        self, spec: ModelSpec, seed: int, prototype_init: torch.Tensor | None, state: dict | None,
        sources: list[str], mode: str, run_id: str | None = None, run_dir: str | None = None,
    ) -> None:
        """sources: the workers' names in rank order; mode: sync | async; run_id: the `run` label of the
        exported metrics, None to export none; state: the initial state (a resumed run's); run_dir: where a
        restarted server finds the last checkpoint."""
        torch.set_num_threads(1)
        self.server = SharedStateServer(spec, seed, prototype_init, sources=sources, mode=mode)
        self.restored_from: int | None = None  # epochs done of the checkpoint a restart restored
        with warnings.catch_warnings():  # Ray 2.60 warns inside this property about its own use of actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        saved = CheckpointStore(run_dir).load_shared() if (restarted and run_dir) else None
        if saved is not None:
            self.restored_from, state = saved
        if state is not None:
            self.server.load_state_dict(state)
        self.start_version = self.server.version
        self.telemetry = ServerTelemetry(run_id) if run_id is not None else None
        self.busy_seconds = 0.0  # inside exchange and pull: what the protocol costs the server's process
        self.packed: dict[Round, Wire] = {}  # sync: the states after recent rounds, as they travel

    def exchange(self, delta: Wire, steps: int, source: str, round_: Round, want: Round | None,
                 incarnation: str) -> tuple[str, WireSnapshot | None]:
        """A worker's exchange (SharedStateServer.exchange): (this incarnation, the state asked for or None)."""
        t0 = time.perf_counter()
        snap = self.server.exchange(from_wire(delta), steps, source, round_, want, incarnation)
        out = self.server.incarnation, self._wire(snap)
        seconds = time.perf_counter() - t0
        self.busy_seconds += seconds
        if self.telemetry is not None:
            self.telemetry.on_apply(seconds)
        return out

    def pull(self, source: str | None = None, want: Round | None = None) -> tuple[str, WireSnapshot | None]:
        """(incarnation, state): the state now (no arguments), or the state ``source`` asked for with ``want``
        once it is ready, None before. The incarnation tells a worker that the server it pushed to is gone."""
        t0 = time.perf_counter()
        snap = self.server.pull() if want is None else self.server.answer(source, want)
        out = self.server.incarnation, self._wire(snap)
        self.busy_seconds += time.perf_counter() - t0
        return out

    def _wire(self, snap: Snapshot | None) -> WireSnapshot | None:
        """The snapshot as it travels. The state after a sync round goes to every worker: it is packed (and a
        large one put into the object store) once."""
        if snap is None:
            return None
        if snap.after is None:
            return snap.version, to_wire(snap.flat, put=True), snap.holds, snap.incarnation
        if snap.after not in self.packed:
            self.packed = {r: w for r, w in self.packed.items() if r in self.server.after}
            self.packed[snap.after] = to_wire(snap.flat, put=True)
        return snap.version, self.packed[snap.after], snap.holds, snap.incarnation

    def settle_sync_every(self, proposal: SyncEveryChoice | None) -> tuple[str, SyncEveryChoice | None]:
        """(incarnation, the run's sync_every for auto on GPUs): SharedStateServer.settle_sync_every. The
        incarnation tells a worker that the server it exchanged with before is gone."""
        return self.server.incarnation, self.server.settle_sync_every(proposal)

    def identity(self) -> dict:
        """This incarnation: pid (changes when Ray restarts it), version, what it restored, repeats ignored;
        seconds spent in push and pull, and the process's CPU seconds (its Ray threads' (de)serialisation too)."""
        return {"pid": os.getpid(), "version": self.server.version, "start_version": self.start_version,
                "restored_from": self.restored_from, "repeats": self.server.repeats, "pushes": self.server.pushes,
                "refused": self.server.refused,
                "busy_seconds": self.busy_seconds, "cpu_seconds": time.process_time()}

    def state_dict(self) -> dict:
        return self.server.state_dict()

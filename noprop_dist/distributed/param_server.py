"""The parameter-server actor: a :class:`SharedStateServer` behind Ray, restartable from checkpoints."""
from __future__ import annotations

import os
import time
import warnings

import ray
import torch

from ..checkpoint import RunDir
from ..core import ModelSpec
from ..shared_server import SharedStateServer, TensorDict
from .telemetry import ServerTelemetry


@ray.remote(num_cpus=0, max_restarts=0)
class ParameterServer:
    """Shared state (W_embed, head; CT: the noise schedule) with a version.

    num_cpus=0: it does little and must not take a worker's core. The driver creates it with
    ``max_restarts`` > 0 on the driver's node; when its process dies Ray runs ``__init__`` again, which then
    restores the last checkpoint of ``run_dir`` (version and push ids included) instead of the initial
    state. Calls in flight when it died fail (no task retries), so a push is never applied twice: the
    workers notice the failure, re-sync with the restored state and go on.
    """

    def __init__(
        self, spec: ModelSpec, lr: float, weight_decay: float, seed: int,
        prototype_init: torch.Tensor | None, state: dict | None, run_id: str | None = None,
        run_dir: str | None = None,
    ) -> None:
        """run_id: the `run` label of the exported metrics, None to export none; state: the initial state
        (a resumed run's); run_dir: where a restarted server finds the last checkpoint."""
        torch.set_num_threads(1)
        self.server = SharedStateServer(spec, lr, weight_decay, seed, prototype_init)
        self.restored_from: int | None = None  # epochs done of the checkpoint a restart restored
        with warnings.catch_warnings():  # Ray 2.60 warns inside this property about its own use of actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        saved = RunDir(run_dir).load_shared() if (restarted and run_dir) else None
        if saved is not None:
            self.restored_from, state = saved
        if state is not None:
            self.server.load_state_dict(state)
        self.start_version = self.server.version
        self.telemetry = ServerTelemetry(run_id) if run_id is not None else None

    def push(self, grads: TensorDict, push_id: tuple[str, int] | None = None) -> int:
        if self.telemetry is None:
            return self.server.push(grads, push_id)
        t0 = time.perf_counter()
        version = self.server.push(grads, push_id)
        self.telemetry.on_apply(time.perf_counter() - t0)
        return version

    def pull(self) -> tuple[int, TensorDict]:
        return self.server.pull()

    def version(self) -> int:
        return self.server.version

    def identity(self) -> dict:
        """This incarnation: pid (changes when Ray restarts it), version, what it restored, repeats ignored."""
        return {"pid": os.getpid(), "version": self.server.version, "start_version": self.start_version,
                "restored_from": self.restored_from, "repeats": self.server.repeats}

    def state_dict(self) -> dict:
        return self.server.state_dict()

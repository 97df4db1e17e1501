"""The parameter-server actor: a :class:`SharedStateServer` behind Ray."""
from __future__ import annotations

import time

import ray
import torch

from ..core import ModelSpec
from ..shared_server import SharedStateServer, TensorDict
from .telemetry import ServerTelemetry


@ray.remote(num_cpus=0, max_restarts=0)
class ParameterServer:
    """Shared state (W_embed, head) with a version. num_cpus=0: it does little and must not take a worker's core."""

    def __init__(
        self, spec: ModelSpec, lr: float, weight_decay: float, seed: int,
        prototype_init: torch.Tensor | None, state: dict | None, run_id: str | None = None,
    ) -> None:
        """run_id: the `run` label of the exported metrics, None to export none."""
        torch.set_num_threads(1)
        self.server = SharedStateServer(spec, lr, weight_decay, seed, prototype_init)
        if state is not None:
            self.server.load_state_dict(state)
        self.telemetry = ServerTelemetry(run_id) if run_id is not None else None

    def push(self, grads: TensorDict) -> int:
        if self.telemetry is None:
            return self.server.push(grads)
        t0 = time.perf_counter()
        version = self.server.push(grads)
        self.telemetry.on_apply(time.perf_counter() - t0)
        return version

    def pull(self) -> tuple[int, TensorDict]:
        return self.server.pull()

    def version(self) -> int:
        return self.server.version

    def state_dict(self) -> dict:
        return self.server.state_dict()

"""The parameter server's logic, without Ray: shared state, its optimizer and a version number.

The Ray actor (``distributed/param_server.py``) wraps one of these; the in-process reference run calls
one directly through :class:`LocalClient`, so both apply exactly the same updates.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .core import ModelSpec, SharedState, build_shared

TensorDict = dict[str, torch.Tensor]


class SharedStateServer:
    """Holds W_embed and the head; applies pushed gradients with AdamW; counts versions.

    Each accepted push is one optimizer step and raises ``version`` by one. A push may carry an id
    ``(source, seq)``, seq increasing per source (one source per client incarnation): a push whose seq is not above the last one applied for
    its source is a repeat (a retried call) and is ignored, so nothing is applied twice. The last seq per
    source is part of the state, so this holds across a restore from a checkpoint too.
    """

    def __init__(
        self, spec: ModelSpec, lr: float, weight_decay: float, seed: int, prototype_init: torch.Tensor | None = None
    ) -> None:
        self.shared: SharedState = build_shared(spec, seed, prototype_init)
        self.params = dict(self.shared.named_parameters())
        # one_hot has only the head to learn; AdamW needs at least one parameter, which it always has.
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=lr, weight_decay=weight_decay)
        self.version = 0
        self.applied: dict[str, int] = {}  # source -> seq of the last push applied from it
        self.repeats = 0  # pushes ignored as repeats

    def pull(self) -> tuple[int, TensorDict]:
        """(version, copy of the shared state dict)."""
        return self.version, {k: v.detach().clone() for k, v in self.shared.state_dict().items()}

    def push(self, grads: TensorDict, push_id: tuple[str, int] | None = None) -> int:
        """Apply one gradient (name -> tensor of the parameter's shape); returns the version after it.

        push_id: (source, seq) or None (no repeat detection, e.g. the in-process client).
        """
        if push_id is not None:
            source, seq = push_id
            if seq <= self.applied.get(source, -1):
                self.repeats += 1
                return self.version
        missing = set(self.params) - set(grads)
        if missing:
            raise ValueError(f"push is missing gradients for {sorted(missing)}")
        for name, p in self.params.items():
            p.grad = grads[name].to(p.device, p.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        if push_id is not None:
            self.applied[push_id[0]] = push_id[1]
        return self.version

    def state_dict(self) -> dict:
        return {"shared": self.shared.state_dict(), "optimizer": self.optimizer.state_dict(), "version": self.version,
                "applied": dict(self.applied)}

    def load_state_dict(self, state: dict) -> None:
        self.shared.load_state_dict(state["shared"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
        self.applied = {str(k): int(v) for k, v in state.get("applied", {}).items()}  # older checkpoints: none


class SharedStateClient(Protocol):
    """How a shard group talks to the parameter server (locally or through Ray)."""

    def push(self, grads: TensorDict) -> None: ...

    def pull(self) -> tuple[int, TensorDict] | None:
        """The server's (version, state), or None when nothing newer is available yet (async)."""
        ...


class LocalClient:
    """Direct calls on an in-process server: the reference run's 'network'."""

    def __init__(self, server: SharedStateServer) -> None:
        self.server = server

    def push(self, grads: TensorDict) -> None:
        self.server.push(grads)

    def pull(self) -> tuple[int, TensorDict]:
        return self.server.pull()

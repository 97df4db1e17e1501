"""One dispatch point on ``spec.method`` (noprop_dt | noprop_ct | noprop_fm) for the training and evaluation code.

NoProp-DT goes to exactly the functions it used before (same seeds, same numbers, same chain files); CT and FM
go to core.ct_blocks / core.continuous. Every chain has ``forward(x, generator) -> log-probs (B, m)``,
``predict(x, generator) -> (B,)`` and ``save(path, extra)``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import torch
from torch import nn

from ..config import NOPROP_METHODS
from . import objectives
from .blocks import ModelSpec, build_shard
from .chain import DTChain, load_chain_file
from .continuous import ContinuousChain, continuous_shard_loss
from .schedule import DTSchedule
from .shared import SharedState


def _check(method: str) -> str:
    if method not in NOPROP_METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(NOPROP_METHODS)}")
    return method


@lru_cache(maxsize=32)
def dt_schedule(num_blocks: int, abar_max: float) -> DTSchedule:
    """The DT cosine schedule, built once per (T, abar_max) (immutable, so sharing it is safe)."""
    return DTSchedule.cosine(num_blocks, abar_max)


__all__ = ["build_chain", "build_shard", "dt_schedule", "load_chain", "shard_loss"]  # build_shard: core.blocks'


def shard_loss(
    net: nn.Module, shared: SharedState, spec: ModelSpec, k: int, x: torch.Tensor, y: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, denoising part) of shard k's loss; reaches only ``net`` and ``shared``. x: (B, C, H, W), y: (B,)."""
    if _check(spec.method) == "noprop_dt":
        schedule = dt_schedule(spec.num_shards, spec.abar_max)
        return objectives.shard_loss(net, shared, spec, schedule, k, x, y, generator)
    return continuous_shard_loss(net, shared, spec, k, x, y, generator)


def build_chain(spec: ModelSpec, shard_states: list[dict], shared_state: dict) -> nn.Module:
    """The inference chain from state dicts (shards in order 1..K), in eval mode on the CPU."""
    if _check(spec.method) == "noprop_dt":
        return DTChain.from_states(spec, shard_states, shared_state)
    return ContinuousChain.from_states(spec, shard_states, shared_state)


def load_chain(path: str, map_location: str = "cpu", block: Callable | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a chain file of any method -> (chain, extra); the spec's method picks the chain class, its ``block``
    the shard networks (``block``: the factory itself, for a chain whose factory cannot be imported by its path)."""
    return load_chain_file(path, build_chain, map_location, block)

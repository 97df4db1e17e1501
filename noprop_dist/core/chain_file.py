"""The chain file (chain.pt): one file per assembled chain of any NoProp method, written (:func:`write_chain_file`),
read and checked (:func:`read_chain_file`, :func:`spec_problem`) and built into its chain (:func:`build_chain`,
:func:`load_chain_file`). It holds plain tensors and lists only, so it loads with ``weights_only=True``:

    {"format": CHAIN_FORMAT, "method": spec.method, "spec": ModelSpec.to_dict(), "blocks": [shard state dicts,
     1..K], "shared": shared state dict, "extra": {...}}
"""
from __future__ import annotations

import dataclasses
import pickle
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..config import (
    MAX_CHANNELS,
    MAX_CLASSES,
    MAX_EMBEDDING_DIM,
    MAX_IMAGE_SIZE,
    MAX_INFERENCE_STEPS,
    MAX_SHARDS,
    shown,
)
from ..registry import METHODS, get_method
from ..storage.atomic import atomic_torch_save
from .blocks import ModelSpec

if TYPE_CHECKING:
    from .chain import SavedChain

CHAIN_FORMAT = 1


def brief(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut at ``limit`` characters: torch's state-dict errors list every
    key over many lines."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_chain_file(path: str, spec: ModelSpec, shard_states: list[dict[str, torch.Tensor]],
                     shared_state: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> None:
    """One file, written atomically: method, spec, shard weights (shards in order 1..K) and shared weights."""
    payload = {
        "format": CHAIN_FORMAT,
        "method": spec.method,
        "spec": spec.to_dict(),
        "blocks": shard_states,
        "shared": shared_state,
        "extra": extra or {},
    }
    atomic_torch_save(payload, path)


def read_chain_file(path: str, map_location: str = "cpu") -> tuple[ModelSpec, dict[str, Any]]:
    """(spec, payload) of a chain file, format checked; loads with weights_only=True (a chain is data). The spec
    names its block (``spec.block``) but holds no factory."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as e:  # truncated, not torch, not a chain
        raise ValueError(f"{path}: not a readable chain file ({type(e).__name__}: {brief(e)})") from e
    if not isinstance(payload, dict) or payload.get("format") != CHAIN_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: unsupported chain format {found!r}")
    missing = [k for k in ("spec", "blocks", "shared", "extra") if k not in payload]
    if missing:
        raise ValueError(f"{path}: chain file lacks {', '.join(missing)}")
    try:
        spec = ModelSpec.from_dict(payload["spec"])
    except (TypeError, KeyError) as e:  # a key this version does not know, or one it needs
        raise ValueError(f"{path}: chain spec does not fit this version of noprop_dist ({e})") from e
    # Files written before CT/FM existed have no "method" (neither in the payload nor in the spec): NoProp-DT.
    method = payload.get("method", spec.method)
    if method != spec.method:
        raise ValueError(f"{path}: payload method {method!r} disagrees with its spec's {spec.method!r}")
    problem = spec_problem(spec)
    if problem:
        raise ValueError(f"{path}: chain spec out of bounds ({problem}); not built")
    if not isinstance(payload["extra"], dict):
        raise ValueError(f"{path}: chain file's extra is a {type(payload['extra']).__name__}, not a mapping")
    return spec, payload


def spec_problem(spec: ModelSpec) -> str | None:
    """What makes a spec read from a file unbuildable within the bounds a config may ask for, or None: the
    networks are built before their weights are checked, so a 2 MB file could otherwise ask for 137 GB."""
    def whole(v: Any, lo: int, hi: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    shape = spec.image_shape
    if not (len(shape) == 3 and all(whole(v, 1, MAX_IMAGE_SIZE) for v in shape) and shape[0] <= MAX_CHANNELS):
        return f"image_shape {shown(shape)}"
    for name, value, hi in (("num_shards", spec.num_shards, MAX_SHARDS), ("num_classes", spec.num_classes, MAX_CLASSES),
                            ("embed_dim", spec.embed_dim, max(MAX_EMBEDDING_DIM, MAX_CHANNELS * MAX_IMAGE_SIZE**2)),
                            ("inference_steps", spec.inference_steps, MAX_INFERENCE_STEPS)):
        if not whole(value, 1, hi):
            return f"{name} {shown(value)} (allowed: 1 to {hi})"
    if not (isinstance(spec.method, str) and spec.method in METHODS and METHODS[spec.method].noprop):
        return f"method {shown(spec.method)}"
    if not isinstance(spec.block, str):
        return f"block {shown(spec.block)}"
    return None


def build_chain(
    spec: ModelSpec, shard_states: list[dict[str, torch.Tensor]], shared_state: dict[str, torch.Tensor]
) -> SavedChain:
    """The inference chain of ``spec.method`` (its registry.METHODS entry's chain class) from state dicts (shards
    in order 1..K), in eval mode on the CPU."""
    return get_method(spec.method).chain.from_states(spec, shard_states, shared_state)


def load_chain_file(
    path: str, map_location: str = "cpu", block: Callable | None = None,
) -> tuple[SavedChain, dict[str, Any]]:
    """Read a chain file of any method and assemble it (:func:`build_chain`) -> (chain, extra). ``block``: the block
    factory to build the shards with (default: the one ``spec.block`` names, imported). Weights that do not fit
    the spec's networks, and a block that cannot be imported, raise a ValueError that names the file."""
    spec, payload = read_chain_file(path, map_location)
    if block is not None:
        spec = dataclasses.replace(spec, block_factory=block)
    try:
        return build_chain(spec, payload["blocks"], payload["shared"]), payload["extra"]
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e

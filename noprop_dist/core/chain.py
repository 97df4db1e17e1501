"""The assembled NoProp-DT inference chain (Eq. 3): runs without Ray, saves and loads as one file.

Inference never sees a label: z_0 is noise, each block refines it, the head reads z_T.
"""
from __future__ import annotations

import math
import pickle
from typing import Any, Callable

import torch
from torch import nn

from ..atomic_io import atomic_torch_save
from .blocks import DTBlock, ModelSpec
from .objectives import class_logits, denoised_estimate
from .schedule import DTSchedule, randn_like
from .shared import SharedState

CHAIN_FORMAT = 1


def read_chain_file(path: str, map_location: str = "cpu") -> tuple[ModelSpec, dict[str, Any]]:
    """(spec, payload) of a chain file, format checked; loads with weights_only=True (a chain is data)."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as e:  # truncated, not torch, not a chain
        raise ValueError(f"{path}: not a readable chain file ({type(e).__name__}: {_brief(e)})") from e
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
    return spec, payload


def load_chain_file(
    path: str, build: Callable[[ModelSpec, list[dict], dict], nn.Module], map_location: str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Read a chain file and assemble it with ``build(spec, shard_states, shared_state)`` -> (chain, extra).
    Weights that do not fit the spec's networks raise a ValueError that names the file."""
    spec, payload = read_chain_file(path, map_location)
    try:
        return build(spec, payload["blocks"], payload["shared"]), payload["extra"]
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _brief(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut at ``limit`` characters: torch's state-dict errors list every
    key over many lines."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_weights(net: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``net.load_state_dict(state)``, a mismatch reported as a ValueError that names ``what``."""
    try:
        net.load_state_dict(state)
    except RuntimeError as e:  # missing / unexpected keys, wrong shapes
        raise ValueError(f"{what}: the saved weights do not fit the network its spec describes "
                         f"({_brief(e)})") from e


class SavedChain(nn.Module):
    """What every assembled chain (DT, CT, FM) shares: its spec, shard networks and shared state, and one
    file format. Subclasses set ``shard_class`` (built as ``shard_class(spec)``) and define ``forward``."""

    shard_class: type[nn.Module]

    def __init__(self, spec: ModelSpec, shards: list[nn.Module], shared: SharedState) -> None:
        super().__init__()
        if len(shards) != spec.num_blocks:
            raise ValueError(f"chain needs {spec.num_blocks} shard networks, got {len(shards)}")
        self.spec = spec
        self.blocks = nn.ModuleList(shards)
        self.shared = shared

    @torch.no_grad()
    def predict(self, x: torch.Tensor, generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
        """(B, C, H, W) -> predicted classes (B,)."""
        return self.forward(x, generator, **kwargs).argmax(dim=1)

    def save(self, path: str, extra: dict[str, Any] | None = None) -> None:
        """One file: method, spec, shard and shared weights (plain tensors: loads with weights_only=True)."""
        payload = {
            "format": CHAIN_FORMAT,
            "method": self.spec.method,
            "spec": self.spec.to_dict(),
            "blocks": [b.state_dict() for b in self.blocks],
            "shared": self.shared.state_dict(),
            "extra": extra or {},
        }
        atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str, map_location: str = "cpu") -> tuple["SavedChain", dict[str, Any]]:
        """Rebuild a saved chain in eval mode; returns (chain, extra)."""
        return load_chain_file(path, cls.from_states, map_location)

    @classmethod
    def from_states(
        cls, spec: ModelSpec, shard_states: list[dict[str, torch.Tensor]], shared_state: dict[str, torch.Tensor]
    ) -> "SavedChain":
        """Assemble from state dicts (shards in order 1..K); returned in eval mode on the CPU."""
        shards = [cls.shard_class(spec) for _ in range(spec.num_blocks)]
        if len(shard_states) != spec.num_blocks:
            raise ValueError(f"chain spec has {spec.num_blocks} shard networks but {len(shard_states)} weight sets")
        for k, (net, state) in enumerate(zip(shards, shard_states, strict=True), start=1):
            _load_weights(net, state, f"shard {k} of {spec.num_blocks}")
        shared = SharedState(spec)
        _load_weights(shared, shared_state, "shared state")
        return cls(spec, shards, shared).eval()


class DTChain(SavedChain):
    """T blocks + shared state. ``forward(x)`` -> class log-probabilities (B, m)."""

    shard_class = DTBlock

    def __init__(self, spec: ModelSpec, blocks: list[DTBlock], shared: SharedState) -> None:
        super().__init__(spec, blocks, shared)
        self.schedule = DTSchedule.cosine(spec.num_blocks, spec.abar_max)
        self.coefficients = [self.schedule.posterior_coefficients(t) for t in range(1, spec.num_blocks + 1)]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: (B, C, H, W) normalised images -> log p(y | z_T), (B, m)."""
        embed = self.shared.embed
        z = randn_like(x.new_empty((x.shape[0], embed.shape[1])), generator)
        for block, (a, b, c) in zip(self.blocks, self.coefficients):
            u_hat = denoised_estimate(block(z, x), embed)
            z = a * u_hat + b * z + math.sqrt(c) * randn_like(z, generator)
        logits = class_logits(self.shared, z, self.spec.class_prob, self.spec.radial_sigma)
        return torch.log_softmax(logits, dim=1)


def default_device() -> torch.device:
    """The GPU when this process has one, else the CPU: where evaluation (and the reference run) go."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def evaluate_chain(
    chain: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    seed: int,
    normalize: Any,
    device: torch.device | str | None = None,
) -> tuple[float, torch.Tensor]:
    """Accuracy of the chain on uint8 images (N, C, H, W); labels only score, never feed, the chain.

    ``normalize(uint8 batch) -> float batch``. The chain runs on ``device`` (None: :func:`default_device`) and
    is moved back where it was;
    its noise comes from a CPU generator seeded with ``seed``, so the draws do not depend on the device.
    Returns (accuracy in [0, 1], predictions (N,) on the CPU).
    """
    chain.eval()
    device = default_device() if device is None else torch.device(device)
    home = next(chain.parameters()).device
    chain.to(device)
    try:
        gen = torch.Generator().manual_seed(seed)
        preds = torch.cat([
            chain.predict(normalize(images[i : i + batch_size].to(device)), gen).cpu()
            for i in range(0, images.shape[0], batch_size)
        ])
    finally:
        chain.to(home)
    return float((preds == labels).float().mean()), preds

"""The assembled inference chains, the classes registry.METHODS names: :class:`DTChain` (NoProp-DT, Eq. 3),
:class:`CTChain` (NoProp-CT) and :class:`FMChain` (NoProp-FM). A chain holds its spec, its shard networks and the
shared state and defines its ``readout``; it runs without Ray, saves as one file (core.chain_file) and samples
with the free functions of core.samplers that its ``samplers`` table names.

Inference never sees a label: z_0 is noise, each shard refines it, the chain's ``readout`` reads the classes.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..registry import get_method
from .blocks import ModelSpec, make_shard
from .chain_file import brief, write_chain_file
from .paths import class_logits, shard_bounds
from .samplers import CT_SAMPLERS, DT_SAMPLERS, FM_SAMPLERS, Sampler, StageTrace
from .schedules import DTSchedule
from .shared import SharedState


def _load_weights(net: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``net.load_state_dict(state)``, a mismatch reported as a ValueError that names ``what``."""
    try:
        net.load_state_dict(state)
    except RuntimeError as e:  # missing / unexpected keys, wrong shapes
        raise ValueError(f"{what}: the saved weights do not fit the network its spec describes "
                         f"({brief(e)})") from e


class SavedChain(nn.Module):
    """What every assembled chain (DT, CT, FM) shares: its spec, shard networks (built by ``spec.block``'s
    factory) and shared state, and one file format. Subclasses name their samplers (``samplers``, core.samplers)
    and define ``readout``; each is the chain of the methods whose registry.METHODS entry names it."""

    # The free functions of core.samplers this chain runs, by name: those its methods' registry entries list.
    samplers: ClassVar[dict[str, Sampler]] = {}

    def __init__(self, spec: ModelSpec, shards: list[nn.Module], shared: SharedState) -> None:
        super().__init__()
        if not isinstance(self, get_method(spec.method).chain):
            raise ValueError(f"a {type(self).__name__} is not the chain of model.method={spec.method}")
        if len(shards) != spec.num_shards:
            raise ValueError(f"chain needs {spec.num_shards} shard networks, got {len(shards)}")
        self.spec = spec
        self.blocks = nn.ModuleList(shards)
        self.shared = shared

    def sampler_name(self, sampler: str | None = None) -> str:
        """The sampler a call runs: ``sampler``, else the spec's, else the paper's for the method; ValueError
        naming the allowed ones when it does not apply to this chain's method."""
        method = get_method(self.spec.method)
        name = sampler or self.spec.sampler or method.paper_sampler
        if name not in method.samplers:
            raise ValueError(f"sampler {name!r} does not apply to a {method.name} chain; allowed: "
                             f"{', '.join(method.samplers)}")
        return name

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        """Class log-probabilities at the end of the chain (and, traced, after each stage): (B, d) -> (B, m)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sampler: str | None = None,
        draws: int | None = None, trace: list[StageTrace] | None = None, z0: torch.Tensor | None = None,
        steps: int | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W) normalised images -> class log-probabilities (B, m).

        sampler: config.SAMPLERS (default: :meth:`sampler_name`); draws: the ensemble's noisy runs (default
        spec.ensemble_draws). trace: a list that gets one :data:`StageTrace` per stage (for the ensemble, each
        averaged over its runs; for stage_average, those of its one mean run, whose read-outs it averages).
        z0: the starting point z_0 (B, d) to use instead of drawing it from ``generator`` (every other draw
        still comes from ``generator``); not with the ensemble, which starts each of its runs from its own z_0.
        steps: CT / FM's inference steps N (default spec.inference_steps).
        """
        name = self.sampler_name(sampler)
        method = get_method(self.spec.method)
        if steps is not None and not method.takes_steps:
            raise ValueError(f"steps does not apply to a {method.name} chain")
        return self.samplers[name](self, x, z0, generator, steps, draws, trace)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, generator: torch.Generator | None = None, z0: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        """(B, C, H, W) -> predicted classes (B,); z0 (B, d): the starting point, as :meth:`forward` takes it."""
        return self.forward(x, generator, z0=z0, **kwargs).argmax(dim=1)

    def save(self, path: str, extra: dict[str, Any] | None = None) -> None:
        """One file (core.chain_file): method, spec, shard and shared weights (plain tensors: loads with
        weights_only=True)."""
        write_chain_file(path, self.spec, [b.state_dict() for b in self.blocks], self.shared.state_dict(), extra)

    @classmethod
    def from_states(
        cls, spec: ModelSpec, shard_states: list[dict[str, torch.Tensor]], shared_state: dict[str, torch.Tensor]
    ) -> SavedChain:
        """Assemble from state dicts (shards in order 1..K); returned in eval mode on the CPU."""
        if len(shard_states) != spec.num_shards:
            raise ValueError(f"chain spec has {spec.num_shards} shard networks but {len(shard_states)} weight sets")
        shards = [make_shard(spec, k) for k in range(1, spec.num_shards + 1)]
        for k, (net, state) in enumerate(zip(shards, shard_states, strict=True), start=1):
            _load_weights(net, state, f"shard {k} of {spec.num_shards}")
        shared = SharedState(spec)
        _load_weights(shared, shared_state, "shared state")
        return cls(spec, shards, shared).eval()


class DTChain(SavedChain):
    """NoProp-DT's chain: T blocks + shared state, Eq. 3 with the cosine schedule's coefficients (core.samplers'
    dt_eq3, dt_mean; block t = 1..T in that order). ``forward(x)`` -> class log-probabilities (B, m)."""

    samplers = DT_SAMPLERS

    def __init__(self, spec: ModelSpec, blocks: list[nn.Module], shared: SharedState) -> None:
        super().__init__(spec, blocks, shared)
        self.schedule = DTSchedule.cosine(spec.num_shards, spec.abar_max)
        self.coefficients = [self.schedule.posterior_coefficients(t) for t in range(1, spec.num_shards + 1)]

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        """The head's class log-probabilities at z: (B, d) -> (B, m)."""
        return torch.log_softmax(class_logits(self.shared, z, self.spec.class_prob, self.spec.radial_sigma), dim=1)


class ContinuousChain(SavedChain):
    """K shard networks + shared state, run on a grid of times: what NoProp-CT's chain (:class:`CTChain`) and
    NoProp-FM's (:class:`FMChain`) share. ``forward(x)`` -> log-probabilities (B, m); z_0 ~ N(0, I), N steps on the
    grid t_n = n/N, step n run by the network whose partition interval contains t_n (core.samplers)."""

    def shard_bounds(self) -> list[float]:
        """The K + 1 boundaries at which the chain switches from one shard's network to the next."""
        return shard_bounds(self.spec, self.shared).tolist()

    def nearest_readout(self, z: torch.Tensor) -> torch.Tensor:
        """The nearest class embedding's class as log-probabilities: log_softmax of -||z - u_c||^2, (B, d) -> (B, m)
        (the paper predicts FM's nearest embedding; unit temperature makes the distances proper log-probabilities)."""
        return torch.log_softmax(-torch.cdist(z, self.shared.embed).pow(2), dim=1)


class CTChain(ContinuousChain):
    """NoProp-CT's chain: Eq. 3 on the fine grid (eq3, mean) or the probability-flow ODE (ode) of the learned
    schedule; a trace entry is the readout at z after the shard's last step and the shard's own prediction."""

    samplers = CT_SAMPLERS

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        """Class log-probabilities at z_1: (B, d) -> (B, m). ``spec.ct_readout = nearest``: the nearest class
        embedding, as NoProp-FM's; ``head`` (the paper's Eq. 14): the shared head, which only K shard losses per
        mini-batch train, against T = 10 for NoProp-DT's, so it lags the shards early on
        (docs/continuous_time.md)."""
        if self.spec.ct_readout == "nearest":
            return self.nearest_readout(z)
        return torch.log_softmax(class_logits(self.shared, z, self.spec.class_prob, self.spec.radial_sigma), dim=1)


class FMChain(ContinuousChain):
    """NoProp-FM's chain: Euler from t = 0 to 1 along core.paths.fm_field's velocity (its one sampler, mean), read
    out at the nearest class embedding; a trace entry is the readout at the endpoint the shard's last step's
    velocity points at, z + (1 - t) v (FM's networks make no class prediction of their own)."""

    samplers = FM_SAMPLERS

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        """The nearest class embedding at z_1: (B, d) -> log-probabilities (B, m)."""
        return self.nearest_readout(z)

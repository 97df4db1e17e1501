"""The assembled NoProp-DT inference chain (Eq. 3): runs without Ray, saves and loads as one file.

Inference never sees a label: z_0 is noise, each block refines it, the head reads z_T.
"""
from __future__ import annotations

import dataclasses
import math
import pickle
from typing import Any, Callable

import torch
from torch import nn

from ..config import (
    MAX_CHANNELS,
    MAX_CLASSES,
    MAX_EMBEDDING_DIM,
    MAX_IMAGE_SIZE,
    MAX_INFERENCE_STEPS,
    MAX_SHARDS,
    NOPROP_METHODS,
    PAPER_SAMPLER,
    SAMPLERS,
    shown,
)
from ..storage.atomic import atomic_torch_save
from .blocks import ModelSpec, make_shard
from .objectives import class_logits, denoised_estimate
from .schedule import DTSchedule, randn_like
from .shared import SharedState

CHAIN_FORMAT = 1

# Samplers whose only randomness is z_0: given z_0, a run is a fixed function of the images, so it can be split
# into batches (each with its rows of z_0) and exported as a graph that takes z_0 as an input. eq3 draws noise at
# every step and the ensemble a z_0 per run.
Z0_ONLY_SAMPLERS = ("mean", "stage_average", "ode")

# What a chain records per stage (DT block t, or CT / FM shard k at the end of its interval) when asked to
# trace: (log-probabilities read out from z after the stage (B, m), the stage's own class log-probabilities
# from its network's logits (B, m), None for FM whose network outputs a velocity).
StageTrace = tuple[torch.Tensor, "torch.Tensor | None"]


def mean_probabilities(log_probs: list[torch.Tensor]) -> torch.Tensor:
    """log of the mean of the class probabilities of several runs: [(B, m)] log-probs or logits -> (B, m)."""
    stacked = torch.log_softmax(torch.stack(log_probs), dim=-1)
    return torch.logsumexp(stacked, dim=0) - math.log(len(log_probs))


def read_chain_file(path: str, map_location: str = "cpu") -> tuple[ModelSpec, dict[str, Any]]:
    """(spec, payload) of a chain file, format checked; loads with weights_only=True (a chain is data). The spec
    names its block (``spec.block``) but holds no factory."""
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
    if spec.method not in NOPROP_METHODS:
        return f"method {shown(spec.method)}"
    if not isinstance(spec.block, str):
        return f"block {shown(spec.block)}"
    return None


def load_chain_file(
    path: str, build: Callable[[ModelSpec, list[dict], dict], nn.Module], map_location: str = "cpu",
    block: Callable | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Read a chain file and assemble it with ``build(spec, shard_states, shared_state)`` -> (chain, extra).
    ``block``: the block factory to build the shards with (default: the one ``spec.block`` names, imported).
    Weights that do not fit the spec's networks, and a block that cannot be imported, raise a ValueError that
    names the file."""
    spec, payload = read_chain_file(path, map_location)
    if block is not None:
        spec = dataclasses.replace(spec, block_factory=block)
    try:
        return build(spec, payload["blocks"], payload["shared"]), payload["extra"]
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def start_noise(like: torch.Tensor, generator: torch.Generator | None, z0: torch.Tensor | None) -> torch.Tensor:
    """z_0 of a chain run, ``like``'s shape (B, d), dtype and device: ``z0`` when given (a one-line ValueError
    when its shape is not ``like``'s), else N(0, I) drawn from ``generator`` (``randn_like``).

    A caller that draws z_0 itself can split a batch and still give each image the z_0 one call would have."""
    if z0 is None:
        return randn_like(like, generator)
    # a tracer (export) sees the example's shapes here: the check would only be frozen into the graph
    if not torch.jit.is_tracing() and tuple(z0.shape) != tuple(like.shape):
        raise ValueError(f"z0: shape {tuple(z0.shape)}, expected (B, d) = {tuple(like.shape)}")
    return z0.to(device=like.device, dtype=like.dtype)


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
    """What every assembled chain (DT, CT, FM) shares: its spec, shard networks (built by ``spec.block``'s
    factory) and shared state, and one file format. Subclasses define ``_sample``."""

    def __init__(self, spec: ModelSpec, shards: list[nn.Module], shared: SharedState) -> None:
        super().__init__()
        if len(shards) != spec.num_shards:
            raise ValueError(f"chain needs {spec.num_shards} shard networks, got {len(shards)}")
        self.spec = spec
        self.blocks = nn.ModuleList(shards)
        self.shared = shared

    def sampler_name(self, sampler: str | None = None) -> str:
        """The sampler a call runs: ``sampler``, else the spec's, else the paper's for the method; ValueError
        naming the allowed ones when it does not apply to this chain's method."""
        method = self.spec.method
        name = sampler or self.spec.sampler or PAPER_SAMPLER[method]
        allowed = [k for k, methods in SAMPLERS.items() if method in methods]
        if name not in allowed:
            raise ValueError(f"sampler {name!r} does not apply to a {method} chain; allowed: {', '.join(allowed)}")
        return name

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sampler: str | None = None,
        draws: int | None = None, trace: list[StageTrace] | None = None, z0: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """x: (B, C, H, W) normalised images -> class log-probabilities (B, m).

        sampler: config.SAMPLERS (default: :meth:`sampler_name`); draws: the ensemble's noisy runs (default
        spec.ensemble_draws). trace: a list that gets one :data:`StageTrace` per stage (for the ensemble, each
        averaged over its runs; for stage_average, those of its one mean run, whose read-outs it averages).
        z0: the starting point z_0 (B, d) to use instead of drawing it from ``generator`` (every other draw
        still comes from ``generator``); not with the ensemble, which starts each of its runs from its own z_0.
        kwargs go to the subclass's ``_sample`` (CT / FM: ``steps``).
        """
        name = self.sampler_name(sampler)
        if name == "stage_average":
            # Each z_t of the mean chain mixes class embeddings (plus what is left of z_0), so the head reads it
            # out as it reads z_T; averaging the read-outs keeps what middle blocks add when later ones give it back.
            stages: list[StageTrace] = []
            self._sample(x, generator, "mean", stages, z0=z0, **kwargs)
            if trace is not None:
                trace.extend(stages)
            return mean_probabilities([readout for readout, _ in stages])
        if name != "ensemble":
            return self._sample(x, generator, name, trace, z0=z0, **kwargs)
        if z0 is not None:
            raise ValueError("z0 does not apply to the ensemble sampler, which draws its own z_0 for each run")
        n = int(draws or self.spec.ensemble_draws)
        if n < 1:
            raise ValueError(f"draws must be >= 1, got {n}")
        noisy = "mean" if self.spec.method == "noprop_fm" else "eq3"  # FM's randomness is its z_0 only
        runs, traces = [], []
        for _ in range(n):
            traces.append([] if trace is not None else None)
            runs.append(self._sample(x, generator, noisy, traces[-1], **kwargs))
        if trace is not None:
            for stage in zip(*traces):  # the n runs' traces of one stage
                readouts, owns = zip(*stage)
                trace.append((mean_probabilities(list(readouts)),
                              None if owns[0] is None else mean_probabilities(list(owns))))
        return mean_probabilities(runs)

    def _sample(self, x: torch.Tensor, generator: torch.Generator | None, sampler: str,
                trace: list[StageTrace] | None, z0: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """One run of a single-run sampler (not ensemble): (B, C, H, W) -> log-probabilities (B, m); z0: (B, d)
        or None (drawn from ``generator``, see :func:`start_noise`)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, x: torch.Tensor, generator: torch.Generator | None = None, z0: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        """(B, C, H, W) -> predicted classes (B,); z0 (B, d): the starting point, as :meth:`forward` takes it."""
        return self.forward(x, generator, z0=z0, **kwargs).argmax(dim=1)

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
        if len(shard_states) != spec.num_shards:
            raise ValueError(f"chain spec has {spec.num_shards} shard networks but {len(shard_states)} weight sets")
        shards = [make_shard(spec, k) for k in range(1, spec.num_shards + 1)]
        for k, (net, state) in enumerate(zip(shards, shard_states, strict=True), start=1):
            _load_weights(net, state, f"shard {k} of {spec.num_shards}")
        shared = SharedState(spec)
        _load_weights(shared, shared_state, "shared state")
        return cls(spec, shards, shared).eval()


class DTChain(SavedChain):
    """T blocks + shared state. ``forward(x)`` -> class log-probabilities (B, m).

    z_0 ~ N(0, I); block t (t = 1..T, in that order: block t was trained on z_{t-1}'s noise level) gives
    u_hat_t = softmax(logits_t) @ W_embed and ``z_t = a_t u_hat_t + b_t z_{t-1} (+ sqrt(c_t) eps with eq3)``.
    """

    def __init__(self, spec: ModelSpec, blocks: list[nn.Module], shared: SharedState) -> None:
        super().__init__(spec, blocks, shared)
        self.schedule = DTSchedule.cosine(spec.num_shards, spec.abar_max)
        self.coefficients = [self.schedule.posterior_coefficients(t) for t in range(1, spec.num_shards + 1)]

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        """The head's class log-probabilities at z: (B, d) -> (B, m)."""
        return torch.log_softmax(class_logits(self.shared, z, self.spec.class_prob, self.spec.radial_sigma), dim=1)

    def _sample(self, x: torch.Tensor, generator: torch.Generator | None, sampler: str,
                trace: list[StageTrace] | None, z0: torch.Tensor | None = None) -> torch.Tensor:
        """eq3 or mean: x (B, C, H, W) normalised images -> log p(y | z_T), (B, m). z0: z_0 (B, d), or None to
        draw it from ``generator``."""
        embed = self.shared.embed
        z = start_noise(x.new_empty((x.shape[0], embed.shape[1])), generator, z0)
        for block, (a, b, c) in zip(self.blocks, self.coefficients):
            logits = block(z, x)
            z = a * denoised_estimate(logits, embed) + b * z
            if sampler == "eq3":
                z = z + math.sqrt(c) * randn_like(z, generator)
            if trace is not None:
                trace.append((self.readout(z), torch.log_softmax(logits, dim=1)))
        return self.readout(z)


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
    **forward_kwargs: Any,
) -> tuple[float, torch.Tensor]:
    """Accuracy of the chain on uint8 images (N, C, H, W); labels only score, never feed, the chain.

    ``normalize(uint8 batch) -> float batch``. The chain runs on ``device`` (None: :func:`default_device`) and
    is moved back where it was;
    its noise comes from a CPU generator seeded with ``seed``, so the draws do not depend on the device.
    forward_kwargs go to ``chain.predict`` (a NoProp chain's ``sampler``, ``draws``, ``steps``).
    Returns (accuracy in [0, 1], predictions (N,) on the CPU).
    """
    acc, preds, _ = evaluate_stages(chain, images, labels, batch_size, seed, normalize, device, stages=False,
                                    **forward_kwargs)
    return acc, preds


@dataclasses.dataclass
class StageCounts:
    """Exact counts of a chain's evaluation on some images, to be summed over parts of a split: ``n`` images,
    ``correct`` right with the sampler asked for, and per stage [right with the chain stopped there, right by
    the stage's own prediction (NaN: the stage has none, FM)]."""

    n: int = 0
    correct: int = 0
    stages: list[list[float]] = dataclasses.field(default_factory=list)

    def __add__(self, other: "StageCounts") -> "StageCounts":
        if self.stages and other.stages and len(self.stages) != len(other.stages):
            raise ValueError(f"counts of {len(self.stages)} and {len(other.stages)} stages cannot be added")
        stages = ([[a + b for a, b in zip(x, y, strict=True)] for x, y in zip(self.stages, other.stages, strict=True)]
                  if self.stages and other.stages else self.stages or other.stages)
        return StageCounts(self.n + other.n, self.correct + other.correct, stages)

    def accuracy(self) -> float:
        # a count over n, not a float32 mean: that turns 9,000 of 10,000 into 0.89999998, short of a 0.90 target
        return self.correct / self.n

    def table(self) -> list[dict[str, float | None]]:
        """[{"chain_accuracy", "own_accuracy" (None for FM)}] per stage."""
        return [{"chain_accuracy": c / self.n, "own_accuracy": None if math.isnan(o) else o / self.n}
                for c, o in self.stages]


# Images per forward pass on a CPU of a sampler whose only noise is z_0 (count_stages): the batch's z_0 is drawn
# whole, so eval.batch_size keeps its meaning for the noise, while the networks run on pieces that stay in the
# CPU's caches: faster than the whole batch, and the same logits bit for bit. A GPU takes the batch whole:
# there a forward pass costs its kernel launches.
EVAL_PIECE_CPU = 32


def batch_parts(num_images: int, batch_size: int, parts: int) -> list[range]:
    """Split the evaluation batches of ``num_images`` into at most ``parts`` contiguous ranges of batch indices
    of near-equal size (none empty), for :func:`count_stages` to score in parallel."""
    batches = math.ceil(num_images / batch_size)
    parts = max(1, min(parts, batches))
    edges = [round(i * batches / parts) for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(edges, edges[1:]) if b > a]


@torch.no_grad()
def count_stages(
    chain: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    seed: int,
    normalize: Any,
    device: torch.device | str | None = None,
    stages: bool = True,
    batches: range | None = None,
    keep_predictions: bool = False,
    **forward_kwargs: Any,
) -> tuple[StageCounts, list[torch.Tensor]]:
    """Score the chain on the evaluation batches ``batches`` (indices of batches of ``batch_size``; None: all)
    of uint8 ``images`` (N, C, H, W) with ``labels`` (N,): the counts :func:`evaluate_stages` divides, and
    with ``keep_predictions`` the predictions (one (b,) tensor per batch, on the CPU).

    The noise comes from one CPU generator seeded with ``seed`` and drawn batch after batch, so a part gives
    the counts the whole run gives on its images only if the draws before it are replayed: for the samplers
    whose only noise is z_0 (:data:`Z0_ONLY_SAMPLERS`) the batches before ``batches`` draw their z_0 and skip
    the networks; any other sampler refuses a part that does not start at batch 0 (ValueError)."""
    chain.eval()
    device = default_device() if device is None else torch.device(device)
    total = math.ceil(images.shape[0] / batch_size)
    batches = range(total) if batches is None else batches
    if batches.start > 0 and chain.sampler_name(forward_kwargs.get("sampler")) not in Z0_ONLY_SAMPLERS:
        raise ValueError(f"sampler {chain.sampler_name(forward_kwargs.get('sampler'))!r} draws noise at every step: "
                         "its evaluation cannot start part-way through the batches")
    home = next(chain.parameters()).device
    chain.to(device)
    counts, preds = StageCounts(), []
    embed_dim = int(chain.shared.embed.shape[1])
    z0_only = chain.sampler_name(forward_kwargs.get("sampler")) in Z0_ONLY_SAMPLERS
    try:
        gen = torch.Generator().manual_seed(seed)
        for b in range(batches.start):  # the z_0 of the batches before this part (start_noise's draw)
            rows = min(batch_size, images.shape[0] - b * batch_size)
            torch.randn((rows, embed_dim), generator=gen)
        for b in batches:
            x = normalize(images[b * batch_size : (b + 1) * batch_size].to(device))
            y = labels[b * batch_size : (b + 1) * batch_size]
            counts.n += int(y.shape[0])
            piece = EVAL_PIECE_CPU if device.type == "cpu" else x.shape[0]
            if z0_only:
                # The batch's z_0 as the chain would draw it, then the networks on pieces of it (EVAL_PIECE_CPU).
                z0 = torch.randn((x.shape[0], embed_dim), generator=gen)
                pieces = [(x[i : i + piece], y[i : i + piece], z0[i : i + piece]) for i in range(0, x.shape[0], piece)]
            else:  # noise at every step, drawn for the whole batch: the batch goes whole
                pieces = [(x, y, None)]
            for xp, yp, zp in pieces:
                if not stages:
                    pred = chain.predict(xp, gen, z0=zp, **forward_kwargs).cpu()
                else:
                    trace: list[StageTrace] = []
                    pred = chain(xp, gen, trace=trace, z0=zp, **forward_kwargs).argmax(dim=1).cpu()
                    if not counts.stages:
                        counts.stages = [[0.0, 0.0] for _ in trace]
                    for right, (readout, own) in zip(counts.stages, trace, strict=True):
                        right[0] += float((readout.argmax(dim=1).cpu() == yp).sum())
                        right[1] = (float("nan") if own is None
                                    else right[1] + float((own.argmax(dim=1).cpu() == yp).sum()))
                counts.correct += int((pred == yp).sum())
                if keep_predictions:
                    preds.append(pred)
    finally:
        chain.to(home)
    return counts, preds


@torch.no_grad()
def evaluate_stages(
    chain: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    seed: int,
    normalize: Any,
    device: torch.device | str | None = None,
    stages: bool = True,
    **forward_kwargs: Any,
) -> tuple[float, torch.Tensor, list[dict[str, float | None]]]:
    """:func:`evaluate_chain` (same predictions for the same seed) plus, with ``stages``, one entry per stage
    of a NoProp chain (DT block, CT / FM shard): ``{"chain_accuracy": accuracy of the chain stopped after the
    stage, read out at its z; "own_accuracy": the stage's network's own prediction, None for FM}``.
    Returns (accuracy, predictions (N,), stage entries: [] without ``stages``)."""
    counts, preds = count_stages(chain, images, labels, batch_size, seed, normalize, device, stages,
                                 keep_predictions=True, **forward_kwargs)
    return counts.accuracy(), torch.cat(preds), counts.table()

"""Scoring a chain on a split: accuracy, predictions and the accuracy after each stage (DT block, CT / FM shard),
as exact counts that parts of a split, scored apart (by several workers: distributed.evaluator), sum to
(:class:`StageCounts`, :func:`batch_parts`, :func:`count_stages`); :func:`evaluate_chain` and
:func:`evaluate_stages` score a whole split in one process.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from .blocks import evaluation_pooling
from .samplers import Z0_ONLY_SAMPLERS, StageTrace


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
@evaluation_pooling()  # the chain's max pools take the CPU's faster kernel (core.blocks.MaxPool)
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

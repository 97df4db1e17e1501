"""NoProp-DT losses: the per-block denoising term and the shared CE + KL terms (NOPROP.md).

A block's total loss is ``block_loss + shared_loss``: the first reaches the block and W_embed, the
second only the shared state (W_embed, head). Nothing here runs another block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ModelSpec
from .schedule import DTSchedule, sample_marginal
from .shared import SharedState


def denoised_estimate(logits: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """u_hat = softmax(logits) @ W_embed: a convex combination of class embeddings. (B, m), (m, d) -> (B, d)."""
    return torch.softmax(logits, dim=1) @ embed


def class_logits(shared: SharedState, z: torch.Tensor, class_prob: str, radial_sigma: float) -> torch.Tensor:
    """Unnormalised class scores from z_T: (B, d) -> (B, m). Feed them to ONE log-softmax / cross-entropy.

    softmax (Eq. 14): ``f_out(z)``.
    radial (Eq. 15-16): ``-||softmax(f_out(z)) @ W_embed - u_c||^2 / (2 sigma^2)`` for each class c.
    """
    logits = shared.head(z)
    if class_prob == "softmax":
        return logits
    if class_prob == "radial":
        y_hat = denoised_estimate(logits, shared.embed)
        return -torch.cdist(y_hat, shared.embed).pow(2) / (2 * radial_sigma**2)
    raise ValueError(f"unknown class_prob {class_prob!r}; allowed: softmax, radial")


def block_loss(
    block: nn.Module,
    shared: SharedState,
    schedule: DTSchedule,
    t: int,
    x: torch.Tensor,
    y: torch.Tensor,
    eta: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``eta * T/2 * (SNR(t) - SNR(t-1)) * mean_i ||u_hat_t(z_{t-1}, x_i) - u_{y_i}||^2`` for block t in 1..T.

    x: (B, C, H, W), y: (B,) int64. z_{t-1} is drawn from q(z_{t-1} | y): block t trains at exactly the noise
    level it meets at inference (pitfall 1).
    """
    embed = shared.embed
    u_y = embed[y]
    z_prev = sample_marginal(u_y, schedule.abar_values[t - 1], generator)
    u_hat = denoised_estimate(block(z_prev, x), embed)
    weight = eta * schedule.num_blocks / 2 * schedule.loss_weight(t)
    return weight * (u_hat - u_y).pow(2).sum(dim=1).mean()


def shared_loss(
    shared: SharedState,
    schedule: DTSchedule,
    y: torch.Tensor,
    class_prob: str,
    radial_sigma: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``-log p_out(y | z_T)`` with z_T ~ q(z_T | y), plus ``KL(q(z_0|y) || N(0, I)) = 0.5 abar_0 ||u_y||^2``
    (the constant of the KL dropped). Batch mean; touches only W_embed and the head."""
    u_y = shared.embed[y]
    z_T = sample_marginal(u_y, schedule.abar_values[-1], generator)
    ce = F.cross_entropy(class_logits(shared, z_T, class_prob, radial_sigma), y)
    kl = 0.5 * schedule.abar_values[0] * u_y.pow(2).sum(dim=1).mean()
    return ce + kl


def shard_loss(
    block: nn.Module,
    shared: SharedState,
    spec: ModelSpec,
    schedule: DTSchedule,
    t: int,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, denoising part) of block t's loss: the paper's L_t (Algorithm 1)."""
    denoise = block_loss(block, shared, schedule, t, x, y, spec.eta, generator)
    total = denoise + shared_loss(shared, schedule, y, spec.class_prob, spec.radial_sigma, generator)
    return total, denoise

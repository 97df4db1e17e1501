"""The shard losses, one per method and all of one signature (registry.METHODS names each method's):

    shard_loss(net, shared, spec, k, x (B, C, H, W), y (B,) int64, generator) -> (total, denoising part)

for shard k in 1..K (NoProp-DT's block t = k in 1..T). A shard's loss reaches its own network and the shared
state (W_embed, head, CT's schedule) and runs no other shard (NOPROP.md, "NoProp-DT", "NoProp-CT",
"NoProp-FM"). They draw z_t from the paths of core.paths; a CT / FM shard draws its times only inside its
interval of the partition (core.paths.sample_times), so it trains at the times at which the chain runs it.

Scale: each is the estimate of the paper's whole loss from its shard's part: NoProp-DT's block loss carries the
factor T, and a CT / FM shard's ``E_{t ~ U(I_k)}[...]`` has no 1/K factor, so K = 1 is the paper's loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CT_LOSS_WEIGHTS
from .blocks import ModelSpec
from .paths import (
    class_logits,
    ct_marginal,
    denoised_estimate,
    fm_field,
    fm_path,
    randn_like,
    sample_marginal,
    sample_times,
)
from .schedules import DTSchedule, LearnedSchedule
from .shared import SharedState


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


def dt_shard_loss(
    net: nn.Module, shared: SharedState, spec: ModelSpec, k: int, x: torch.Tensor, y: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, denoising part) of NoProp-DT block t = k's loss: the paper's L_t (Algorithm 1), on the cosine
    schedule of spec.num_shards blocks. x: (B, C, H, W), y: (B,) int64."""
    schedule = DTSchedule.cosine(spec.num_shards, spec.abar_max)
    denoise = block_loss(net, shared, schedule, k, x, y, spec.eta, generator)
    total = denoise + shared_loss(shared, schedule, y, spec.class_prob, spec.radial_sigma, generator)
    return total, denoise


def ct_loss_weight(spec: ModelSpec, schedule: LearnedSchedule, t: torch.Tensor) -> torch.Tensor:
    """w(t) of NoProp-CT's denoising term ``eta/2 w(t) ||u_hat - u_y||^2`` (``spec.ct_loss_weight``): (B,) -> (B,).

    - ``snr_prime``: SNR'(t), the paper's (the ELBO). It grows like exp(lambda): with lambda over [-5, 5] it
      spans a factor of about 2e4 across [0, 1], so the clean end, where z_t alone gives the label away,
      dominates the loss and mid-noise times, where the image must decide, get almost no weight.
    - ``sigmoid``: lambda'(t) sigmoid(lambda(t)) = SNR'(t) / (1 + SNR(t)) = -gamma'(t) abar(t), Kingma & Gao
      (2023)'s sigmoid weighting (bias 0) of the ELBO: the same weight at the noisy end, bounded by lambda' at
      the clean end. Like the ELBO it is an integral over lambda (``int sigmoid(lambda) ||.||^2 dlambda``), so
      it depends on the schedule only through its endpoints, which the loss still trains.
    - ``flat``: lambda'(t) = -gamma'(t), the same weight for every log-SNR level (``int ||.||^2 dlambda``).
    """
    if spec.ct_loss_weight == "snr_prime":
        return schedule.snr_prime(t)
    if spec.ct_loss_weight == "sigmoid":
        return -schedule.gamma_prime(t) * schedule.abar(t)
    if spec.ct_loss_weight == "flat":
        return -schedule.gamma_prime(t)
    raise ValueError(f"unknown ct_loss_weight {spec.ct_loss_weight!r}; allowed: {', '.join(CT_LOSS_WEIGHTS)}")


def ct_shard_loss(
    net: nn.Module, shared: SharedState, spec: ModelSpec, k: int, x: torch.Tensor, y: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, denoise) of NoProp-CT shard k. x: (B, C, H, W), y: (B,) int64.

    ``denoise = eta/2 * mean_i w(t_i) ||u_hat(z_t, x, t) - u_y||^2`` with t ~ U(I_k), z_t ~ q(z_t | y) and w
    from :func:`ct_loss_weight` (the paper's: SNR'(t));
    ``total = denoise + CE(-log p_out(y | z_1), z_1 ~ q(z_1 | y)) + 0.5 abar(0) mean ||u_y||^2`` (KL at t = 0).
    Every abar and weight comes from the learned schedule and stays differentiable: the loss trains it.
    """
    sched = shared.schedule
    embed = shared.embed
    u_y = embed[y]
    t = sample_times(spec, k, y.shape[0], generator, y.device, shared)
    z_t = ct_marginal(u_y, sched.abar(t), randn_like(u_y, generator))
    u_hat = denoised_estimate(net(z_t, x, t), embed)
    denoise = spec.eta / 2 * (ct_loss_weight(spec, sched, t) * (u_hat - u_y).pow(2).sum(dim=1)).mean()
    ends = torch.arange(2, dtype=torch.float32, device=y.device)  # t = 0 and 1, made on the device
    abar_0, abar_1 = sched.abar(ends).unbind()
    z_1 = ct_marginal(u_y, abar_1.expand(y.shape[0]), randn_like(u_y, generator))
    # class_logits gives unnormalised scores; ONE cross_entropy applies the only softmax (pitfall 5).
    ce = F.cross_entropy(class_logits(shared, z_1, spec.class_prob, spec.radial_sigma), y)
    kl = 0.5 * abar_0 * u_y.pow(2).sum(dim=1).mean()
    return denoise + ce + kl, denoise


def fm_shard_loss(
    net: nn.Module, shared: SharedState, spec: ModelSpec, k: int, x: torch.Tensor, y: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, denoise) of NoProp-FM shard k. x: (B, C, H, W), y: (B,) int64.

    ``denoise = mean_i ||v(z_t, x, t) - (z_1 - z_0)||^2`` with z_0 ~ N(0, I), z_1 = u_y, t ~ U(I_k)
    (spec.fm_target velocity); endpoint: ``mean_i ||z1_hat - z_1||^2``, which is the same error times
    (1 - t)^2: the velocity loss would weight the last steps without bound.
    No eta: NOPROP.md states the FM loss without it and the paper's FM runs use eta = 1; eta balances the
    ELBO's denoising term against its CE / KL terms, and FM has no ELBO. Scaling by a DT-style eta = 0.1
    would silently weaken the flow against the anchor.
    Learnable embeddings (learned, prototype) add the anchor ``-log p_out(y | z1_hat)``,
    ``z1_hat = z_t + (1 - t) v``, which keeps the embeddings from collapsing; one_hot is fixed: total == denoise.
    """
    embed = shared.embed
    z_1 = embed[y]
    t = sample_times(spec, k, y.shape[0], generator, y.device, shared)
    z_0 = randn_like(z_1, generator)
    z_t, target = fm_path(z_0, z_1, t)
    v, z1_hat = fm_field(net(z_t, x, t), embed, z_t, t, spec.fm_target)
    if spec.fm_target == "endpoint":
        denoise = (z1_hat - z_1).pow(2).sum(dim=1).mean()
    else:
        denoise = (v - target).pow(2).sum(dim=1).mean()
    if spec.embedding == "one_hot":
        return denoise, denoise
    anchor = F.cross_entropy(class_logits(shared, z1_hat, spec.class_prob, spec.radial_sigma), y)
    return denoise + anchor, denoise

"""The paths: what each method's z_t is between noise (t = 0) and the label (t = 1), and how its shards split
the time (NOPROP.md, "NoProp-DT", "NoProp-CT", "NoProp-FM"). The losses (core.losses) train on these paths and
the samplers (core.samplers) follow them.

- The noise all of them draw (:func:`randn_like`).
- The marginals q(z_t | y) of the variance-preserving process of a schedule (core.schedules): NoProp-DT's at a
  block's abar_t (:func:`sample_marginal`), NoProp-CT's at times t (:func:`ct_marginal`); NoProp-FM's linear
  path and its velocity (:func:`fm_path`).
- What a network's class logits stand for on the path: the denoised estimate u_hat (:func:`denoised_estimate`),
  NoProp-FM's velocity and endpoint (:func:`fm_field`), and the class scores read out at the clean end
  (:func:`class_logits`).
- The time partition of NoProp-CT / FM's K shards (core.partition's closed forms mapped to times:
  :func:`shard_bounds`), the interval each shard trains on (:func:`shard_interval`, :func:`sample_times`) and
  the shard each inference step runs (:func:`step_shards`).
"""
from __future__ import annotations

import bisect
import functools
import math

import torch

from ..registry import get_method
from .blocks import ModelSpec
from .partition import log_snr_levels, widen
from .shared import SharedState


def randn_like(z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise of z's shape and dtype, on z's device, drawn where ``generator`` lives.

    A CPU generator (evaluation's seeded one) then gives the same draws whatever the device of the data;
    torch refuses to draw on a GPU from a CPU generator.
    """
    where = generator.device if generator is not None else z.device
    return torch.randn(z.shape, generator=generator, dtype=z.dtype, device=where).to(z.device)


def sample_marginal(u_y: torch.Tensor, abar_t: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """z_t ~ q(z_t | y) = N(sqrt(abar_t) u_y, (1 - abar_t) I). u_y: (B, d) -> (B, d).

    Note the square root on abar (pitfall 6 of NOPROP.md).
    """
    return math.sqrt(abar_t) * u_y + math.sqrt(1.0 - abar_t) * randn_like(u_y, generator)


def ct_marginal(u_y: torch.Tensor, abar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(abar(t)) u_y + sqrt(1 - abar(t)) eps (pitfall 6: the square roots). (B, d), (B,), (B, d) -> (B, d)."""
    return abar.sqrt()[:, None] * u_y + (1 - abar).sqrt()[:, None] * noise


def fm_path(z_0: torch.Tensor, z_1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation path and its velocity: (z_t = t z_1 + (1 - t) z_0, target z_1 - z_0), both (B, d)."""
    tt = t[:, None]
    return tt * z_1 + (1 - tt) * z_0, z_1 - z_0


def denoised_estimate(logits: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """u_hat = softmax(logits) @ W_embed: a convex combination of class embeddings. (B, m), (m, d) -> (B, d)."""
    return torch.softmax(logits, dim=1) @ embed


def fm_field(
    logits: torch.Tensor, embed: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, target: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, z1_hat), both (B, d): the velocity at (z_t, t) and the endpoint it points at, z1_hat = z_t + (1 - t) v.

    logits: (B, m) the network's output, embed: (m, d) W_embed, z_t: (B, d), t: (B,) in [0, 1).
    target velocity (the paper's): v = logits @ W_embed, any direction in embedding space.
    target endpoint: z1_hat = softmax(logits) @ W_embed, a convex combination of class embeddings, as
    NoProp-DT's and CT's denoised estimate; v = (z1_hat - z_t) / (1 - t). The velocity network must learn
    the -z_t / (1 - t) part of the field itself, which grows without bound towards t = 1; the endpoint form
    gives it exactly, so the network only has to name the class.
    """
    tt = t[:, None]
    if target == "endpoint":
        z1_hat = denoised_estimate(logits, embed)
        return (z1_hat - z_t) / (1 - tt), z1_hat
    v = logits @ embed
    return v, z_t + (1 - tt) * v


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


# NoProp-FM's log-SNR 2 logit(t) is infinite at t = 0 and 1; the log_snr partition takes equal steps over the
# range of NoProp-CT's initial schedule, lambda in [-5, 5] (schedules.G0_INIT, G1_INIT).
FM_LOG_SNR_RANGE = (-5.0, 5.0)
CT_BOUNDS_GRID = 1024  # times at which the learned schedule is evaluated to invert it


def shard_bounds(spec: ModelSpec, shared: SharedState | None = None) -> torch.Tensor:
    """The K + 1 boundaries 0 = b_0 < ... < b_K = 1 of ``spec.shard_partition`` (core.partition): (K + 1,)
    float64 on the shared state's device, no gradient.

    Non-uniform partitions place the boundaries at log-SNR levels of the method's process: NoProp-FM's path
    ``z_t = t u_y + (1 - t) z_0`` has lambda(t) = 2 logit(t), inverted in closed form; NoProp-CT's is the learned
    schedule's -gamma(t), so its boundaries follow the schedule as it trains (``shared`` is needed), inverted
    by interpolation on a grid of CT_BOUNDS_GRID + 1 times. FM's lambda is infinite at both ends: ``log_snr``
    takes equal steps over FM_LOG_SNR_RANGE.
    """
    k = spec.num_shards
    device = shared.embed.device if shared is not None else torch.device("cpu")
    if spec.shard_partition == "uniform" or k == 1:
        return torch.arange(k + 1, dtype=torch.float64, device=device) / k
    if not get_method(spec.method).learned_schedule:  # NoProp-FM's fixed path
        return _fm_bounds(spec.shard_partition, k, str(device))
    if shared is None or not hasattr(shared, "schedule"):
        raise ValueError("NoProp-CT's non-uniform shard partition needs the shared state's schedule")
    with torch.no_grad():
        grid = torch.linspace(0.0, 1.0, CT_BOUNDS_GRID + 1, dtype=torch.float64, device=device)
        lam = -shared.schedule.gamma(grid)  # strictly increasing
        levels = log_snr_levels(spec.shard_partition, k, lam[0], lam[-1])
        i = torch.searchsorted(lam, levels).clamp(1, CT_BOUNDS_GRID)
        w = ((levels - lam[i - 1]) / (lam[i] - lam[i - 1])).clamp(0.0, 1.0)
        bounds = grid[i - 1] + w * (grid[i] - grid[i - 1])
        return _pin_ends(bounds)


@functools.lru_cache(maxsize=16)
def _fm_bounds(partition: str, k: int, device: str) -> torch.Tensor:
    """NoProp-FM's boundaries: a closed form of (partition, K), computed once per device (a training step asks
    for them every time). (K + 1,) float64; callers must not write into it (it is shared)."""
    lo, hi = FM_LOG_SNR_RANGE if partition == "log_snr" else (-math.inf, math.inf)
    levels = log_snr_levels(partition, k, torch.tensor(lo, dtype=torch.float64, device=device),
                            torch.tensor(hi, dtype=torch.float64, device=device))
    return _pin_ends(torch.sigmoid(levels / 2))


def _pin_ends(bounds: torch.Tensor) -> torch.Tensor:
    """The partition's ends exactly 0 and 1, filled on the device (assigning Python floats would copy them from
    the host, every step for CT, whose boundaries follow its learned schedule)."""
    bounds[0].zero_()
    bounds[-1].fill_(1.0)
    return bounds


def _training_interval(
    spec: ModelSpec, k: int, shared: SharedState | None, device: torch.device | str = "cpu",
) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """(lo, hi) of the times shard k in 1..K trains on: its partition interval widened by spec.shard_overlap.
    Python floats for the uniform partition without overlap (exact k/K); 0-d tensors on the device otherwise,
    never read back (no host sync in a training step)."""
    if not 1 <= k <= spec.num_shards:
        raise ValueError(f"shard {k} outside 1..{spec.num_shards}")
    if spec.shard_partition == "uniform" and spec.shard_overlap == 0:
        return (k - 1) / spec.num_shards, k / spec.num_shards
    lo, hi = widen(shard_bounds(spec, shared), k, spec.shard_overlap)
    return lo.to(device=device, dtype=torch.float32), hi.to(device=device, dtype=torch.float32)


def shard_interval(spec: ModelSpec, k: int, shared: SharedState | None = None) -> tuple[float, float]:
    """(t_lo, t_hi) of the times shard k in 1..K trains on, as floats: ((k-1)/K, k/K) for the uniform partition
    without overlap."""
    lo, hi = _training_interval(spec, k, shared)
    return float(lo), float(hi)


def sample_times(
    spec: ModelSpec, k: int, batch: int, generator: torch.Generator | None = None,
    device: torch.device | str = "cpu", shared: SharedState | None = None,
) -> torch.Tensor:
    """t ~ U(t_lo, t_hi) of shard k's training interval, one per sample: (batch,) float32."""
    # Drawn where the generator lives (as randn_like does), then moved.
    u = torch.rand(batch, generator=generator, device=generator.device if generator is not None else device)
    lo, hi = _training_interval(spec, k, shared, u.device)
    return (lo + (hi - lo) * u).to(device)


def step_shards(steps: int, num_shards: int, bounds: list[float] | None = None) -> list[int]:
    """0-based shard used by each step n = 0..N-1: the one whose interval contains the start time t_n = n/N
    (at a boundary, the interval that starts there; t = 1 is never a start time, so the last interval is
    closed). bounds: the partition's K + 1 boundaries (None: uniform, in integer arithmetic, floor(n K / N),
    free of rounding at the boundaries)."""
    if bounds is None:
        return [min(n * num_shards // steps, num_shards - 1) for n in range(steps)]
    inner = bounds[1:-1]
    return [min(bisect.bisect_right(inner, n / steps), num_shards - 1) for n in range(steps)]

"""Time-shard partitions of NoProp-CT / FM: where the boundaries between the K shards' time intervals lie.

A partition is K + 1 times ``0 = b_0 < b_1 < ... < b_K = 1``; shard k owns [b_{k-1}, b_k]. Three kinds
(``model.shard_partition``, config.SHARD_PARTITIONS):

- ``uniform``: b_k = k / K, equal spans of t.
- ``log_snr``: equal spans of log-SNR lambda(t) = log(abar / (1 - abar)) between the ends of the process, so every
  shard covers the same range of noise levels however unevenly the schedule moves through them.
- ``equal_mass``: equal probability under a distribution of noise levels, as DiffusionBlocks (Shing et al. 2025)
  partitions its blocks: EDM's ``ln sigma ~ N(-1.2, 1.2^2)`` (Karras et al. 2022), which with
  ``sigma^2 = 1 / SNR`` is ``lambda ~ N(2.4, 2.4^2)``, truncated to the process's range.

This module holds the closed forms on log-SNR levels; ``paths.shard_bounds`` maps them to times through the
method's lambda(t). Pure torch, float64.
"""
from __future__ import annotations

import torch

EDM_LOG_SIGMA_MEAN, EDM_LOG_SIGMA_STD = -1.2, 1.2
# lambda = -2 ln sigma
EQUAL_MASS_MEAN, EQUAL_MASS_STD = -2 * EDM_LOG_SIGMA_MEAN, 2 * EDM_LOG_SIGMA_STD


def log_snr_levels(partition: str, num_shards: int, lam_lo: torch.Tensor, lam_hi: torch.Tensor) -> torch.Tensor:
    """K + 1 increasing log-SNR levels from lam_lo to lam_hi (0-d float64 tensors; +-inf allowed for
    equal_mass, whose distribution has full support): equal steps (log_snr) or equal mass of
    N(EQUAL_MASS_MEAN, EQUAL_MASS_STD^2) between consecutive levels (equal_mass). Returns (K + 1,) float64."""
    frac = torch.arange(num_shards + 1, dtype=torch.float64, device=lam_lo.device) / num_shards
    if partition == "log_snr":
        # a finite range is the caller's to give (FM's fixed one, CT's learned endpoints): checking it here would
        # read two values back from the device in every training step
        return lam_lo + frac * (lam_hi - lam_lo)
    if partition == "equal_mass":
        mu, s = EQUAL_MASS_MEAN, EQUAL_MASS_STD
        c_lo, c_hi = torch.special.ndtr((lam_lo - mu) / s), torch.special.ndtr((lam_hi - mu) / s)
        levels = mu + s * torch.special.ndtri(c_lo + frac * (c_hi - c_lo))
        # the ends are the range's own (ndtri of a rounded CDF would miss them slightly)
        levels[0], levels[-1] = lam_lo, lam_hi
        return levels
    raise ValueError(f"log_snr_levels: not a log-SNR partition: {partition!r}")


def widen(bounds: torch.Tensor, k: int, overlap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard k's (1..K) training interval: [b_{k-1}, b_k] widened on each side by ``overlap`` times its span,
    clipped to [0, 1]. bounds: (K + 1,) -> (lo, hi) 0-d tensors. Inference still switches at the b_k."""
    lo, hi = bounds[k - 1], bounds[k]
    pad = overlap * (hi - lo)
    return (lo - pad).clamp_min(0.0), (hi + pad).clamp_max(1.0)

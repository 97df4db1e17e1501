"""NoProp-DT noise schedule and the coefficients derived from it (NOPROP.md, "NoProp-DT").

Time runs from NOISE to CLEAN: ``abar[0] ~ 0`` (z_0 is pure noise) and ``abar[T] ~ 1`` (z_T is close to
the clean label embedding). ``q(z_t | y) = N(sqrt(abar_t) u_y, (1 - abar_t) I)``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


def cosine_abar(num_blocks: int, abar_max: float = 0.999, offset: float = 0.008) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021) with time reversed so that t = 0 is noise.

    With noise-time ``tau = 1 - t/T``: ``abar(tau) = cos^2((tau + s)/(1 + s) * pi/2) / cos^2(s/(1 + s) * pi/2)``.
    That gives ``abar_0 = 0`` (exactly noise) and ``abar_T = 1``, where ``SNR(T)`` is infinite, so the
    schedule is capped at ``abar_max``: the last loss weight ``SNR(T) - SNR(T-1)`` is then finite
    (about 964 for T = 10 with abar_max = 0.999, against 0.025 for block 1). A block's own AdamW
    is blind to that scale; the weights matter where blocks meet: in the shared embedding's
    gradient, where the last blocks dominate, as in the paper. Returns float64, shape (T + 1,).
    """
    t = torch.arange(num_blocks + 1, dtype=torch.float64)
    tau = 1.0 - t / num_blocks
    f = torch.cos((tau + offset) / (1 + offset) * math.pi / 2) ** 2
    abar = (f / math.cos(offset / (1 + offset) * math.pi / 2) ** 2).clamp(0.0, abar_max)
    if not bool((abar[1:] > abar[:-1]).all()):
        raise ValueError(
            f"abar_max={abar_max} makes the schedule non-increasing for T={num_blocks}: {abar.tolist()}"
        )
    return abar


@dataclass(frozen=True)
class DTSchedule:
    """All per-step quantities of NoProp-DT, precomputed in float64 (shapes (T + 1,) or (T,))."""

    abar: torch.Tensor  # (T + 1,) abar_0 .. abar_T, strictly increasing

    @classmethod
    def cosine(cls, num_blocks: int, abar_max: float = 0.999) -> "DTSchedule":
        return cls(cosine_abar(num_blocks, abar_max))

    @property
    def num_blocks(self) -> int:
        return self.abar.numel() - 1

    @functools.cached_property
    def abar_values(self) -> tuple[float, ...]:
        """abar_0 .. abar_T as Python floats: a loss reads them every step without touching a tensor."""
        return tuple(self.abar.tolist())

    @functools.cached_property
    def loss_weights(self) -> tuple[float, ...]:
        """SNR(t) - SNR(t-1) for t = 1..T (entry t-1), as Python floats."""
        s = self.snr
        return tuple((s[1:] - s[:-1]).tolist())

    @property
    def snr(self) -> torch.Tensor:
        """(T + 1,) SNR(t) = abar_t / (1 - abar_t), increasing."""
        return self.abar / (1.0 - self.abar)

    @property
    def alpha(self) -> torch.Tensor:
        """(T,) alpha_{t-1} = abar_{t-1} / abar_t for t = 1..T (entry t-1)."""
        return self.abar[:-1] / self.abar[1:]

    def loss_weight(self, t: int) -> float:
        """SNR(t) - SNR(t-1) for block t in 1..T; strictly positive because abar is increasing."""
        return self.loss_weights[t - 1]

    def posterior_coefficients(self, t: int) -> tuple[float, float, float]:
        """(a_t, b_t, c_t) of Eq. 3 for block t in 1..T.

        ``q(z_t | z_{t-1}, y) = N(a_t u_y + b_t z_{t-1}, c_t I)``; at inference u_y is replaced by the
        block's prediction.
        """
        ab_t, ab_prev = float(self.abar[t]), float(self.abar[t - 1])
        alpha_prev = ab_prev / ab_t
        a = math.sqrt(ab_t) * (1 - alpha_prev) / (1 - ab_prev)
        b = math.sqrt(alpha_prev) * (1 - ab_t) / (1 - ab_prev)
        c = (1 - ab_t) * (1 - alpha_prev) / (1 - ab_prev)
        return a, b, c


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

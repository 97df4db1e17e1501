"""The noise schedules: NoProp-DT's fixed cosine schedule and NoProp-CT's learned one (NOPROP.md, "NoProp-DT",
"NoProp-CT"), and the coefficients of Eq. 3 derived from them.

Time runs from NOISE to CLEAN, as everywhere in this project (NOPROP.md, "Notation"): ``abar ~ 0`` at the start
(z_0 is pure noise) and ``abar ~ 1`` at the end (z close to the clean label embedding);
``q(z_t | y) = N(sqrt(abar_t) u_y, (1 - abar_t) I)`` (core.paths draws from it).

NoProp-DT: abar_0 .. abar_T on the T blocks (:func:`cosine_abar`, :class:`DTSchedule`).

NoProp-CT (Kingma et al. 2021, "Variational Diffusion Models"), :class:`LearnedSchedule`:

    gamma(t) = g0 + (g1 - g0) * (1 - gtilde(t)),   abar(t) = sigmoid(-gamma(t)),   SNR(t) = exp(-gamma(t)),

with ``gtilde`` a monotone increasing network normalised to ``gtilde(0) = 0, gtilde(1) = 1``, so
``gamma(0) = g1`` (noise end), ``gamma(1) = g0`` (clean end), gamma strictly decreasing, abar and SNR
strictly increasing. Monotonicity and ``g0 < g1`` hold by construction (positive weights, increasing
activations, ``g1 = g0 + MIN_GAMMA_RANGE + softplus(delta)``), whatever values an optimiser gives the raw parameters.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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
    @functools.lru_cache(maxsize=32)
    def cosine(cls, num_blocks: int, abar_max: float = 0.999) -> "DTSchedule":
        """The cosine schedule of T blocks, built once per (T, abar_max): every shard loss step asks for it (it is
        never written to, so sharing it is safe)."""
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


def ct_chain_coefficients(abar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, c) of Eq. 3 for the steps between consecutive entries of abar (N + 1,) -> each (N,): NoProp-CT's
    :meth:`DTSchedule.posterior_coefficients` on a grid of its learned schedule.

    ``q(z_{n+1} | z_n, y) = N(a_n u_y + b_n z_n, c_n I)``; float64; c clamped at 0 against rounding.
    """
    ab_prev, ab_next = abar[:-1].double(), abar[1:].double()
    alpha = ab_prev / ab_next
    a = ab_next.sqrt() * (1 - alpha) / (1 - ab_prev)
    b = alpha.sqrt() * (1 - ab_next) / (1 - ab_prev)
    c = ((1 - ab_next) * (1 - alpha) / (1 - ab_prev)).clamp_min(0.0)
    return a, b, c


# Initial endpoints: gamma(1) = g0 = -5 gives abar(1) = sigmoid(5) = 0.9933 and gamma(0) = g1 = +5 gives
# abar(0) = sigmoid(-5) = 0.0067: close to clean and to pure noise, with finite SNR at both ends; symmetric, so
# abar(1/2) = 1/2 (gtilde starts close to linear: log-SNR roughly linear in t). Why not +-7 (the DT cap
# abar_max = 0.999): with log-SNR linear in t the loss weight SNR'(t) spreads by a factor exp((g1 - g0)/K) inside
# one shard's interval (e^14 = 1.2e6 for K = 1 at +-7, e^10 = 2.2e4 at +-5). The weight is largest at the clean
# end, where z_t alone gives the label away, and smallest at mid noise, where the image must decide the class;
# the wider range starves that region (docs/continuous_time.md, "The learned schedule's initial endpoints",
# has the measurement). The CE at t = 1 then pushes g0 down (a cleaner z_1), the KL at t = 0 pushes g1 up,
# the denoising term pulls both in.
G0_INIT = -5.0
G1_INIT = 5.0
# g1 - g0 >= MIN_GAMMA_RANGE: softplus(delta) alone underflows (or vanishes next to g0) for very negative delta,
# which would make g0 == g1 in floating point; a log-SNR range below one nat would be a useless process anyway.
MIN_GAMMA_RANGE = 1.0


def _inv_softplus(y: float) -> float:
    """x with softplus(x) = y (y > 0)."""
    return y + math.log(-math.expm1(-y))


class LearnedSchedule(nn.Module):
    """gamma(t) of NoProp-CT; every method takes t as a float tensor (B,) and returns (B,).

    gtilde comes from a monotone network in the spirit of VDM's: ``f(t) = t + sum_j c_j sigmoid(w_j t + b_j)``
    with ``c_j, w_j = softplus(raw) > 0``, so ``f'(t) >= 1``: strictly increasing whatever the parameters, and
    ``f(1) - f(0) >= 1`` keeps the normalisation ``gtilde(t) = (f(t) - f(0)) / (f(1) - f(0))`` well defined.
    Evaluations follow t's dtype (parameters are cast), so float64 times give a float64 schedule for long
    inference grids.
    """

    def __init__(self, hidden: int = 64, g0: float = G0_INIT, g1: float = G1_INIT) -> None:
        super().__init__()
        if not g1 - g0 > MIN_GAMMA_RANGE:
            raise ValueError(f"need g1 - g0 > {MIN_GAMMA_RANGE}, got g0={g0}, g1={g1}")
        self.g0 = nn.Parameter(torch.tensor(float(g0)))
        # g1 = g0 + MIN_GAMMA_RANGE + softplus(delta)
        self.delta = nn.Parameter(torch.tensor(_inv_softplus(g1 - g0 - MIN_GAMMA_RANGE)))
        # Hidden slopes around 1, offsets spread so the sigmoids' centres cover [0, 1], small output weights:
        # gtilde starts close to linear.
        self.w_raw = nn.Parameter(_inv_softplus(1.0) + 0.5 * torch.randn(hidden))
        self.b = nn.Parameter(-torch.rand(hidden))
        self.c_raw = nn.Parameter(torch.full((hidden,), _inv_softplus(0.01)) + 0.1 * torch.randn(hidden))

    def endpoints(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(g0, g1) as 0-d tensors with g1 - g0 >= MIN_GAMMA_RANGE: gamma(1) = g0 (clean end), gamma(0) = g1."""
        g0 = self.g0.to(dtype)
        return g0, g0 + MIN_GAMMA_RANGE + F.softplus(self.delta.to(dtype))

    def _hidden(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s, w, c): hidden sigmoids (B, H) at t, hidden slopes (H,), output weights (H,); in t's dtype."""
        dt = t.dtype
        w, c = F.softplus(self.w_raw.to(dt)), F.softplus(self.c_raw.to(dt))
        return torch.sigmoid(t[:, None] * w + self.b.to(dt)), w, c

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        """Unnormalised monotone network f(t): (B,) -> (B,)."""
        s, _, c = self._hidden(t)
        return t + s @ c

    def _f_prime(self, t: torch.Tensor) -> torch.Tensor:
        """df/dt in closed form: ``1 + sum_j c_j w_j s_j (1 - s_j)`` >= 1. (B,) -> (B,)."""
        s, w, c = self._hidden(t)
        return 1 + (s * (1 - s)) @ (c * w)

    def _f_range(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(0), f(1) - f(0) >= 1) as 0-d tensors."""
        # t = 0 and 1 made on the device (arange), not copied from host data: this runs in every CT step
        f = self._f(torch.arange(2, dtype=dtype, device=self.g0.device))
        return f[0], f[1] - f[0]
    def gtilde(self, t: torch.Tensor) -> torch.Tensor:
        """Monotone increasing, gtilde(0) = 0, gtilde(1) = 1. (B,) -> (B,)."""
        f0, span = self._f_range(t.dtype)
        return (self._f(t) - f0) / span

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """-log SNR(t), strictly decreasing from g1 at t = 0 to g0 at t = 1. (B,) -> (B,)."""
        g0, g1 = self.endpoints(t.dtype)
        return g0 + (g1 - g0) * (1 - self.gtilde(t))

    def gamma_prime(self, t: torch.Tensor) -> torch.Tensor:
        """d gamma / dt = -(g1 - g0) f'(t) / (f(1) - f(0)) < 0. (B,) -> (B,)."""
        g0, g1 = self.endpoints(t.dtype)
        _, span = self._f_range(t.dtype)
        return -(g1 - g0) * self._f_prime(t) / span

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """abar(t) = sigmoid(-gamma(t)) in (0, 1), increasing: q(z_t|y) = N(sqrt(abar) u_y, (1 - abar) I)."""
        return torch.sigmoid(-self.gamma(t))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = abar / (1 - abar) = exp(-gamma(t)), increasing. (B,) -> (B,)."""
        return torch.exp(-self.gamma(t))

    def snr_prime(self, t: torch.Tensor) -> torch.Tensor:
        """dSNR/dt = -gamma'(t) exp(-gamma(t)) > 0, in closed form (differentiable in the parameters,
        so the CT loss's weight trains the schedule). (B,) -> (B,)."""
        return -self.gamma_prime(t) * torch.exp(-self.gamma(t))

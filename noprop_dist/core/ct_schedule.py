"""The learnable NoProp-CT noise schedule (Kingma et al. 2021, "Variational Diffusion Models").

Time runs from NOISE (t = 0) to CLEAN (t = 1), as everywhere in this project (NOPROP.md, "Notation"):

    gamma(t) = g0 + (g1 - g0) * (1 - gtilde(t)),   abar(t) = sigmoid(-gamma(t)),   SNR(t) = exp(-gamma(t)),

with ``gtilde`` a monotone increasing network normalised to ``gtilde(0) = 0, gtilde(1) = 1``, so
``gamma(0) = g1`` (noise end), ``gamma(1) = g0`` (clean end), gamma strictly decreasing, abar and SNR
strictly increasing. Monotonicity and ``g0 < g1`` hold by construction (positive weights, increasing
activations, ``g1 = g0 + MIN_GAMMA_RANGE + softplus(delta)``), whatever values an optimiser gives the raw parameters.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

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

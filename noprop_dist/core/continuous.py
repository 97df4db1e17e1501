"""NoProp-CT and NoProp-FM with time shards: per-shard losses and the assembled inference chain (NOPROP.md,
"NoProp-CT", "NoProp-FM").

Shard k in 1..K owns the time interval [(k-1)/K, k/K] and its own network; K = 1 is the paper's single
network. A shard's loss draws t only inside its interval, so it trains at exactly the times at which the chain
uses it, and it reaches only its own network and the shared state (W_embed, head, CT's schedule).

Time runs from NOISE (t = 0) to CLEAN (t = 1).

Scale of a shard's loss: ``E_{t ~ U(I_k)}[...]`` with no 1/K factor, the estimate of the paper's whole-interval
loss from times in I_k only; the same convention as NoProp-DT, whose block loss carries the factor T. For
K = 1 it is the paper's loss.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .blocks import ModelSpec
from .chain import SavedChain, StageTrace
from .ct_blocks import CTBlock
from .objectives import class_logits, denoised_estimate
from .schedule import randn_like
from .shared import SharedState


def shard_interval(spec: ModelSpec, k: int) -> tuple[float, float]:
    """(t_lo, t_hi) = ((k-1)/K, k/K) of shard k in 1..K."""
    if not 1 <= k <= spec.num_blocks:
        raise ValueError(f"shard {k} outside 1..{spec.num_blocks}")
    return (k - 1) / spec.num_blocks, k / spec.num_blocks


def sample_times(
    spec: ModelSpec, k: int, batch: int, generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """t ~ U(t_lo, t_hi) of shard k, one per sample: (batch,) float32."""
    lo, hi = shard_interval(spec, k)
    # Drawn where the generator lives (as randn_like does), then moved.
    u = torch.rand(batch, generator=generator, device=generator.device if generator is not None else device)
    return (lo + (hi - lo) * u).to(device)




def ct_marginal(u_y: torch.Tensor, abar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(abar(t)) u_y + sqrt(1 - abar(t)) eps (pitfall 6: the square roots). (B, d), (B,), (B, d) -> (B, d)."""
    return abar.sqrt()[:, None] * u_y + (1 - abar).sqrt()[:, None] * noise


def ct_shard_loss(
    net: CTBlock, shared: SharedState, spec: ModelSpec, k: int, x: torch.Tensor, y: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, denoise) of NoProp-CT shard k. x: (B, C, H, W), y: (B,) int64.

    ``denoise = eta/2 * mean_i SNR'(t_i) ||u_hat(z_t, x, t) - u_y||^2`` with t ~ U(I_k), z_t ~ q(z_t | y);
    ``total = denoise + CE(-log p_out(y | z_1), z_1 ~ q(z_1 | y)) + 0.5 abar(0) mean ||u_y||^2`` (KL at t = 0).
    Every abar and SNR' comes from the learned schedule and stays differentiable: the loss trains it.
    """
    sched = shared.schedule
    embed = shared.embed
    u_y = embed[y]
    t = sample_times(spec, k, y.shape[0], generator, y.device)
    z_t = ct_marginal(u_y, sched.abar(t), randn_like(u_y, generator))
    u_hat = denoised_estimate(net(z_t, x, t), embed)
    denoise = spec.eta / 2 * (sched.snr_prime(t) * (u_hat - u_y).pow(2).sum(dim=1)).mean()
    ends = torch.tensor([0.0, 1.0], device=y.device)
    abar_0, abar_1 = sched.abar(ends).unbind()
    z_1 = ct_marginal(u_y, abar_1.expand(y.shape[0]), randn_like(u_y, generator))
    # class_logits gives unnormalised scores; ONE cross_entropy applies the only softmax (pitfall 5).
    ce = F.cross_entropy(class_logits(shared, z_1, spec.class_prob, spec.radial_sigma), y)
    kl = 0.5 * abar_0 * u_y.pow(2).sum(dim=1).mean()
    return denoise + ce + kl, denoise


def fm_path(z_0: torch.Tensor, z_1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation path and its velocity: (z_t = t z_1 + (1 - t) z_0, target z_1 - z_0), both (B, d)."""
    tt = t[:, None]
    return tt * z_1 + (1 - tt) * z_0, z_1 - z_0


def fm_velocity(logits: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """v = logits @ W_embed (no softmax: any direction in embedding space). (B, m), (m, d) -> (B, d)."""
    return logits @ embed


def fm_shard_loss(
    net: CTBlock, shared: SharedState, spec: ModelSpec, k: int, x: torch.Tensor, y: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, denoise) of NoProp-FM shard k. x: (B, C, H, W), y: (B,) int64.

    ``denoise = mean_i ||v(z_t, x, t) - (z_1 - z_0)||^2`` with z_0 ~ N(0, I), z_1 = u_y, t ~ U(I_k).
    No eta: NOPROP.md states the FM loss without it and the paper's FM runs use eta = 1; eta balances the
    ELBO's denoising term against its CE / KL terms, and FM has no ELBO. Scaling by a DT-style eta = 0.1
    would silently weaken the flow against the anchor.
    Learnable embeddings (learned, prototype) add the anchor ``-log p_out(y | z1_hat)``,
    ``z1_hat = z_t + (1 - t) v``, which keeps the embeddings from collapsing; one_hot is fixed: total == denoise.
    """
    embed = shared.embed
    z_1 = embed[y]
    t = sample_times(spec, k, y.shape[0], generator, y.device)
    z_0 = randn_like(z_1, generator)
    z_t, target = fm_path(z_0, z_1, t)
    v = fm_velocity(net(z_t, x, t), embed)
    denoise = (v - target).pow(2).sum(dim=1).mean()
    if spec.embedding == "one_hot":
        return denoise, denoise
    z1_hat = z_t + (1 - t)[:, None] * v
    anchor = F.cross_entropy(class_logits(shared, z1_hat, spec.class_prob, spec.radial_sigma), y)
    return denoise + anchor, denoise


def continuous_shard_loss(
    net: CTBlock, shared: SharedState, spec: ModelSpec, k: int, x: torch.Tensor, y: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, denoise) of shard k for spec.method in {noprop_ct, noprop_fm}."""
    if spec.method == "noprop_ct":
        return ct_shard_loss(net, shared, spec, k, x, y, generator)
    if spec.method == "noprop_fm":
        return fm_shard_loss(net, shared, spec, k, x, y, generator)
    raise ValueError(f"not a continuous-time method: {spec.method!r}")


# ---------------------------------------------------------------- inference


def step_shards(steps: int, num_shards: int) -> list[int]:
    """0-based shard used by each step n = 0..N-1: the one whose interval contains the start time t_n = n/N
    (at a boundary, the interval that starts there; t = 1 is never a start time, so the last interval is
    closed). Integer arithmetic: floor(n K / N), free of rounding at the boundaries."""
    return [min(n * num_shards // steps, num_shards - 1) for n in range(steps)]


def euler_integrate(
    field: Callable[[torch.Tensor, float, int], torch.Tensor], z0: torch.Tensor, steps: int,
    t0: float = 0.0, t1: float = 1.0,
) -> torch.Tensor:
    """Fixed-step Euler for dz/dt = field(z, t, n): N = ``steps`` steps of size (t1 - t0)/N on the grid
    t_n = t0 + n (t1 - t0)/N; n is passed so the field can pick the network of step n. Returns z(t1), z0's shape."""
    h = (t1 - t0) / steps
    z = z0
    for n in range(steps):
        z = z + h * field(z, t0 + n * h, n)
    return z


def ct_chain_coefficients(abar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, c) of Eq. 3 for the steps between consecutive entries of abar (N + 1,) -> each (N,).

    ``q(z_{n+1} | z_n, y) = N(a_n u_y + b_n z_n, c_n I)``; float64; c clamped at 0 against rounding.
    """
    ab_prev, ab_next = abar[:-1].double(), abar[1:].double()
    alpha = ab_prev / ab_next
    a = ab_next.sqrt() * (1 - alpha) / (1 - ab_prev)
    b = alpha.sqrt() * (1 - ab_next) / (1 - ab_prev)
    c = ((1 - ab_next) * (1 - alpha) / (1 - ab_prev)).clamp_min(0.0)
    return a, b, c


class ContinuousChain(SavedChain):
    """K shard networks + shared state of NoProp-CT or NoProp-FM. ``forward(x)`` -> log-probabilities (B, m).

    Inference never sees a label: z_0 ~ N(0, I), N steps on the grid t_n = n/N, step n run by the network whose
    interval contains t_n. Image features are computed once per network (eval mode: dropout off, so exact).
    """

    shard_class = CTBlock

    def __init__(self, spec: ModelSpec, nets: list[CTBlock], shared: SharedState) -> None:
        if spec.method not in ("noprop_ct", "noprop_fm"):
            raise ValueError(f"ContinuousChain is for noprop_ct / noprop_fm, got {spec.method!r}")
        super().__init__(spec, nets, shared)

    def _time(self, t: float, ref: torch.Tensor) -> torch.Tensor:
        return torch.full((ref.shape[0],), t, dtype=torch.float32, device=ref.device)

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        """Class log-probabilities at the end of the chain, z_1: (B, d) -> (B, m). CT: the head; FM: the nearest
        class embedding (log_softmax of -||z - u_c||^2: the paper predicts the nearest embedding, and unit
        temperature makes the distances proper log-probabilities)."""
        if self.spec.method == "noprop_fm":
            return torch.log_softmax(-torch.cdist(z, self.shared.embed).pow(2), dim=1)
        return torch.log_softmax(class_logits(self.shared, z, self.spec.class_prob, self.spec.radial_sigma), dim=1)

    def _sample(
        self, x: torch.Tensor, generator: torch.Generator | None, sampler: str,
        trace: list[StageTrace] | None, steps: int | None = None,
    ) -> torch.Tensor:
        """One run of sampler eq3 | mean | ode (CT) or mean (FM's Euler solve): x (B, C, H, W) normalised images
        -> class log-probabilities (B, m). steps: N (default spec.inference_steps).

        trace gets one entry per shard, taken after the shard's last step: the readout there (for FM of the
        endpoint the step's velocity points at, z + (1 - t) v) and, for CT, the shard's own class prediction."""
        n_steps = int(steps or self.spec.inference_steps)
        if n_steps < 1:
            raise ValueError(f"steps must be >= 1, got {n_steps}")
        embed = self.shared.embed
        features = [net.encode_image(x) for net in self.blocks]
        shard_of = step_shards(n_steps, len(self.blocks))
        last_of_shard = {n for n in range(n_steps) if n == n_steps - 1 or shard_of[n + 1] != shard_of[n]}
        z0 = randn_like(torch.empty((x.shape[0], embed.shape[1]), device=x.device), generator)

        def logits_at(z: torch.Tensor, t: float, n: int) -> torch.Tensor:
            k = shard_of[n]
            return self.blocks[k].forward_features(features[k], z, self._time(t, z))

        def record(n: int, z_next: torch.Tensor, logits: torch.Tensor) -> None:
            """The trace entry of step n's shard when n is its last step; z_next is z at t_{n+1}."""
            if trace is None or n not in last_of_shard:
                return
            if self.spec.method == "noprop_fm":
                ahead = z_next + (1 - (n + 1) / n_steps) * fm_velocity(logits, embed)
                trace.append((self.readout(ahead), None))
            else:
                trace.append((self.readout(z_next), torch.log_softmax(logits, dim=1)))

        if self.spec.method == "noprop_fm":
            z = self._fm(z0, logits_at, n_steps, record)
        elif sampler in ("eq3", "mean"):
            z = self._ct_chain(z0, logits_at, n_steps, generator if sampler == "eq3" else None, record)
        else:
            z = self._ct_ode(z0, logits_at, n_steps, record)
        return self.readout(z)

    def _abar_grid(self, n_steps: int, device: torch.device) -> torch.Tensor:
        """abar(t_n) of the learned schedule on t_n = n/N, n = 0..N, in float64: (N + 1,)."""
        grid = torch.arange(n_steps + 1, dtype=torch.float64, device=device) / n_steps
        return self.shared.schedule.abar(grid)

    def _ct_chain(self, z: torch.Tensor, logits_at: Callable, n_steps: int, noise: torch.Generator | None,
                  record: Callable) -> torch.Tensor:
        """Eq. 3 between abar(t_n) and abar(t_{n+1}) with u_y replaced by u_hat: the DT chain on a fine grid.
        noise: the generator of its noise term (eq3), or None to leave the term out (mean)."""
        a, b, c = (v.tolist() for v in ct_chain_coefficients(self._abar_grid(n_steps, z.device)))
        embed = self.shared.embed
        for n in range(n_steps):
            logits = logits_at(z, n / n_steps, n)
            z = a[n] * denoised_estimate(logits, embed) + b[n] * z
            if noise is not None:
                z = z + c[n] ** 0.5 * randn_like(z, noise)
            record(n, z, logits)
        return z

    def _ct_ode(self, z: torch.Tensor, logits_at: Callable, n_steps: int, record: Callable) -> torch.Tensor:
        """Deterministic probability-flow ODE of the variance-preserving process, DDIM form:
        ``z_{n+1} = sqrt(abar_{n+1}) u_hat + sqrt(1 - abar_{n+1}) eps_hat``,
        ``eps_hat = (z_n - sqrt(abar_n) u_hat) / sqrt(1 - abar_n)``.

        Why this is the PF-ODE: with ``s = z / sqrt(abar)`` and ``sigma = sqrt((1 - abar)/abar) = SNR^(-1/2)``
        the process becomes ``s = u_y + sigma eps`` (variance exploding), whose probability-flow ODE is
        ``ds/dsigma = E[eps | s] = (s - u_hat)/sigma``. The update above is exactly an Euler step of that ODE in
        (s, sigma): ``s_{n+1} = s_n + (sigma_{n+1} - sigma_n) eps_hat`` (Song, Meng, Ermon 2021, DDIM sec. 4.3),
        so it is the flow of the same marginals q(z_t | y), integrated without noise.
        """
        abar = self._abar_grid(n_steps, z.device)
        sa, s1a = abar.sqrt().tolist(), (1 - abar).sqrt().tolist()
        embed = self.shared.embed
        for n in range(n_steps):
            logits = logits_at(z, n / n_steps, n)
            u_hat = denoised_estimate(logits, embed)
            eps_hat = (z - sa[n] * u_hat) / s1a[n]
            z = sa[n + 1] * u_hat + s1a[n + 1] * eps_hat
            record(n, z, logits)
        return z

    def _fm(self, z: torch.Tensor, logits_at: Callable, n_steps: int, record: Callable) -> torch.Tensor:
        """Euler from t = 0 to 1 with v = logits @ W_embed (:func:`euler_integrate`'s steps); returns z_1."""
        embed = self.shared.embed

        def field(z_n: torch.Tensor, t: float, n: int) -> torch.Tensor:
            logits = logits_at(z_n, t, n)
            v = fm_velocity(logits, embed)
            record(n, z_n + v / n_steps, logits)
            return v

        return euler_integrate(field, z, n_steps)

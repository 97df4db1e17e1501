"""NoProp-CT and NoProp-FM with time shards: per-shard losses and the assembled inference chain (NOPROP.md,
"NoProp-CT", "NoProp-FM").

Shard k in 1..K owns the time interval [b_{k-1}, b_k] of the partition ``model.shard_partition`` (uniform: b_k =
k/K; core.partition) and its own network; K = 1 is the paper's single network. A shard's loss draws t only inside
its interval (widened by ``model.shard_overlap``), so it trains at the times at which the chain uses it, and it
reaches only its own network and the shared state (W_embed, head, CT's schedule).

Time runs from NOISE (t = 0) to CLEAN (t = 1).

Scale of a shard's loss: ``E_{t ~ U(I_k)}[...]`` with no 1/K factor, the estimate of the paper's whole-interval
loss from times in I_k only; the same convention as NoProp-DT, whose block loss carries the factor T. For
K = 1 it is the paper's loss.
"""
from __future__ import annotations

import bisect
import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CT_LOSS_WEIGHTS
from .blocks import ModelSpec
from .chain import SavedChain, StageTrace, start_noise
from .ct_schedule import LearnedSchedule
from .objectives import class_logits, denoised_estimate
from .partition import log_snr_levels, widen
from .schedule import randn_like
from .shared import SharedState

# NoProp-FM's log-SNR 2 logit(t) is infinite at t = 0 and 1; the log_snr partition takes equal steps over the
# range of NoProp-CT's initial schedule, lambda in [-5, 5] (ct_schedule.G0_INIT, G1_INIT).
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
    if spec.method == "noprop_fm":
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


def ct_marginal(u_y: torch.Tensor, abar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(abar(t)) u_y + sqrt(1 - abar(t)) eps (pitfall 6: the square roots). (B, d), (B,), (B, d) -> (B, d)."""
    return abar.sqrt()[:, None] * u_y + (1 - abar).sqrt()[:, None] * noise


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


def fm_path(z_0: torch.Tensor, z_1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation path and its velocity: (z_t = t z_1 + (1 - t) z_0, target z_1 - z_0), both (B, d)."""
    tt = t[:, None]
    return tt * z_1 + (1 - tt) * z_0, z_1 - z_0


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


def continuous_shard_loss(
    net: nn.Module, shared: SharedState, spec: ModelSpec, k: int, x: torch.Tensor, y: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, denoise) of shard k for spec.method in {noprop_ct, noprop_fm}."""
    if spec.method == "noprop_ct":
        return ct_shard_loss(net, shared, spec, k, x, y, generator)
    if spec.method == "noprop_fm":
        return fm_shard_loss(net, shared, spec, k, x, y, generator)
    raise ValueError(f"not a continuous-time method: {spec.method!r}")


# ---------------------------------------------------------------- inference


def step_shards(steps: int, num_shards: int, bounds: list[float] | None = None) -> list[int]:
    """0-based shard used by each step n = 0..N-1: the one whose interval contains the start time t_n = n/N
    (at a boundary, the interval that starts there; t = 1 is never a start time, so the last interval is
    closed). bounds: the partition's K + 1 boundaries (None: uniform, in integer arithmetic, floor(n K / N),
    free of rounding at the boundaries)."""
    if bounds is None:
        return [min(n * num_shards // steps, num_shards - 1) for n in range(steps)]
    inner = bounds[1:-1]
    return [min(bisect.bisect_right(inner, n / steps), num_shards - 1) for n in range(steps)]


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


def image_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``net.encode_image(x)`` when the network splits its forward into image features and the rest
    (``encode_image`` and ``forward_features``), else None: the sampler then calls ``net(z, x, t)`` every step."""
    if callable(getattr(net, "encode_image", None)) and callable(getattr(net, "forward_features", None)):
        return net.encode_image(x)
    return None


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
    partition interval contains t_n (overlaps only widen the training intervals). A network that offers
    ``encode_image(x)`` and ``forward_features(h_x, z, t)`` (Fig. 6's and resnet's do) has its image features
    computed once and reused for all its steps (eval mode: exact); any other runs ``forward(z, x, t)`` each step.
    """

    def __init__(self, spec: ModelSpec, nets: list[nn.Module], shared: SharedState) -> None:
        if spec.method not in ("noprop_ct", "noprop_fm"):
            raise ValueError(f"ContinuousChain is for noprop_ct / noprop_fm, got {spec.method!r}")
        super().__init__(spec, nets, shared)

    def shard_bounds(self) -> list[float]:
        """The K + 1 boundaries at which the chain switches from one shard's network to the next."""
        return shard_bounds(self.spec, self.shared).tolist()

    def _time(self, t: float, ref: torch.Tensor) -> torch.Tensor:
        return torch.full((ref.shape[0],), t, dtype=torch.float32, device=ref.device)

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        """Class log-probabilities at the end of the chain, z_1: (B, d) -> (B, m). FM, and CT with
        ``spec.ct_readout = nearest``: the nearest class embedding (log_softmax of -||z - u_c||^2: the paper
        predicts FM's nearest embedding, and unit temperature makes the distances proper log-probabilities).
        CT with ``head`` (the paper's Eq. 14): the shared head, which only K shard losses per mini-batch train,
        against T = 10 for NoProp-DT's, so it lags the shards early on (docs/continuous_time.md)."""
        if self.spec.method == "noprop_fm" or self.spec.ct_readout == "nearest":
            return torch.log_softmax(-torch.cdist(z, self.shared.embed).pow(2), dim=1)
        return torch.log_softmax(class_logits(self.shared, z, self.spec.class_prob, self.spec.radial_sigma), dim=1)

    def _sample(
        self, x: torch.Tensor, generator: torch.Generator | None, sampler: str,
        trace: list[StageTrace] | None, steps: int | None = None, z0: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One run of sampler eq3 | mean | ode (CT) or mean (FM's Euler solve): x (B, C, H, W) normalised images
        -> class log-probabilities (B, m). steps: N (default spec.inference_steps); z0: z_0 (B, d), or None to
        draw it from ``generator``.

        trace gets one entry per shard, taken after the shard's last step: the readout there (for FM of the
        endpoint the step's velocity points at, z + (1 - t) v) and, for CT, the shard's own class prediction."""
        n_steps = int(steps or self.spec.inference_steps)
        if n_steps < 1:
            raise ValueError(f"steps must be >= 1, got {n_steps}")
        embed = self.shared.embed
        features = [image_features(net, x) for net in self.blocks]
        uniform = self.spec.shard_partition == "uniform"
        shard_of = step_shards(n_steps, len(self.blocks), None if uniform else self.shard_bounds())
        last_of_shard = {n for n in range(n_steps) if n == n_steps - 1 or shard_of[n + 1] != shard_of[n]}
        z0 = start_noise(torch.empty((x.shape[0], embed.shape[1]), device=x.device), generator, z0)

        def logits_at(z: torch.Tensor, t: float, n: int) -> torch.Tensor:
            k = shard_of[n]
            if features[k] is None:
                return self.blocks[k](z, x, self._time(t, z))
            return self.blocks[k].forward_features(features[k], z, self._time(t, z))

        def record(n: int, z_next: torch.Tensor, logits: torch.Tensor, z1_hat: torch.Tensor | None = None) -> None:
            """The trace entry of step n's shard when n is its last step; z_next is z at t_{n+1}; FM's z1_hat
            is the endpoint step n's velocity points at."""
            if trace is None or n not in last_of_shard:
                return
            if self.spec.method == "noprop_fm":
                trace.append((self.readout(z1_hat), None))
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
        """Euler from t = 0 to 1 with :func:`fm_field`'s velocity (:func:`euler_integrate`'s steps); returns z_1."""
        embed = self.shared.embed

        def field(z_n: torch.Tensor, t: float, n: int) -> torch.Tensor:
            logits = logits_at(z_n, t, n)
            v, z1_hat = fm_field(logits, embed, z_n, self._time(t, z_n), self.spec.fm_target)
            record(n, z_n + v / n_steps, logits, z1_hat)
            return v

        return euler_integrate(field, z, n_steps)

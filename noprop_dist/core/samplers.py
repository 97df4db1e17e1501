"""The inference samplers: free functions of one signature, registered by name in each chain class's table
(:data:`DT_SAMPLERS`, :data:`CT_SAMPLERS`, :data:`FM_SAMPLERS`; registry.METHODS lists the names a method takes):

    sampler(chain, x (B, C, H, W), z0 (B, d) | None, generator, steps, draws, trace) -> log-probabilities (B, m)

Inference never sees a label: z_0 is noise (``z0``, else drawn from ``generator``: :func:`start_noise`), the shard
networks move it along the method's path (core.paths) and the chain's ``readout`` reads the classes at the end.
steps: CT / FM's N (None: spec.inference_steps; NoProp-DT runs its T blocks and takes none). draws: the
ensemble's runs (None: spec.ensemble_draws; every other sampler makes one run). trace: a list that gets one
:data:`StageTrace` per stage (DT block t, or CT / FM shard k at the end of its interval), or None.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .paths import denoised_estimate, fm_field, randn_like, step_shards
from .schedules import LearnedSchedule, ct_chain_coefficients

if TYPE_CHECKING:
    from .chain import ContinuousChain, CTChain, DTChain, FMChain, SavedChain

# Samplers whose only randomness is z_0: given z_0, a run is a fixed function of the images, so it can be split
# into batches (each with its rows of z_0) and exported as a graph that takes z_0 as an input. eq3 draws noise at
# every step and the ensemble a z_0 per run.
Z0_ONLY_SAMPLERS = ("mean", "stage_average", "ode")

# What a sampler records per stage when asked to trace: (log-probabilities read out from z after the stage (B, m),
# the stage's own class log-probabilities from its network's logits (B, m), None for FM whose network outputs a
# velocity).
StageTrace = tuple[torch.Tensor, "torch.Tensor | None"]

# The one signature of the module's docstring: (chain, x, z0, generator, steps, draws, trace) -> (B, m).
Sampler = Callable[..., torch.Tensor]
# Runs step n's network at z (B, d) and time t_n: (z, t_n, n) -> logits (B, m).
LogitsAt = Callable[[torch.Tensor, float, int], torch.Tensor]
# Called after each step n with the new z (B, d) and the step's logits (B, m) or None.
Record = Callable[[int, torch.Tensor, "torch.Tensor | None"], None]


def mean_probabilities(log_probs: list[torch.Tensor]) -> torch.Tensor:
    """log of the mean of the class probabilities of several runs: [(B, m)] log-probs or logits -> (B, m)."""
    stacked = torch.log_softmax(torch.stack(log_probs), dim=-1)
    return torch.logsumexp(stacked, dim=0) - math.log(len(log_probs))


def start_noise(like: torch.Tensor, generator: torch.Generator | None, z0: torch.Tensor | None) -> torch.Tensor:
    """z_0 of a chain run, ``like``'s shape (B, d), dtype and device: ``z0`` when given (a one-line ValueError
    when its shape is not ``like``'s), else N(0, I) drawn from ``generator`` (``randn_like``).

    A caller that draws z_0 itself can split a batch and still give each image the z_0 one call would have."""
    if z0 is None:
        return randn_like(like, generator)
    # a tracer (export) sees the example's shapes here: the check would only be frozen into the graph
    if not torch.jit.is_tracing() and tuple(z0.shape) != tuple(like.shape):
        raise ValueError(f"z0: shape {tuple(z0.shape)}, expected (B, d) = {tuple(like.shape)}")
    return z0.to(device=like.device, dtype=like.dtype)


# ---------------------------------------------------------------- NoProp-DT: Eq. 3 on the T blocks


def _dt_run(chain: DTChain, x: torch.Tensor, z0: torch.Tensor | None, generator: torch.Generator | None,
            noise: bool, trace: list[StageTrace] | None) -> torch.Tensor:
    """z_0 ~ N(0, I); block t (t = 1..T, in that order: block t was trained on z_{t-1}'s noise level) gives
    u_hat_t = softmax(logits_t) @ W_embed and ``z_t = a_t u_hat_t + b_t z_{t-1} (+ sqrt(c_t) eps with noise)``.
    x: (B, C, H, W) -> log p(y | z_T), (B, m)."""
    embed = chain.shared.embed
    z = start_noise(x.new_empty((x.shape[0], embed.shape[1])), generator, z0)
    for block, (a, b, c) in zip(chain.blocks, chain.coefficients):
        logits = block(z, x)
        z = a * denoised_estimate(logits, embed) + b * z
        if noise:
            z = z + math.sqrt(c) * randn_like(z, generator)
        if trace is not None:
            trace.append((chain.readout(z), torch.log_softmax(logits, dim=1)))
    return chain.readout(z)


def dt_eq3(chain: DTChain, x: torch.Tensor, z0: torch.Tensor | None, generator: torch.Generator | None,
           steps: int | None, draws: int | None, trace: list[StageTrace] | None) -> torch.Tensor:
    """NoProp-DT's Eq. 3 with its noise term (the paper's): x (B, C, H, W) -> log-probabilities (B, m)."""
    return _dt_run(chain, x, z0, generator, True, trace)


def dt_mean(chain: DTChain, x: torch.Tensor, z0: torch.Tensor | None, generator: torch.Generator | None,
            steps: int | None, draws: int | None, trace: list[StageTrace] | None) -> torch.Tensor:
    """NoProp-DT's Eq. 3 without its noise term: z_0 is the only draw. x (B, C, H, W) -> (B, m)."""
    return _dt_run(chain, x, z0, generator, False, trace)


# ---------------------------------------------------------------- NoProp-CT / FM: N steps on a grid of times


def image_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``net.encode_image(x)`` when the network splits its forward into image features and the rest
    (``encode_image`` and ``forward_features``), else None: the sampler then calls ``net(z, x, t)`` every step."""
    if callable(getattr(net, "encode_image", None)) and callable(getattr(net, "forward_features", None)):
        return net.encode_image(x)
    return None


def _times(t: float, ref: torch.Tensor) -> torch.Tensor:
    """t for every row of ``ref`` (B, d): (B,) float32 on its device."""
    return torch.full((ref.shape[0],), t, dtype=torch.float32, device=ref.device)


def _grid_run(
    chain: ContinuousChain, x: torch.Tensor, z0: torch.Tensor | None, generator: torch.Generator | None,
    steps: int | None, trace: list[StageTrace] | None,
    integrate: Callable[[torch.Tensor, LogitsAt, int, Record], torch.Tensor],
) -> torch.Tensor:
    """One run on the grid t_n = n/N, n = 0..N-1, step n run by the network whose partition interval contains
    t_n (overlaps only widen the training intervals): x (B, C, H, W) -> class log-probabilities (B, m).
    ``integrate(z_0, logits_at, N, record)`` takes the steps and returns z_1 (B, d).

    A network that offers ``encode_image(x)`` and ``forward_features(h_x, z, t)`` (Fig. 6's and resnet's do) has
    its image features computed once and reused for all its steps (eval mode: exact); any other runs
    ``forward(z, x, t)`` each step. trace gets one entry per shard, after the shard's last step."""
    n_steps = int(steps or chain.spec.inference_steps)
    if n_steps < 1:
        raise ValueError(f"steps must be >= 1, got {n_steps}")
    embed = chain.shared.embed
    features = [image_features(net, x) for net in chain.blocks]
    uniform = chain.spec.shard_partition == "uniform"
    shard_of = step_shards(n_steps, len(chain.blocks), None if uniform else chain.shard_bounds())
    last_of_shard = {n for n in range(n_steps) if n == n_steps - 1 or shard_of[n + 1] != shard_of[n]}
    z_0 = start_noise(torch.empty((x.shape[0], embed.shape[1]), device=x.device), generator, z0)

    def logits_at(z: torch.Tensor, t: float, n: int) -> torch.Tensor:
        k = shard_of[n]
        if features[k] is None:
            return chain.blocks[k](z, x, _times(t, z))
        return chain.blocks[k].forward_features(features[k], z, _times(t, z))

    def record(n: int, z: torch.Tensor, logits: torch.Tensor | None) -> None:
        """The trace entry of step n's shard when n is its last step: the readout at z (B, d) and the shard's
        own class prediction from its logits (B, m) (None: it has none)."""
        if trace is None or n not in last_of_shard:
            return
        trace.append((chain.readout(z), None if logits is None else torch.log_softmax(logits, dim=1)))

    return chain.readout(integrate(z_0, logits_at, n_steps, record))


def _abar_grid(schedule: LearnedSchedule, n_steps: int, device: torch.device) -> torch.Tensor:
    """abar(t_n) of the learned schedule on t_n = n/N, n = 0..N, in float64: (N + 1,)."""
    grid = torch.arange(n_steps + 1, dtype=torch.float64, device=device) / n_steps
    return schedule.abar(grid)


def _ct_eq3_steps(chain: CTChain, z: torch.Tensor, logits_at: LogitsAt, n_steps: int, record: Record,
                  noise: torch.Generator | None) -> torch.Tensor:
    """Eq. 3 between abar(t_n) and abar(t_{n+1}) with u_y replaced by u_hat: the DT chain on a fine grid. z: z_0
    (B, d) -> z_1 (B, d). noise: the generator of its noise term (eq3), or None to leave the term out (mean)."""
    a, b, c = (v.tolist() for v in ct_chain_coefficients(_abar_grid(chain.shared.schedule, n_steps, z.device)))
    embed = chain.shared.embed
    for n in range(n_steps):
        logits = logits_at(z, n / n_steps, n)
        z = a[n] * denoised_estimate(logits, embed) + b[n] * z
        if noise is not None:
            z = z + c[n] ** 0.5 * randn_like(z, noise)
        record(n, z, logits)
    return z


def _ct_ode_steps(chain: CTChain, z: torch.Tensor, logits_at: LogitsAt, n_steps: int,
                  record: Record) -> torch.Tensor:
    """Deterministic probability-flow ODE of the variance-preserving process, DDIM form, z_0 (B, d) -> z_1 (B, d):
    ``z_{n+1} = sqrt(abar_{n+1}) u_hat + sqrt(1 - abar_{n+1}) eps_hat``,
    ``eps_hat = (z_n - sqrt(abar_n) u_hat) / sqrt(1 - abar_n)``.

    Why this is the PF-ODE: with ``s = z / sqrt(abar)`` and ``sigma = sqrt((1 - abar)/abar) = SNR^(-1/2)``
    the process becomes ``s = u_y + sigma eps`` (variance exploding), whose probability-flow ODE is
    ``ds/dsigma = E[eps | s] = (s - u_hat)/sigma``. The update above is exactly an Euler step of that ODE in
    (s, sigma): ``s_{n+1} = s_n + (sigma_{n+1} - sigma_n) eps_hat`` (Song, Meng, Ermon 2021, DDIM sec. 4.3),
    so it is the flow of the same marginals q(z_t | y), integrated without noise.
    """
    abar = _abar_grid(chain.shared.schedule, n_steps, z.device)
    sa, s1a = abar.sqrt().tolist(), (1 - abar).sqrt().tolist()
    embed = chain.shared.embed
    for n in range(n_steps):
        logits = logits_at(z, n / n_steps, n)
        u_hat = denoised_estimate(logits, embed)
        eps_hat = (z - sa[n] * u_hat) / s1a[n]
        z = sa[n + 1] * u_hat + s1a[n + 1] * eps_hat
        record(n, z, logits)
    return z


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


def _fm_euler_steps(chain: FMChain, z: torch.Tensor, logits_at: LogitsAt, n_steps: int,
                    record: Record) -> torch.Tensor:
    """Euler from t = 0 to 1 along :func:`core.paths.fm_field`'s velocity, z_0 (B, d) -> z_1 (B, d); a step's
    record is the endpoint its velocity points at, z + (1 - t) v (FM's networks make no class prediction)."""
    embed = chain.shared.embed

    def field(z_n: torch.Tensor, t: float, n: int) -> torch.Tensor:
        v, z1_hat = fm_field(logits_at(z_n, t, n), embed, z_n, _times(t, z_n), chain.spec.fm_target)
        record(n, z1_hat, None)
        return v

    return euler_integrate(field, z, n_steps)


def ct_eq3(chain: CTChain, x: torch.Tensor, z0: torch.Tensor | None, generator: torch.Generator | None,
           steps: int | None, draws: int | None, trace: list[StageTrace] | None) -> torch.Tensor:
    """NoProp-CT's Eq. 3 on the grid of its learned schedule, with its noise term (the paper's): (B, m)."""
    return _grid_run(chain, x, z0, generator, steps, trace, functools.partial(_ct_eq3_steps, chain, noise=generator))


def ct_mean(chain: CTChain, x: torch.Tensor, z0: torch.Tensor | None, generator: torch.Generator | None,
            steps: int | None, draws: int | None, trace: list[StageTrace] | None) -> torch.Tensor:
    """NoProp-CT's Eq. 3 on the grid without its noise term: z_0 is the only draw. (B, m)."""
    return _grid_run(chain, x, z0, generator, steps, trace, functools.partial(_ct_eq3_steps, chain, noise=None))


def ct_ode(chain: CTChain, x: torch.Tensor, z0: torch.Tensor | None, generator: torch.Generator | None,
           steps: int | None, draws: int | None, trace: list[StageTrace] | None) -> torch.Tensor:
    """NoProp-CT's probability-flow ODE (DDIM form) of its learned schedule: z_0 is the only draw. (B, m)."""
    return _grid_run(chain, x, z0, generator, steps, trace, functools.partial(_ct_ode_steps, chain))


def fm_mean(chain: FMChain, x: torch.Tensor, z0: torch.Tensor | None, generator: torch.Generator | None,
            steps: int | None, draws: int | None, trace: list[StageTrace] | None) -> torch.Tensor:
    """NoProp-FM's Euler solve of its flow, which has no noise term: z_0 is the only draw. (B, m)."""
    return _grid_run(chain, x, z0, generator, steps, trace, functools.partial(_fm_euler_steps, chain))


# ---------------------------------------------------------------- every method: several runs, or stages, averaged


def stage_average(chain: SavedChain, x: torch.Tensor, z0: torch.Tensor | None, generator: torch.Generator | None,
                  steps: int | None, draws: int | None, trace: list[StageTrace] | None) -> torch.Tensor:
    """The chain's mean run with the read-outs after each of its stages averaged (:func:`mean_probabilities`);
    trace gets the mean run's stages. (B, m).

    Each z_t of the mean chain mixes class embeddings (plus what is left of z_0), so the head reads it out as it
    reads z_T; averaging the read-outs keeps what middle blocks add when later ones give it back."""
    stages: list[StageTrace] = []
    chain.samplers["mean"](chain, x, z0, generator, steps, draws, stages)
    if trace is not None:
        trace.extend(stages)
    return mean_probabilities([readout for readout, _ in stages])


def ensemble(chain: SavedChain, x: torch.Tensor, z0: torch.Tensor | None, generator: torch.Generator | None,
             steps: int | None, draws: int | None, trace: list[StageTrace] | None) -> torch.Tensor:
    """The probabilities of ``draws`` noisy runs averaged (:func:`mean_probabilities`), each from its own z_0 (so
    no ``z0``); trace gets each stage averaged over the runs. (B, m)."""
    if z0 is not None:
        raise ValueError("z0 does not apply to the ensemble sampler, which draws its own z_0 for each run")
    n = int(draws or chain.spec.ensemble_draws)
    if n < 1:
        raise ValueError(f"draws must be >= 1, got {n}")
    # a method without eq3 (FM) draws nothing but z_0: its noisy runs are mean runs from their own z_0
    noisy = chain.samplers["eq3" if "eq3" in chain.samplers else "mean"]
    runs, traces = [], []
    for _ in range(n):
        traces.append([] if trace is not None else None)
        runs.append(noisy(chain, x, None, generator, steps, draws, traces[-1]))
    if trace is not None:
        for stage in zip(*traces):  # the n runs' traces of one stage
            readouts, owns = zip(*stage)
            trace.append((mean_probabilities(list(readouts)),
                          None if owns[0] is None else mean_probabilities(list(owns))))
    return mean_probabilities(runs)


# Each chain class's samplers by name (its ``samplers``); their names are those its registry.METHODS entries list.
DT_SAMPLERS: dict[str, Sampler] = {"eq3": dt_eq3, "mean": dt_mean, "ensemble": ensemble, "stage_average": stage_average}
CT_SAMPLERS: dict[str, Sampler] = {"eq3": ct_eq3, "mean": ct_mean, "ensemble": ensemble, "ode": ct_ode}
FM_SAMPLERS: dict[str, Sampler] = {"mean": fm_mean, "ensemble": ensemble}

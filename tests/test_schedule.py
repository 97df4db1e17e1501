"""Noise schedule direction, loss weights, and Eq. 3's coefficients against the Gaussian posterior."""
import math

import pytest
import torch

from noprop_dist.core import DTSchedule, cosine_abar, sample_marginal


@pytest.mark.parametrize("T", [1, 2, 5, 10, 50])
def test_schedule_runs_from_noise_to_clean(T):
    abar = cosine_abar(T, 0.999)
    assert abar.shape == (T + 1,)
    assert abar[0] < 1e-6, "t = 0 must be pure noise"
    assert abar[-1] == pytest.approx(0.999), "t = T must be (capped) clean"
    assert bool((abar[1:] > abar[:-1]).all()), "abar must increase with t"
    snr = DTSchedule(abar).snr
    assert bool((snr[1:] > snr[:-1]).all())


@pytest.mark.parametrize("T", [1, 3, 10, 50])
def test_loss_weights_strictly_positive_and_finite(T):
    s = DTSchedule.cosine(T)
    weights = [s.loss_weight(t) for t in range(1, T + 1)]
    assert all(w > 0 and math.isfinite(w) for w in weights), weights


@pytest.mark.parametrize("abar_max", [0.99, 0.999, 0.9999])
def test_loss_weights_follow_model_abar_max_and_stay_bounded(abar_max):
    """Pitfall 2: the schedule a run trains with comes from ``model.abar_max`` (through the config, the spec
    and the block loss), and its largest weight eta T/2 (SNR(T) - SNR(T-1)) stays below
    eta T/2 * abar_max / (1 - abar_max) <= eta T/2 * 1e4 at the highest cap the config accepts."""
    from noprop_dist.config import ABAR_MAX_LIMIT, load_config
    from noprop_dist.core import DTSchedule, build_block, build_shared
    from noprop_dist.core.losses import block_loss
    from noprop_dist.core.paths import denoised_estimate
    from noprop_dist.training import model_spec

    cfg = load_config(None, [f"model.abar_max={abar_max}", "model.num_blocks=10"])
    spec = model_spec(cfg, (1, 8, 8), 10)
    schedule = DTSchedule.cosine(spec.num_shards, spec.abar_max)  # what NoProp-DT's shard loss trains with
    assert schedule.abar_values[-1] == pytest.approx(abar_max, rel=1e-9)
    weights = [spec.eta * spec.num_shards / 2 * w for w in schedule.loss_weights]
    bound = spec.eta * spec.num_shards / 2 * abar_max / (1 - abar_max)
    assert all(0 < w <= bound for w in weights), weights
    assert bound <= spec.eta * spec.num_shards / 2 * ABAR_MAX_LIMIT / (1 - ABAR_MAX_LIMIT) * (1 + 1e-9)
    # The weight that reaches block T's loss is this schedule's: replay its noise and compare.
    block, shared = build_block(spec, spec.num_shards, 0).eval(), build_shared(spec, 0)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8)
    loss = block_loss(block, shared, schedule, spec.num_shards, x, y, spec.eta, torch.Generator().manual_seed(1))
    with torch.no_grad():
        u_y = shared.embed[y]
        ab = schedule.abar_values[-2]
        z = ab**0.5 * u_y + (1 - ab) ** 0.5 * torch.randn(u_y.shape, generator=torch.Generator().manual_seed(1))
        err = (denoised_estimate(block(z, x), shared.embed) - u_y).pow(2).sum(1).mean()
    assert float(loss.detach()) == pytest.approx(weights[-1] * float(err), rel=1e-5)


def test_abar_max_beyond_the_ceiling_is_refused():
    """abar_max = 0.99999 makes the last weight about 1e5: the config refuses it, naming the key."""
    from noprop_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model.abar_max: must be in \(0.5, 0.9999\], got 0.99999"):
        load_config(None, ["model.abar_max=0.99999"])


def test_uncapped_schedule_rejected():
    with pytest.raises(ValueError, match="non-increasing"):
        cosine_abar(10, abar_max=0.6)


def _posterior_closed_form(s: DTSchedule, t: int):
    """q(z_t | z_{t-1}, y) by conditioning the joint Gaussian of (z_t, z_{t-1}) given y, per unit of u_y.

    z_t ~ N(sqrt(abar_t) u, 1 - abar_t); z_{t-1} = sqrt(alpha) z_t + sqrt(1 - alpha) e, alpha = abar_{t-1}/abar_t.
    Returns (coefficient of u, coefficient of z_{t-1}, variance).
    """
    ab_t, ab_p = float(s.abar[t]), float(s.abar[t - 1])
    alpha = ab_p / ab_t
    var_t = 1 - ab_t
    cov = math.sqrt(alpha) * var_t
    var_p = alpha * var_t + (1 - alpha)
    gain = cov / var_p
    # E[z_t | z_{t-1}] = sqrt(ab_t) u + gain (z_{t-1} - sqrt(ab_p) u)
    return math.sqrt(ab_t) - gain * math.sqrt(ab_p), gain, var_t - cov * gain


@pytest.mark.parametrize("t", range(1, 11))
def test_eq3_coefficients_equal_gaussian_posterior(t):
    s = DTSchedule.cosine(10)
    a, b, c = s.posterior_coefficients(t)
    a_ref, b_ref, c_ref = _posterior_closed_form(s, t)
    assert a == pytest.approx(a_ref, rel=1e-9, abs=1e-12)
    assert b == pytest.approx(b_ref, rel=1e-9, abs=1e-12)
    assert c == pytest.approx(c_ref, rel=1e-9, abs=1e-12)


def test_eq3_coefficients_monte_carlo():
    """Regress simulated z_t on z_{t-1} for a fixed u: slope b, intercept a*u, residual variance c."""
    s = DTSchedule.cosine(10)
    gen = torch.Generator().manual_seed(0)
    u, n = 1.5, 400_000
    for t in (2, 5, 9):
        ab_t, ab_p = float(s.abar[t]), float(s.abar[t - 1])
        alpha = ab_p / ab_t
        z_t = math.sqrt(ab_t) * u + math.sqrt(1 - ab_t) * torch.randn(n, generator=gen, dtype=torch.float64)
        z_p = math.sqrt(alpha) * z_t + math.sqrt(1 - alpha) * torch.randn(n, generator=gen, dtype=torch.float64)
        zc, pc = z_t - z_t.mean(), z_p - z_p.mean()
        slope = float((zc * pc).sum() / (pc * pc).sum())
        intercept = float(z_t.mean() - slope * z_p.mean())
        resid = float((z_t - intercept - slope * z_p).var())
        a, b, c = s.posterior_coefficients(t)
        assert slope == pytest.approx(b, abs=0.01)
        assert intercept == pytest.approx(a * u, abs=0.01)
        assert resid == pytest.approx(c, rel=0.02)


def test_sample_marginal_has_sqrt_abar_mean_and_right_variance():
    u = torch.full((200_000, 1), 2.0)
    z = sample_marginal(u, 0.25, torch.Generator().manual_seed(0))
    assert float(z.mean()) == pytest.approx(math.sqrt(0.25) * 2.0, abs=0.01)  # not 0.25 * 2 (pitfall 6)
    assert float(z.var()) == pytest.approx(0.75, rel=0.02)

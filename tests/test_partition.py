"""Time-shard partitions of NoProp-CT / FM (core.partition, paths.shard_bounds): coverage, order, and the
property each kind promises, checked in closed form against the process's own log-SNR."""
import math

import pytest
import torch
from conftest import make_spec

from noprop_dist.config import SHARD_PARTITIONS, ConfigError, load_config
from noprop_dist.core import (
    build_shared,
    shard_interval,
    step_shards,
)
from noprop_dist.core.paths import (
    FM_LOG_SNR_RANGE,
    sample_times,
    shard_bounds,
)
from noprop_dist.core.ct_blocks import build_ct_block
from noprop_dist.core.partition import EQUAL_MASS_MEAN, EQUAL_MASS_STD
from noprop_dist.registry import get_method

METHODS = ["noprop_ct", "noprop_fm"]


def _shared(spec, bend: bool = True):
    """Shared state; for CT with a schedule bent well away from linear (as training could leave it), so a
    partition that ignored the schedule would fail the log-SNR checks."""
    shared = build_shared(spec, 0)
    if bend and spec.method == "noprop_ct":
        with torch.no_grad():
            sched = shared.schedule
            sched.c_raw.fill_(2.0)
            sched.w_raw.fill_(3.0)
            sched.b.copy_(-torch.linspace(0.0, 6.0, sched.b.numel()))
            sched.g0.fill_(-6.0)
    return shared


def _log_snr(spec, shared, t: torch.Tensor) -> torch.Tensor:
    """lambda(t) of the method's process, float64: CT -gamma(t), FM 2 logit(t)."""
    if spec.method == "noprop_ct":
        with torch.no_grad():
            return -shared.schedule.gamma(t.double())
    return 2 * torch.logit(t.double())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("partition", SHARD_PARTITIONS)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_bounds_cover_0_to_1_strictly_increasing_without_gaps(method, partition, k):
    spec = make_spec("learned", num_shards=k, method=method, shard_partition=partition)
    shared = _shared(spec)
    b = shard_bounds(spec, shared)
    assert b.shape == (k + 1,) and float(b[0]) == 0.0 and float(b[-1]) == 1.0
    assert bool((b[1:] > b[:-1]).all()), b
    # consecutive training intervals meet: no gap, no overlap without shard_overlap
    intervals = [shard_interval(spec, j, shared) for j in range(1, k + 1)]
    assert intervals[0][0] == 0.0 and intervals[-1][1] == 1.0
    assert all(a[1] == pytest.approx(c[0], abs=1e-7) for a, c in zip(intervals, intervals[1:]))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_log_snr_partition_has_equal_log_snr_spans(method, k):
    spec = make_spec("learned", num_shards=k, method=method, shard_partition="log_snr")
    shared = _shared(spec)
    b = shard_bounds(spec, shared)
    if method == "noprop_ct":  # the schedule's own range, split evenly
        lam = _log_snr(spec, shared, b)
        spans = lam[1:] - lam[:-1]
        assert float((spans - spans.mean()).abs().max()) < 1e-3 * float(lam[-1] - lam[0])
        # the bent schedule moves the boundaries away from uniform: the check above is not trivially met
        assert float((b - torch.arange(k + 1) / k).abs().max()) > 0.02
    else:  # FM: lambda = 2 logit(t) is infinite at the ends; equal steps over FM_LOG_SNR_RANGE inside
        lo, hi = FM_LOG_SNR_RANGE
        inner = _log_snr(spec, shared, b[1:-1])
        expected = torch.tensor([lo + (hi - lo) * j / k for j in range(1, k)], dtype=torch.float64)
        assert torch.allclose(inner, expected, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_equal_mass_partition_gives_every_shard_the_same_probability(method, k):
    """Mass of lambda ~ N(2.4, 2.4^2) (EDM's ln sigma ~ N(-1.2, 1.2^2)) between consecutive boundaries, truncated
    to the process's range: equal for every shard, in closed form through the normal CDF."""
    spec = make_spec("learned", num_shards=k, method=method, shard_partition="equal_mass")
    shared = _shared(spec)
    b = shard_bounds(spec, shared)
    cdf = torch.special.ndtr((_log_snr(spec, shared, b) - EQUAL_MASS_MEAN) / EQUAL_MASS_STD)
    mass = cdf[1:] - cdf[:-1]
    assert float((mass - mass.mean()).abs().max()) < 1e-3 * float(cdf[-1] - cdf[0])
    if method == "noprop_fm":  # full support: the masses are 1/K
        assert torch.allclose(mass, torch.full((k,), 1.0 / k, dtype=torch.float64), atol=1e-9)
    # the distribution's mode (lambda = 2.4) lies toward the clean end: the noisy shards are the wide ones
    widths = b[1:] - b[:-1]
    assert float(widths[0]) > float(widths[-1])


def test_overlap_widens_training_intervals_but_not_the_chains_switch_points():
    spec = make_spec("learned", num_shards=4, method="noprop_fm", shard_partition="uniform", shard_overlap=0.25)
    shared = _shared(spec)
    assert shard_interval(spec, 1, shared) == pytest.approx((0.0, 0.3125))  # clipped at 0
    assert shard_interval(spec, 2, shared) == pytest.approx((0.1875, 0.5625))
    assert shard_interval(spec, 4, shared) == pytest.approx((0.6875, 1.0))
    t = sample_times(spec, 2, 4096, torch.Generator().manual_seed(0), shared=shared)
    assert float(t.min()) >= 0.1875 and float(t.max()) <= 0.5625
    assert float(t.min()) < 0.24 and float(t.max()) > 0.51  # reaches into both neighbours
    chain = get_method(spec.method).chain(spec, [build_ct_block(spec, j, 0) for j in range(1, 5)], shared)
    assert chain.shard_bounds() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize("method", METHODS)
def test_chain_and_training_use_the_same_intervals(method):
    """Each inference step's start time lies in the interval its shard trained on (a non-uniform partition)."""
    spec = make_spec("learned", num_shards=3, method=method, shard_partition="equal_mass")
    shared = _shared(spec)
    chain = get_method(method).chain(spec, [build_ct_block(spec, j, 0) for j in range(1, 4)], shared)
    bounds = chain.shard_bounds()
    for steps in (10, 97, 1000):
        for n, s in enumerate(step_shards(steps, 3, bounds)):
            lo, hi = shard_interval(spec, s + 1, shared)
            assert lo <= n / steps < hi or (s == 2 and n / steps <= hi)
    # the training loss of every shard draws its times inside the same interval
    x = torch.randn(64, *spec.image_shape)
    y = torch.randint(0, spec.num_classes, (64,))
    for k in (1, 2, 3):
        gen = torch.Generator().manual_seed(k)
        t = sample_times(spec, k, 64, torch.Generator().manual_seed(k), shared=shared)
        lo, hi = shard_interval(spec, k, shared)
        assert float(t.min()) >= lo and float(t.max()) <= hi
        get_method(method).shard_loss(build_ct_block(spec, k, 0), shared, spec, k, x, y, gen)  # on those times


def test_ct_bounds_follow_the_schedule_as_it_trains():
    spec = make_spec("learned", num_shards=2, method="noprop_ct", shard_partition="log_snr")
    straight, bent = _shared(spec, bend=False), _shared(spec, bend=True)
    assert float(shard_bounds(spec, straight)[1]) == pytest.approx(0.5, abs=0.02)  # near linear at start
    assert abs(float(shard_bounds(spec, bent)[1]) - 0.5) > 0.05


@pytest.mark.parametrize("override,needle", [
    ("model.shard_partition=log-snr", "model.shard_partition: 'log-snr' is not allowed; allowed: uniform, log_snr"),
    ("model.shard_overlap=0.5", "model.shard_overlap: must be in [0, 0.5)"),
    ("model.shard_overlap=-0.1", "model.shard_overlap: must be in [0, 0.5)"),
    ("model.ct_loss_weight=elbo", "model.ct_loss_weight: 'elbo' is not allowed; allowed: snr_prime, sigmoid, flat"),
    ("model.ct_readout=argmax", "model.ct_readout: 'argmax' is not allowed; allowed: head, nearest"),
    ("model.fm_target=noise", "model.fm_target: 'noise' is not allowed; allowed: velocity, endpoint"),
])
def test_bad_partition_keys_are_refused_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.method=noprop_ct", "model.num_shards=2", override])
    assert needle in str(e.value)


def test_fm_bounds_are_closed_form():
    spec = make_spec("learned", num_shards=2, method="noprop_fm", shard_partition="equal_mass")
    assert float(shard_bounds(spec)[1]) == pytest.approx(1 / (1 + math.exp(-EQUAL_MASS_MEAN / 2)), abs=1e-12)

"""The learnable NoProp-CT schedule: direction (noise at t = 0, clean at t = 1), monotone by construction, SNR'."""
import pytest
import torch
from conftest import make_spec

from noprop_dist.core import LearnedSchedule, build_shared
from noprop_dist.core.schedules import G0_INIT, G1_INIT, MIN_GAMMA_RANGE


def _assert_valid(sched: LearnedSchedule, n: int = 20_001, dtype=torch.float64) -> None:
    """On a dense grid of [0, 1]: gamma strictly decreasing, abar in (0, 1) strictly increasing, SNR' > 0,
    endpoints gamma(0) = g1 > g1 - range >= gamma(1) = g0."""
    with torch.no_grad():
        t = torch.linspace(0, 1, n, dtype=dtype)
        gamma, abar, snr_p = sched.gamma(t), sched.abar(t), sched.snr_prime(t)
        g0, g1 = (g.detach() for g in sched.endpoints(dtype))
    assert torch.isfinite(gamma).all() and torch.isfinite(snr_p).all()
    assert (gamma[1:] < gamma[:-1]).all(), "gamma is not strictly decreasing"
    assert ((abar > 0) & (abar < 1)).all(), "abar left (0, 1)"
    assert (abar[1:] > abar[:-1]).all(), "abar is not strictly increasing"
    assert (snr_p > 0).all(), "SNR'(t) is not positive"
    assert float(g1 - g0) >= MIN_GAMMA_RANGE * (1 - 1e-9)
    # g0 + (g1 - g0) * 1 rounds back to g1 only up to the dtype's resolution at |gamma| ~ 5.
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert float(gamma[0]) == pytest.approx(float(g1), abs=tol)
    assert float(gamma[-1]) == pytest.approx(float(g0), abs=tol)


def test_initial_schedule_runs_from_noise_to_clean():
    sched = build_shared(make_spec(method="noprop_ct"), 0).schedule
    _assert_valid(sched)
    _assert_valid(sched, n=1001, dtype=torch.float32)  # also in the training dtype
    with torch.no_grad():
        abar = sched.abar(torch.tensor([0.0, 0.5, 1.0]))
    # t = 0 is (almost) pure noise, t = 1 (almost) the clean label (pitfall 1: direction).
    assert float(abar[0]) == pytest.approx(torch.sigmoid(torch.tensor(-G1_INIT)).item(), rel=1e-5)
    assert float(abar[2]) == pytest.approx(torch.sigmoid(torch.tensor(-G0_INIT)).item(), rel=1e-5)
    assert float(abar[0]) < 0.01 and float(abar[2]) > 0.99 and 0.3 < float(abar[1]) < 0.7


def _break_monotone(sched, t):  # rewards gamma increasing in t: the exact opposite of the construction
    # (gamma(t) - gamma(t')) (t' - t) > 0 for every pair while gamma decreases; minimising it pushes it below 0.
    return (sched.gamma(t) - sched.gamma(t.flip(0))).mul(t.flip(0) - t).mean()


def _break_snr_prime(sched, t):  # rewards a negative or vanishing SNR'
    return sched.snr_prime(t).mean() + (sched.gamma(torch.ones(1)) - sched.gamma(torch.zeros(1))).sum() * -1


def _break_endpoints(sched, t):  # rewards g0 -> g1 and a flat, step-like gtilde, on a log scale (no saturation)
    g0, g1 = sched.endpoints()
    return torch.log(g1 - g0) + sched.gamma_prime(t).abs().log().mean()


@pytest.mark.parametrize("attack", [_break_monotone, _break_snr_prime, _break_endpoints])
def test_schedule_survives_hostile_training(attack):
    """Adam with a large learning rate on losses that reward breaking monotonicity: the raw parameters move a
    lot, the schedule stays valid because validity is built into the parametrisation."""
    sched = LearnedSchedule()
    before = {n: p.detach().clone() for n, p in sched.named_parameters()}
    opt = torch.optim.Adam(sched.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        t = torch.rand(64, generator=gen)
        opt.zero_grad()
        attack(sched, t).backward()
        opt.step()
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in sched.named_parameters())
    assert moved > 10, "the attack did not move the parameters: the test would prove nothing"
    _assert_valid(sched)


def test_snr_prime_matches_finite_difference():
    sched = LearnedSchedule()
    with torch.no_grad():  # a non-trivial shape: bigger sigmoid weights than at initialisation
        sched.c_raw.add_(3.0)
        sched.w_raw.add_(2.0)
    t = torch.tensor([0.01, 0.2, 0.37, 0.5, 0.81, 0.99], dtype=torch.float64)
    h = 1e-6
    with torch.no_grad():
        fd = (sched.snr(t + h) - sched.snr(t - h)) / (2 * h)
        fd_gamma = (sched.gamma(t + h) - sched.gamma(t - h)) / (2 * h)
        assert torch.allclose(sched.snr_prime(t), fd, rtol=1e-6)
        assert torch.allclose(sched.gamma_prime(t), fd_gamma, rtol=1e-6)
        # SNR(t) = abar / (1 - abar) = exp(-gamma)
        ab = sched.abar(t)
        assert torch.allclose(sched.snr(t), ab / (1 - ab), rtol=1e-9)


def test_snr_prime_is_differentiable_in_the_schedule_parameters():
    sched = LearnedSchedule()
    sched.snr_prime(torch.rand(16)).sum().backward()
    for name, p in sched.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_shared_state_holds_schedule_only_for_ct():
    names = {m: {n for n, _ in build_shared(make_spec(method=m), 0).named_parameters()}
             for m in ("noprop_dt", "noprop_ct", "noprop_fm")}
    assert names["noprop_dt"] == names["noprop_fm"] == {"embed", "head.weight", "head.bias"}
    assert names["noprop_ct"] - names["noprop_dt"] == {f"schedule.{n}" for n, _ in LearnedSchedule().named_parameters()}
    # Deterministic from the seed; embed and head equal DT's (the schedule is built after them).
    a, b = build_shared(make_spec(method="noprop_ct"), 3), build_shared(make_spec(method="noprop_ct"), 3)
    dt = build_shared(make_spec(method="noprop_dt"), 3)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    for n, p in dt.state_dict().items():
        assert torch.equal(p, a.state_dict()[n]), n

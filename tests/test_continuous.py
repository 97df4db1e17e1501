"""NoProp-CT / NoProp-FM with time shards: losses (direction, isolation, anchor, one softmax), ODE integration,
and the inference chain (label-blind, shard switching, samplers, caching, save / load)."""
import inspect
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_spec

from noprop_dist.core import (
    CTBlock,
    CTChain,
    DTSchedule,
    build_ct_block,
    build_shared,
    class_logits,
    ct_shard_loss,
    euler_integrate,
    fm_path,
    fm_shard_loss,
    shard_interval,
    step_shards,
)
from noprop_dist.core.chain_file import load_chain_file
from noprop_dist.core.paths import denoised_estimate
from noprop_dist.core.schedules import ct_chain_coefficients
from noprop_dist.registry import get_method

EMBEDDINGS = ["one_hot", "learned", "prototype"]


class _Probe(CTBlock):
    """A shard network that records what it is given (t, z) and what it returns."""

    def __init__(self, spec, tag=None):
        super().__init__(spec)
        self.tag, self.calls = tag, []

    def forward_features(self, h_x, z, t):
        out = super().forward_features(h_x, z, t)
        self.calls.append({"t": t.detach().clone(), "z": z.detach().clone(), "logits": out.detach().clone()})
        return out


def _probe(spec, k, seed=0, tag=None):
    p = _Probe(spec, tag)
    p.load_state_dict(build_ct_block(spec, k, seed).state_dict())
    return p


def _parts(method, embedding="learned", num_blocks=2, class_prob="softmax", seed=0, **kw):
    spec = make_spec(embedding, num_shards=num_blocks, class_prob=class_prob, method=method, **kw)
    proto = torch.randn(spec.num_classes, spec.embed_dim, generator=torch.Generator().manual_seed(9)) \
        if embedding == "prototype" else None
    return spec, build_shared(spec, seed, proto), [build_ct_block(spec, k, seed) for k in range(1, num_blocks + 1)]


def _batch(spec, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *spec.image_shape), generator=g), torch.randint(0, spec.num_classes, (n,), generator=g)


# ------------------------------------------------------------------ losses


@pytest.mark.parametrize("method", ["noprop_ct", "noprop_fm"])
@pytest.mark.parametrize("embedding", EMBEDDINGS)
def test_shard_loss_reaches_only_its_network_and_shared_state(method, embedding):
    spec, shared, nets = _parts(method, embedding)
    x, y = _batch(spec)
    total, _ = get_method(method).shard_loss(nets[0], shared, spec, 1, x, y, torch.Generator().manual_seed(0))
    total.backward()
    assert all(p.grad is None for p in nets[1].parameters()), "shard 2 received a gradient from shard 1's loss"
    own = [p.grad for p in nets[0].parameters()]
    assert all(g is not None for g in own) and sum(float(g.abs().sum()) for g in own) > 0
    grads = {n: p.grad for n, p in shared.named_parameters()}
    learnable = embedding != "one_hot"
    assert ("embed" in grads) == learnable  # one_hot: a fixed buffer
    if learnable:
        assert float(grads["embed"].abs().sum()) > 0
    if method == "noprop_ct":
        assert float(grads["head.weight"].abs().sum()) > 0  # the CE at t = 1
        schedule_grads = {n: g for n, g in grads.items() if n.startswith("schedule.")}
        assert schedule_grads and all(g is not None and float(g.abs().sum()) > 0 for g in schedule_grads.values()), \
            "the CT loss does not train the learned schedule"
    else:  # FM: the head is trained by the anchor only, which exists only for learnable embeddings
        assert (grads["head.weight"] is not None) == learnable


@pytest.mark.parametrize("method", ["noprop_ct", "noprop_fm"])
def test_each_shard_draws_times_inside_its_interval(method):
    spec, shared, _ = _parts(method, "one_hot", num_blocks=4)
    x, y = _batch(spec, n=256)
    for k in range(1, 5):
        lo, hi = shard_interval(spec, k)
        assert (lo, hi) == ((k - 1) / 4, k / 4)
        probe = _probe(spec, k)
        get_method(method).shard_loss(probe, shared, spec, k, x, y, torch.Generator().manual_seed(k))
        t = probe.calls[0]["t"]
        assert float(t.min()) >= lo and float(t.max()) <= hi
        assert float(t.max() - t.min()) > 0.8 * (hi - lo)  # spread over the interval, not one value


# model.ct_loss_weight -> w(t) from the schedule, written independently of the implementation's forms
CT_WEIGHTS = {
    "snr_prime": lambda s, t: s.snr_prime(t),
    "sigmoid": lambda s, t: s.snr_prime(t) / (1 + s.snr(t)),  # Kingma & Gao's sigmoid(lambda) times the ELBO's
    "flat": lambda s, t: (s.snr_prime(t) / s.snr(t)),  # d log SNR / dt
}


@pytest.mark.parametrize("weight", list(CT_WEIGHTS))
def test_ct_loss_samples_z_t_from_the_learned_marginal_and_weights_it(weight):
    """Replays the generator: z_t = sqrt(abar(t)) u_y + sqrt(1 - abar(t)) eps (pitfall 6) and
    denoise = eta/2 mean w(t) ||u_hat - u_y||^2 (w = SNR'(t), the paper's, by default); the CE and KL use abar(1)
    and abar(0)."""
    spec, shared, _ = _parts("noprop_ct", "learned", num_blocks=2, ct_loss_weight=weight)
    probe = _probe(spec, 2)
    x, y = _batch(spec)
    total, denoise = ct_shard_loss(probe, shared, spec, 2, x, y, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = 0.5 + 0.5 * torch.rand(16, generator=g)
    eps = torch.randn(16, spec.embed_dim, generator=g)
    eps1 = torch.randn(16, spec.embed_dim, generator=g)
    with torch.no_grad():
        sched, u = shared.schedule, shared.embed[y]
        ab = sched.abar(t)
        z_t = ab.sqrt()[:, None] * u + (1 - ab).sqrt()[:, None] * eps
        call = probe.calls[0]
        assert torch.allclose(call["t"], t) and torch.allclose(call["z"], z_t, atol=1e-6)
        u_hat = torch.softmax(call["logits"], 1) @ shared.embed
        expected = spec.eta / 2 * (CT_WEIGHTS[weight](sched, t) * (u_hat - u).pow(2).sum(1)).mean()
        assert float(denoise) == pytest.approx(float(expected), rel=1e-5)
        ab0, ab1 = sched.abar(torch.tensor([0.0, 1.0]))
        z1 = ab1.sqrt() * u + (1 - ab1).sqrt() * eps1
        ce = F.cross_entropy(shared.head(z1), y)
        kl = 0.5 * ab0 * u.pow(2).sum(1).mean()
        assert float(total) == pytest.approx(float(denoise + ce + kl), rel=1e-5)


def test_fm_path_and_target_closed_form():
    g = torch.Generator().manual_seed(0)
    z0, z1, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g), torch.rand(8, generator=g)
    z_t, target = fm_path(z0, z1, t)
    assert torch.allclose(z_t, z0 + t[:, None] * (z1 - z0)) and torch.equal(target, z1 - z0)
    ends, _ = fm_path(z0, z1, torch.zeros(8))
    assert torch.equal(ends, z0)  # t = 0 is noise ...
    ends, _ = fm_path(z0, z1, torch.ones(8))
    assert torch.allclose(ends, z1)  # ... and t = 1 the label embedding


@pytest.mark.parametrize("embedding", EMBEDDINGS)
def test_fm_loss_replayed(embedding):
    """FM: z_0 ~ N(0, I), z_1 = u_y, z_t on the line, v = logits @ W_embed (no softmax), no eta; the anchor
    -log p_out(y | z_t + (1 - t) v) only for learnable embeddings."""
    spec, shared, _ = _parts("noprop_fm", embedding, num_blocks=2)
    probe = _probe(spec, 1)
    x, y = _batch(spec)
    total, denoise = fm_shard_loss(probe, shared, spec, 1, x, y, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    t = 0.5 * torch.rand(16, generator=g)
    z0 = torch.randn(16, spec.embed_dim, generator=g)
    with torch.no_grad():
        z1 = shared.embed[y]
        call = probe.calls[0]
        assert torch.allclose(call["z"], t[:, None] * z1 + (1 - t[:, None]) * z0, atol=1e-6)
        v = call["logits"] @ shared.embed
        assert float(denoise) == pytest.approx(float((v - (z1 - z0)).pow(2).sum(1).mean()), rel=1e-5)
        if embedding == "one_hot":
            assert torch.equal(total, denoise)
        else:
            z1_hat = call["z"] + (1 - t[:, None]) * v
            anchor = F.cross_entropy(shared.head(z1_hat), y)
            assert float(total - denoise) == pytest.approx(float(anchor), rel=1e-5)
            assert float(anchor) > 0.1


@pytest.mark.parametrize("embedding", ["one_hot", "learned"])
def test_fm_endpoint_loss_replayed(embedding):
    """model.fm_target=endpoint: the network names the class, z1_hat = softmax(logits) @ W_embed, and the
    denoising loss is ||z1_hat - z_1||^2 (the velocity error times (1 - t)^2, without its blow-up at t -> 1);
    the anchor reads the same z1_hat."""
    spec, shared, _ = _parts("noprop_fm", embedding, num_blocks=2, fm_target="endpoint")
    probe = _probe(spec, 1)
    x, y = _batch(spec)
    total, denoise = fm_shard_loss(probe, shared, spec, 1, x, y, torch.Generator().manual_seed(2))
    with torch.no_grad():
        z1 = shared.embed[y]
        z1_hat = torch.softmax(probe.calls[0]["logits"], 1) @ shared.embed
        assert float(denoise) == pytest.approx(float((z1_hat - z1).pow(2).sum(1).mean()), rel=1e-5)
        if embedding == "one_hot":
            assert torch.equal(total, denoise)
        else:
            anchor = F.cross_entropy(shared.head(z1_hat), y)
            assert float(total - denoise) == pytest.approx(float(anchor), rel=1e-5)


def test_fm_endpoint_chain_follows_the_field_and_lands_on_the_last_prediction():
    """With fm_target=endpoint the Euler step is z + (z1_hat - z) / ((1 - t) N): a plain loop reproduces the
    chain, and the last step (t = (N - 1) / N) lands exactly on the last network's z1_hat."""
    chain = _chain("noprop_fm", "learned", num_blocks=2, fm_target="endpoint")
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    steps = 10
    out = chain(x, torch.Generator().manual_seed(0), steps=steps)
    embed, nets = chain.shared.embed, chain.blocks
    z = torch.randn(5, embed.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n in range(steps):
            t = n / steps
            z1_hat = torch.softmax(nets[0 if t < 0.5 else 1](z, x, torch.full((5,), t)), 1) @ embed
            z = z + (z1_hat - z) / ((1 - t) * steps)
        assert torch.allclose(z, z1_hat, atol=1e-5)
        ref = torch.log_softmax(-torch.cdist(z, embed).pow(2), 1)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("method", ["noprop_ct", "noprop_fm"])
@pytest.mark.parametrize("class_prob", ["softmax", "radial"])
def test_cross_entropy_applies_softmax_once_cifar100(method, class_prob):
    """CIFAR-100 shapes (pitfall 5): the CE term equals F.cross_entropy on class_logits, and a second softmax
    would give a clearly different value (about log 100 whatever the input)."""
    spec, shared, _ = _parts(method, "learned", num_blocks=2, class_prob=class_prob,
                             image_shape=(3, 32, 32), num_classes=100)
    spec = replace(spec, radial_sigma=0.1)  # radial scores spread too (softmax ignores sigma)
    with torch.no_grad():  # confident, spread class scores: one softmax and two then differ by a lot
        shared.head.weight.mul_(30.0)
    probe = _probe(spec, 2)
    x, y = _batch(spec, n=8)
    gen_seed = 4
    total, denoise = get_method(method).shard_loss(probe, shared, spec, 2, x, y,
                                                   torch.Generator().manual_seed(gen_seed))
    with torch.no_grad():
        u = shared.embed[y]
        if method == "noprop_ct":
            g = torch.Generator().manual_seed(gen_seed)
            torch.rand(8, generator=g)
            torch.randn(8, spec.embed_dim, generator=g)
            eps1 = torch.randn(8, spec.embed_dim, generator=g)
            ab0, ab1 = shared.schedule.abar(torch.tensor([0.0, 1.0]))
            z = ab1.sqrt() * u + (1 - ab1).sqrt() * eps1
            rest = 0.5 * ab0 * u.pow(2).sum(1).mean()
        else:
            call = probe.calls[0]
            z = call["z"] + (1 - call["t"][:, None]) * (call["logits"] @ shared.embed)
            rest = 0.0
        scores = class_logits(shared, z, class_prob, spec.radial_sigma)
        ce = float(total - denoise - rest)
        assert ce == pytest.approx(float(F.cross_entropy(scores, y)), rel=1e-4, abs=1e-5)
        double = float(F.cross_entropy(torch.softmax(scores, 1), y))
        assert abs(ce - double) > 0.5, (ce, double)


# ------------------------------------------------------------------ ODE integration


def test_euler_integrates_a_constant_field_exactly():
    z0 = torch.randn(4, 3, dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    for steps in (1, 7, 100):
        assert torch.allclose(euler_integrate(lambda z, t, n: c.expand_as(z), z0, steps), z0 + c)


def test_euler_converges_on_a_linear_field():
    """dz/dt = A z: z(1) = z0 expm(A)^T; Euler is first order, so 4x the steps gives about 1/4 the error."""
    A = torch.tensor([[0.0, 1.0], [-1.0, -0.2]], dtype=torch.float64)
    z0 = torch.tensor([[1.0, 0.0], [0.3, -2.0]], dtype=torch.float64)
    exact = z0 @ torch.linalg.matrix_exp(A).T
    errors = [float((euler_integrate(lambda z, t, n: z @ A.T, z0, s) - exact).abs().max()) for s in (25, 100, 400)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3
    assert 3.0 < errors[0] / errors[1] < 5.0 and 3.0 < errors[1] / errors[2] < 5.0


def test_euler_passes_grid_times_and_step_index():
    seen = []
    euler_integrate(lambda z, t, n: seen.append((t, n)) or torch.zeros_like(z), torch.zeros(1), 4)
    assert seen == [(0.0, 0), (0.25, 1), (0.5, 2), (0.75, 3)]


# ------------------------------------------------------------------ the chain


def _chain(method, embedding="learned", num_blocks=2, class_prob="softmax", probes=False, seed=0, **kw):
    spec, shared, nets = _parts(method, embedding, num_blocks, class_prob, seed=seed, **kw)
    if probes:
        nets = [_probe(spec, k, seed, tag=k) for k in range(1, num_blocks + 1)]
    return get_method(method).chain(spec, nets, shared).eval()


SAMPLERS = [("noprop_ct", "eq3"), ("noprop_ct", "mean"), ("noprop_ct", "ode"), ("noprop_fm", None)]


def test_step_shards_switch_at_interval_boundaries():
    assert step_shards(10, 3) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert step_shards(4, 4) == [0, 1, 2, 3] and step_shards(5, 1) == [0] * 5
    for steps, k in [(1000, 3), (1000, 7), (99, 4)]:
        shards = step_shards(steps, k)
        for n, s in enumerate(shards):  # start time n/N lies in [s/K, (s+1)/K)
            assert s / k <= n / steps < (s + 1) / k


@pytest.mark.parametrize("method,sampler", SAMPLERS)
def test_each_step_runs_the_network_of_its_interval(method, sampler):
    chain = _chain(method, "one_hot", num_blocks=3, probes=True)
    chain(torch.randn(5, 1, 8, 8), torch.Generator().manual_seed(0), steps=10, sampler=sampler)
    times = {net.tag: [round(float(c["t"][0]), 6) for c in net.calls] for net in chain.blocks}
    assert times == {1: [0.0, 0.1, 0.2, 0.3], 2: [0.4, 0.5, 0.6], 3: [0.7, 0.8, 0.9]}


@pytest.mark.parametrize("method,sampler", SAMPLERS)
def test_replacing_one_shard_changes_the_trajectory_only_from_its_interval_on(method, sampler):
    """K = 2, N = 8: a different network for shard 2 leaves the inputs of steps 0..4 unchanged (step 4, the first
    of shard 2, still gets shard 1's output) and changes every later one."""
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    runs = []
    for seed2 in (0, 1):
        chain = _chain(method, "learned", num_blocks=2, probes=True)
        other = _probe(chain.spec, 2, seed=seed2, tag=2)
        chain.blocks[1] = other
        chain(x, torch.Generator().manual_seed(0), steps=8, sampler=sampler)
        runs.append([c["z"] for net in chain.blocks for c in net.calls])
    for n in range(8):
        same = torch.equal(runs[0][n], runs[1][n])
        assert same == (n <= 4), f"step {n}: inputs {'equal' if same else 'differ'}"


def test_chain_takes_no_labels():
    """No parameter of the sampling path can carry a label (that no network input depends on the labels an
    evaluation is given is tested for every block and method in test_blocks.py)."""
    chain = _chain("noprop_ct", "learned")
    assert list(inspect.signature(chain.forward).parameters) == ["x", "generator", "sampler", "draws", "trace",
                                                                 "z0", "steps"]
    for method in ("noprop_dt", "noprop_ct", "noprop_fm"):
        for sampler in get_method(method).chain.samplers.values():
            assert list(inspect.signature(sampler).parameters) == ["chain", "x", "z0", "generator", "steps",
                                                                   "draws", "trace"], sampler.__name__


@pytest.mark.parametrize("method,sampler", SAMPLERS)
@pytest.mark.parametrize("embedding,class_prob", [("one_hot", "softmax"), ("learned", "radial"),
                                                  ("prototype", "softmax")])
def test_chain_outputs_log_probabilities(method, sampler, embedding, class_prob):
    chain = _chain(method, embedding, class_prob=class_prob)
    out = chain(torch.randn(7, 1, 8, 8), torch.Generator().manual_seed(0), steps=12, sampler=sampler)
    assert out.shape == (7, 10) and torch.isfinite(out).all()
    assert torch.allclose(out.exp().sum(1), torch.ones(7, dtype=out.dtype), atol=1e-5)
    pred = chain.predict(torch.randn(7, 1, 8, 8), torch.Generator().manual_seed(0), steps=12, sampler=sampler)
    assert pred.shape == (7,) and pred.dtype == torch.int64


@pytest.mark.parametrize("method,sampler", SAMPLERS)
def test_cached_image_features_match_a_plain_reference_sampler(method, sampler):
    """The chain (features computed once per network, vectorised coefficients) against a naive loop calling
    net(z, x, t) at every step; the CT chain's coefficients come from the DT code (DTSchedule on the grid)."""
    chain = _chain(method, "learned", num_blocks=2)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    steps = 10
    out = chain(x, torch.Generator().manual_seed(0), steps=steps, sampler=sampler)
    g = torch.Generator().manual_seed(0)
    embed, nets = chain.shared.embed, chain.blocks
    z = torch.randn(5, embed.shape[1], generator=g)
    with torch.no_grad():
        abar = chain.shared.schedule.abar(torch.arange(steps + 1, dtype=torch.float64) / steps) \
            if method == "noprop_ct" else None
        for n in range(steps):
            t = n / steps
            logits = nets[0 if t < 0.5 else 1](z, x, torch.full((5,), t))
            if method == "noprop_fm":
                z = z + (logits @ embed) / steps
                continue
            u_hat = denoised_estimate(logits, embed)
            if sampler in ("eq3", "mean"):
                a, b, c = DTSchedule(abar).posterior_coefficients(n + 1)
                z = a * u_hat + b * z + (math.sqrt(c) * torch.randn(z.shape, generator=g) if sampler == "eq3" else 0)
            else:
                ab0, ab1 = float(abar[n]), float(abar[n + 1])
                eps = (z - math.sqrt(ab0) * u_hat) / math.sqrt(1 - ab0)
                z = math.sqrt(ab1) * u_hat + math.sqrt(1 - ab1) * eps
        if method == "noprop_fm":
            ref = torch.log_softmax(-torch.cdist(z, embed).pow(2), 1)
        else:
            ref = torch.log_softmax(class_logits(chain.shared, z, "softmax", 1.0), 1)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("sampler", ["eq3", "mean", "ode"])
def test_ct_samplers_run_from_noise_to_the_predicted_class(sampler):
    """A network that always predicts class 3: the CT chain must end near u_3 (t = 1 is the clean end); with
    an identity head (one-hot) the prediction is 3 for every input. A reversed chain would end in noise."""
    chain = _chain("noprop_ct", "one_hot", num_blocks=2)
    with torch.no_grad():
        for net in chain.blocks:
            last = net.fuse[-1]
            last.weight.zero_()
            last.bias.fill_(-20.0)
            last.bias[3] = 20.0
        chain.shared.head.weight.copy_(torch.eye(10))
        chain.shared.head.bias.zero_()
    out = chain(torch.randn(64, 1, 8, 8), torch.Generator().manual_seed(0), steps=50, sampler=sampler)
    assert (out.argmax(1) == 3).all()
    # log_softmax of z_N itself: z_N close to e_3 means its class-3 score is far above the rest.
    assert float(out[:, 3].exp().mean()) > 0.15


@pytest.mark.parametrize("method,sampler,embedding", [("noprop_ct", "eq3", "learned"),
                                                      ("noprop_ct", "ode", "prototype"),
                                                      ("noprop_fm", None, "one_hot"),
                                                      ("noprop_fm", None, "learned")])
def test_save_load_round_trip(tmp_path, method, sampler, embedding):
    chain = _chain(method, embedding, num_blocks=2)
    x = torch.randn(9, 1, 8, 8)
    before = chain(x, torch.Generator().manual_seed(3), steps=15, sampler=sampler)
    path = str(tmp_path / "chain.pt")
    chain.save(path, extra={"note": "x"})
    payload = torch.load(path, weights_only=True)
    assert payload["method"] == method and payload["spec"]["method"] == method
    loaded, extra = load_chain_file(path)
    assert extra == {"note": "x"} and not loaded.training
    after = loaded(x, torch.Generator().manual_seed(3), steps=15, sampler=sampler)
    assert torch.equal(before, after)
    assert torch.equal(loaded.predict(x, torch.Generator().manual_seed(3), steps=15, sampler=sampler),
                       before.argmax(1))


def test_chain_rejects_wrong_shapes_and_samplers():
    spec, shared, nets = _parts("noprop_ct", num_blocks=3)
    with pytest.raises(ValueError, match="3 shard networks"):
        CTChain(spec, nets[:2], shared)
    chain = CTChain(spec, nets, shared).eval()
    with pytest.raises(ValueError, match="sampler 'rk4' does not apply to a noprop_ct chain; allowed: eq3, mean, "
                                         "ensemble, ode"):
        chain(torch.randn(2, 1, 8, 8), steps=3, sampler="rk4")
    for other in ("noprop_dt", "noprop_fm"):  # each method's chain is its own class
        with pytest.raises(ValueError, match=f"a CTChain is not the chain of model.method={other}"):
            CTChain(make_spec(num_shards=3, method=other), nets, shared)


def test_chain_coefficients_are_the_dt_posterior():
    abar = torch.tensor([0.01, 0.2, 0.5, 0.9, 0.99], dtype=torch.float64)
    a, b, c = ct_chain_coefficients(abar)
    dt = DTSchedule(abar)
    for n in range(4):
        assert (float(a[n]), float(b[n]), float(c[n])) == pytest.approx(dt.posterior_coefficients(n + 1), rel=1e-12)
    assert (c >= 0).all()


def test_network_reads_time_through_the_sinusoidal_embedding():
    from noprop_dist.core import sinusoidal_time_embedding

    t = torch.tensor([0.0, 0.5, 0.501, 1.0])
    emb = sinusoidal_time_embedding(t)
    assert emb.shape == (4, 64) and torch.equal(emb[0], torch.cat([torch.zeros(32), torch.ones(32)]))
    assert float((emb[1] - emb[2]).norm()) > 0.5  # neighbouring steps of a 1000-step grid stay apart
    spec, _, nets = _parts("noprop_ct", "learned")
    net = nets[0].eval()
    x, z = torch.randn(3, 1, 8, 8), torch.randn(3, spec.embed_dim)
    with torch.no_grad():
        assert not torch.allclose(net(z, x, torch.full((3,), 0.1)), net(z, x, torch.full((3,), 0.4)))


@pytest.mark.parametrize("method", ["noprop_ct", "noprop_fm"])
def test_image_batch_norm_keeps_eval_features_per_example_and_round_trips(tmp_path, method):
    """model.image_batch_norm: a BatchNorm after the image path, trained on batch statistics; in eval mode an
    example's features do not depend on its batch, and a saved chain brings the running statistics back, with
    the partition and loss-weight keys of its spec."""
    spec, shared, _ = _parts(method, "learned", num_blocks=2, image_batch_norm=True, shard_partition="equal_mass",
                             shard_overlap=0.1)
    nets = [build_ct_block(spec, k, 0) for k in (1, 2)]
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in nets[0].image_path.modules())
    x = torch.randn(32, 1, 8, 8)
    for net in nets:  # train mode: running statistics move away from (0, 1)
        net.train()
        net.encode_image(x * 3 + 1)
    chain = get_method(method).chain(spec, nets, shared).eval()
    alone = chain.blocks[0].encode_image(x[:1])
    assert torch.allclose(alone, chain.blocks[0].encode_image(x)[:1], atol=1e-5)
    before = chain(x, torch.Generator().manual_seed(3), steps=12)
    path = str(tmp_path / "chain.pt")
    chain.save(path)
    loaded, _ = load_chain_file(path)
    assert loaded.spec.image_batch_norm and loaded.spec.shard_partition == "equal_mass"
    assert torch.equal(before, loaded(x, torch.Generator().manual_seed(3), steps=12))


@pytest.mark.parametrize("readout", ["head", "nearest"])
def test_ct_readout_is_the_head_or_the_nearest_class_embedding(readout):
    """model.ct_readout: the head (Eq. 14) reads z_1 through f_out; nearest picks the class embedding closest to
    z_1, whatever the head says. The head is rigged to answer the class after the nearest one."""
    spec, shared, nets = _parts("noprop_ct", "learned", num_blocks=2, ct_readout=readout)
    chain = CTChain(spec, nets, shared).eval()
    emb = shared.embed.detach()
    with torch.no_grad():  # head(z) = scores of the embeddings rolled by one class
        shared.head.weight.copy_(emb.roll(1, dims=0) * 50)
        shared.head.bias.zero_()
    z = emb[torch.arange(10)] + 0.01 * torch.randn(10, spec.embed_dim, generator=torch.Generator().manual_seed(0))
    pred = chain.readout(z).argmax(1)
    nearest = torch.cdist(z, emb).argmin(1)
    assert torch.equal(nearest, torch.arange(10))
    if readout == "nearest":
        assert torch.equal(pred, nearest)
        assert torch.allclose(chain.readout(z).exp().sum(1), torch.ones(10))  # log-probabilities
    else:
        assert torch.equal(pred, (torch.arange(10) + 1) % 10)

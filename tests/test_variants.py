"""core.variants: one dispatch on spec.method. DT goes exactly through the DT code; CT and FM learn digits."""
import time
from dataclasses import replace

import pytest
import torch
from conftest import make_spec

from noprop_dist.core import (
    ContinuousChain,
    CTBlock,
    DTBlock,
    DTChain,
    DTSchedule,
    build_block,
    build_ct_block,
    build_shared,
    objectives,
    prototype_embedding,
    variants,
)
from noprop_dist.data import normalize


def _batch(spec, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *spec.image_shape), generator=g), torch.randint(0, spec.num_classes, (n,), generator=g)


@pytest.mark.parametrize("embedding", ["one_hot", "learned", "prototype"])
def test_dt_dispatch_is_the_dt_code(embedding):
    """Same initial weights, the same loss values and gradients, the same chain outputs as calling DT directly."""
    spec = make_spec(embedding, num_shards=3)
    proto = torch.randn(spec.num_classes, spec.embed_dim) if embedding == "prototype" else None
    shared = build_shared(spec, 0, proto)
    x, y = _batch(spec)
    for k in (1, 2, 3):
        net = variants.build_shard(spec, k, 0)
        ref = build_block(spec, k, 0)
        assert type(net) is DTBlock
        for (n, p), (_, q) in zip(net.state_dict().items(), ref.state_dict().items()):
            assert torch.equal(p, q), n
        net.train(), ref.train()
        torch.manual_seed(k)  # dropout masks
        got = variants.shard_loss(net, shared, spec, k, x, y, torch.Generator().manual_seed(k))
        torch.manual_seed(k)
        want = objectives.shard_loss(ref, shared, spec, DTSchedule.cosine(3, spec.abar_max), k, x, y,
                                     torch.Generator().manual_seed(k))
        assert [float(v.detach()) for v in got] == [float(v.detach()) for v in want]
    chain = variants.build_chain(spec, [build_block(spec, k, 0).state_dict() for k in (1, 2, 3)], shared.state_dict())
    ref_chain = DTChain.from_states(spec, [build_block(spec, k, 0).state_dict() for k in (1, 2, 3)],
                                    shared.state_dict())
    assert type(chain) is DTChain and not chain.training
    xs = torch.randn(6, 1, 8, 8)
    assert torch.equal(chain(xs, torch.Generator().manual_seed(1)), ref_chain(xs, torch.Generator().manual_seed(1)))


def test_dispatch_builds_the_right_networks_and_chains():
    for method, net_type, chain_type in [("noprop_dt", DTBlock, DTChain), ("noprop_ct", CTBlock, ContinuousChain),
                                         ("noprop_fm", CTBlock, ContinuousChain)]:
        spec = make_spec("learned", num_shards=2, method=method)
        nets = [variants.build_shard(spec, k, 5) for k in (1, 2)]
        assert all(type(n) is net_type for n in nets)
        chain = variants.build_chain(spec, [n.state_dict() for n in nets], build_shared(spec, 5).state_dict())
        assert type(chain) is chain_type and not chain.training
    bad = replace(make_spec(), method="noprop_xx")
    with pytest.raises(ValueError, match="unknown method"):
        variants.build_chain(bad, [variants.build_shard(bad, 1, 0).state_dict()], build_shared(bad, 0).state_dict())


def test_ct_shards_are_deterministic_and_distinct():
    spec = make_spec("learned", num_shards=2, method="noprop_ct")
    a, b, c = build_ct_block(spec, 1, 0), variants.build_shard(spec, 1, 0), build_ct_block(spec, 2, 0)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.fuse[0].weight, c.fuse[0].weight)


@pytest.mark.parametrize("method", ["noprop_dt", "noprop_ct", "noprop_fm"])
def test_load_chain_reads_every_method(tmp_path, method):
    spec = make_spec("learned", num_shards=2, method=method)
    nets = [variants.build_shard(spec, k, 0) for k in (1, 2)]
    chain = variants.build_chain(spec, [n.state_dict() for n in nets], build_shared(spec, 0).state_dict())
    path = str(tmp_path / "chain.pt")
    chain.save(path, extra={"epoch": 3})
    loaded, extra = variants.load_chain(path)
    assert extra == {"epoch": 3} and type(loaded) is type(chain)
    x = torch.randn(4, 1, 8, 8)
    kw = {} if method == "noprop_dt" else {"steps": 6}
    assert torch.equal(loaded(x, torch.Generator().manual_seed(0), **kw), chain(x, torch.Generator().manual_seed(0), **kw))


def test_load_chain_reads_old_dt_files_without_method(tmp_path):
    """Chain files written before CT / FM existed: no "method" in the payload nor in the spec."""
    spec = make_spec("one_hot", num_shards=2)
    chain = DTChain(spec, [build_block(spec, k, 0) for k in (1, 2)], build_shared(spec, 0)).eval()
    path = str(tmp_path / "old.pt")
    chain.save(path)
    payload = torch.load(path, weights_only=True)
    for key in ("method", "inference_steps", "sampler", "ensemble_draws"):
        payload["spec"].pop(key)
    payload.pop("method", None)
    torch.save(payload, path)
    loaded, _ = variants.load_chain(path)
    x = torch.randn(4, 1, 8, 8)
    assert type(loaded) is DTChain
    assert torch.equal(loaded(x, torch.Generator().manual_seed(0)), chain(x, torch.Generator().manual_seed(0)))


def _train(spec, digits, steps: int, seed: int = 0):
    """In-process NoProp with K shards: every step, each shard's own loss (on its own batch) reaches its own
    network and the shared state; one Adam over everything equals per-shard optimisers plus a parameter server
    that sums the shared gradients."""
    x = normalize(torch.from_numpy(digits.train_x), digits.mean, digits.std)
    y = torch.from_numpy(digits.train_y).long()
    proto = prototype_embedding(x, y, spec.num_classes) if spec.embedding == "prototype" else None
    shared = build_shared(spec, seed, proto)
    nets = [variants.build_shard(spec, k, seed) for k in range(1, spec.num_shards + 1)]
    params = list(shared.parameters()) + [p for n in nets for p in n.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        for k, net in enumerate(nets, 1):
            idx = torch.randint(0, x.shape[0], (64,), generator=gen)
            total, _ = variants.shard_loss(net, shared, spec, k, x[idx], y[idx], gen)
            total.backward()
        opt.step()
    return variants.build_chain(spec, [n.state_dict() for n in nets], shared.state_dict())


@pytest.mark.parametrize("method,embedding,steps,samplers", [("noprop_ct", "learned", 500, ("eq3", "mean", "ode")),
                                                             ("noprop_fm", "learned", 200, (None,))])
def test_tiny_training_learns_digits(digits, method, embedding, steps, samplers):
    """K = 2 shards, Adam lr 1e-3, eta 1 as in the paper's CT / FM runs, 100 inference steps: clearly above
    chance (10%) on the held-out digits.

    CT needs more steps than FM: its loss weight SNR'(t) is largest at the clean end, where z_t gives the label
    away, and smallest at mid noise, where the chain decides the class and shard 2 must read the image (with
    K = 2 that is the start of shard 2's interval). Measured (seed 0): CT 57% after 300 steps, 87% after 500;
    FM about 97% after 300."""
    spec = replace(make_spec(embedding, num_shards=2, method=method), eta=1.0, dropout=0.0)
    start = time.perf_counter()
    chain = _train(spec, digits, steps=steps)
    x = normalize(torch.from_numpy(digits.test_x), digits.mean, digits.std)
    y = torch.from_numpy(digits.test_y).long()
    for sampler in samplers:
        acc = float((chain.predict(x, torch.Generator().manual_seed(1), steps=100, sampler=sampler) == y)
                    .float().mean())
        print(f"{method} {embedding} {sampler}: test accuracy {acc:.3f} ({time.perf_counter() - start:.1f}s)")
        assert acc > 0.5, (method, sampler, acc)

"""Losses: direction of the noise levels, gradient isolation between blocks, one softmax before the CE."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_spec

from noprop_dist.config import TrainConfig
from noprop_dist.core import (
    DTBlock,
    DTSchedule,
    block_loss,
    build_block,
    build_shared,
    class_logits,
    dt_shard_loss,
    shared_loss,
)
from noprop_dist.training import ShardTrainer
from noprop_dist.training.shared_state import (
    LocalClient,
    SharedReplica,
    SharedStateServer,
)


def _batch(spec, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *spec.image_shape), generator=g)
    y = torch.randint(0, spec.num_classes, (n,), generator=g)
    return x, y


@pytest.mark.parametrize("embedding", ["one_hot", "learned", "prototype"])
def test_block_loss_reaches_only_its_block_and_shared_state(embedding):
    spec = make_spec(embedding, num_shards=3)
    proto = torch.randn(spec.num_classes, spec.embed_dim) if embedding == "prototype" else None
    shared = build_shared(spec, 0, proto)
    blocks = [build_block(spec, t, 0) for t in (1, 2, 3)]
    x, y = _batch(spec)
    total, _ = dt_shard_loss(blocks[1], shared, spec, 2, x, y, torch.Generator().manual_seed(0))
    total.backward()
    for other in (blocks[0], blocks[2]):
        assert all(p.grad is None for p in other.parameters()), "another block received a gradient"
    own = [p.grad for p in blocks[1].parameters()]
    assert all(g is not None for g in own)
    assert sum(float(g.abs().sum()) for g in own) > 0
    shared_grads = {n: p.grad for n, p in shared.named_parameters()}
    assert shared_grads["head.weight"] is not None and float(shared_grads["head.weight"].abs().sum()) > 0
    if embedding != "one_hot":
        assert float(shared_grads["embed"].abs().sum()) > 0
    else:
        assert "embed" not in shared_grads  # the fixed identity is a buffer


def test_trainer_step_changes_only_its_own_block_and_the_shared_replica():
    spec = make_spec("learned", num_shards=2)
    train = TrainConfig(seed=0)
    t1, t2 = (ShardTrainer(spec, t, train, torch.device("cpu")) for t in (1, 2))
    server = SharedStateServer(spec, 0)
    replica = SharedReplica(spec, train, LocalClient(server), torch.device("cpu"))
    replica.begin_epoch()
    before1, before2 = copy.deepcopy(t1.block.state_dict()), copy.deepcopy(t2.block.state_dict())
    before_shared = copy.deepcopy(replica.shared.state_dict())
    x, y = _batch(spec)
    loss, found_inf = t1.step(x, y, replica)
    assert float(loss) > 0 and float(found_inf) == 0.0
    for k, v in t2.block.state_dict().items():
        assert torch.equal(v, before2[k]), f"block 2's {k} changed while block 1 trained"
    assert any(not torch.equal(v, before1[k]) for k, v in t1.block.state_dict().items())
    # The step applies block 1's shared-state gradient to the worker's replica, every shared parameter of it.
    assert all(not torch.equal(v, before_shared[k]) for k, v in replica.shared.state_dict().items())
    # The server hears of it only through an exchange.
    assert all(torch.equal(v, before_shared[k]) for k, v in server.shared.state_dict().items())
    replica.exchange((0, 1), 1, last=True)
    assert server.version == 1
    assert all(torch.allclose(v, replica.shared.state_dict()[k], rtol=0, atol=1e-7)
               for k, v in server.shared.state_dict().items())


class _Probe(DTBlock):
    """A block that records the noisy label it is given."""

    def forward(self, z, x):
        self.seen = z.detach().clone()
        return super().forward(z, x)


def test_block_t_trains_at_noise_level_abar_t_minus_1():
    """Block 1 sees pure noise (abar_0 = 0); block T sees z_{T-1}, close to the clean u_y (pitfall 1)."""
    spec = make_spec("one_hot", num_shards=10)
    shared = build_shared(spec, 0)
    schedule = DTSchedule.cosine(10)
    x = torch.zeros((4000, *spec.image_shape))
    y = torch.randint(0, 10, (4000,), generator=torch.Generator().manual_seed(1))
    u = shared.embed[y]
    probe = _Probe(spec).eval()
    for t in (1, 10):
        block_loss(probe, shared, schedule, t, x, y, spec.eta, torch.Generator().manual_seed(t))
        z = probe.seen
        corr = float(F.cosine_similarity(z.flatten(), u.flatten(), dim=0))
        ab = float(schedule.abar[t - 1])
        # E[z . u] / (|z||u|) for z = sqrt(ab) u + sqrt(1 - ab) e with one-hot u (|u| = 1) and d = 10.
        expected = ab**0.5 / (ab + (1 - ab) * 10) ** 0.5
        assert corr == pytest.approx(expected, abs=0.03), (t, corr, expected)
    assert expected > 0.85  # block T really sees a nearly clean label


@pytest.mark.parametrize("class_prob", ["softmax", "radial"])
def test_shared_loss_applies_one_softmax_before_its_cross_entropy(class_prob):
    """Pitfall 5: the DT head's loss is -log of ONE softmax of the class scores. shared_loss is recomputed by
    hand from the same noise draws (z_T = sqrt(abar_T) u_y + sqrt(1 - abar_T) eps); a softmax applied to the
    scores before the cross-entropy changes its value (and squashes it towards log m)."""
    spec = make_spec("learned", class_prob=class_prob)
    shared = build_shared(spec, 0)
    with torch.no_grad():  # a confident head: one softmax and two then give clearly different values
        shared.head.weight.mul_(20.0)
    schedule = DTSchedule.cosine(spec.num_shards)
    y = torch.arange(32) % 10
    loss = shared_loss(shared, schedule, y, class_prob, 0.1, torch.Generator().manual_seed(5))
    with torch.no_grad():
        u_y = shared.embed[y]
        eps = torch.randn(u_y.shape, generator=torch.Generator().manual_seed(5))
        ab_T, ab_0 = schedule.abar_values[-1], schedule.abar_values[0]
        scores = class_logits(shared, ab_T**0.5 * u_y + (1 - ab_T) ** 0.5 * eps, class_prob, 0.1)
        p_y = scores.exp()[torch.arange(32), y] / scores.exp().sum(1)
        manual = -p_y.log().mean() + 0.5 * ab_0 * u_y.pow(2).sum(1).mean()
        squashed = F.cross_entropy(torch.softmax(scores, 1), y) + 0.5 * ab_0 * u_y.pow(2).sum(1).mean()
    assert float(loss) == pytest.approx(float(manual), rel=1e-5)
    assert abs(float(squashed) - float(manual)) > 0.05  # the check above can tell the two apart


def test_radial_probability_favours_nearest_embedding():
    spec = make_spec("learned", class_prob="radial")
    shared = build_shared(spec, 0)
    with torch.no_grad():  # a head that outputs a large logit for class 3 whatever z is
        shared.head.weight.zero_()
        shared.head.bias.zero_()
        shared.head.bias[3] = 50.0
    scores = class_logits(shared, torch.randn(5, spec.embed_dim), "radial", 1.0)
    assert (scores.argmax(1) == 3).all()


def test_kl_term_uses_abar_0_and_shared_loss_is_finite():
    spec = make_spec("learned")
    shared = build_shared(spec, 0)
    y = torch.arange(10)
    loss = shared_loss(shared, DTSchedule.cosine(4), y, "softmax", 1.0, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and float(loss) > 0

"""The block contract: every registered block (fig6, resnet) and a user's own (tests/custom_block.py) through the
same guarantees: gradient isolation, label-blind evaluation, the chain file, and the check that stops a run
whose block breaks the contract with one line."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import replace

import pytest
import torch
from conftest import make_spec
from custom_block import TinyDT, tiny_block
from torch import nn

from noprop_dist.config import ConfigError, load_config
from noprop_dist.core import (
    BlockError,
    BlockSpec,
    DTSchedule,
    build_block,
    build_chain,
    build_ct_block,
    build_shard,
    build_shared,
    evaluate_chain,
    load_chain_file,
)
from noprop_dist.core.block_check import check_block
from noprop_dist.core.chain_file import read_chain_file
from noprop_dist.data import normalize
from noprop_dist.registry import BLOCKS, get_method

METHODS = ["noprop_dt", "noprop_ct", "noprop_fm"]
# Every registered block and one the package does not ship: a new registry entry is tested the day it is added.
BLOCK_CASES = [*BLOCKS.names(), "custom"]


def spec_for(block: str, method: str = "noprop_dt", embedding: str = "learned", num_shards: int = 3, **fields):
    spec = make_spec(embedding, num_shards=num_shards, method=method, **fields)
    if block == "custom":
        return replace(spec, block="custom_block:tiny_block", block_factory=tiny_block)
    return replace(spec, block=block)


def _batch(spec, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *spec.image_shape), generator=g), torch.randint(0, spec.num_classes, (n,), generator=g)


def _shared(spec, seed=0):
    proto = torch.randn(spec.num_classes, spec.embed_dim) if spec.embedding == "prototype" else None
    return build_shared(spec, seed, proto)


def test_the_registry_lists_fig6_first_and_the_config_takes_names_and_import_paths():
    assert BLOCKS.names()[:2] == ("fig6", "resnet")
    assert load_config(None).model.block == "fig6"
    assert load_config(None, ["model.block=resnet"]).model.block == "resnet"
    assert load_config(None, ["model.block=my_pkg.blocks:make_block"]).model.block == "my_pkg.blocks:make_block"
    with pytest.raises(ConfigError, match=r"model.block: 'resnet18' is not allowed; allowed: fig6, resnet, or an "
                                          r"import path package.module:factory"):
        load_config(None, ["model.block=resnet18"])


@pytest.mark.parametrize("method", METHODS)
def test_fig6_through_its_factory_builds_the_very_networks_of_before(method):
    """Runs with the default block are unchanged: same networks, same initial weights for the same seed."""
    spec = spec_for("fig6", method)
    direct = build_block if method == "noprop_dt" else build_ct_block
    for k in (1, 3):
        a, b = build_shard(spec, k, 7), direct(spec, k, 7)
        assert type(a) is type(b)
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(v, b.state_dict()[n]) for n, v in a.state_dict().items())


@pytest.mark.parametrize("block", BLOCK_CASES)
@pytest.mark.parametrize("method", METHODS)
def test_every_block_passes_the_check_a_run_makes_and_builds_reproducibly(block, method):
    spec = spec_for(block, method)
    x, _ = _batch(spec, n=2)
    check_block(spec, x, seed=3)
    a, b, other = build_shard(spec, 2, 3), build_shard(spec, 2, 3), build_shard(spec, 3, 3)
    assert all(torch.equal(v, b.state_dict()[n]) for n, v in a.state_dict().items())  # a function of (seed, k)
    assert any(not torch.equal(v, other.state_dict()[n]) for n, v in a.state_dict().items() if v.is_floating_point())


# ------------------------------------------------------------------ gradient isolation


def _grad_norms(module: nn.Module) -> list[float | None]:
    return [None if p.grad is None else float(p.grad.abs().sum()) for p in module.parameters()]


@pytest.mark.parametrize("block", BLOCK_CASES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("embedding", ["learned", "prototype", "one_hot"])
def test_a_shard_loss_reaches_its_network_and_the_shared_state_only(block, method, embedding):
    spec = spec_for(block, method, embedding, num_shards=3)
    shared, nets = _shared(spec), [build_shard(spec, k, 0) for k in (1, 2, 3)]
    x, y = _batch(spec)
    total, _ = get_method(method).shard_loss(nets[1], shared, spec, 2, x, y, torch.Generator().manual_seed(0))
    total.backward()
    for other in (nets[0], nets[2]):
        assert all(g is None for g in _grad_norms(other)), "another shard's network received a gradient"
    own = _grad_norms(nets[1])
    assert sum(g or 0.0 for g in own) > 0 and sum(g is not None for g in own) > len(own) // 2


@pytest.mark.parametrize("block", BLOCK_CASES)
@pytest.mark.parametrize("method", METHODS)
def test_the_denoising_term_itself_trains_the_label_embedding(block, method):
    """Not only the CE and KL terms: the shard's own denoising term must reach W_embed (and CT's schedule).
    A loss that detaches W_embed in it trains the embedding from the shared terms alone and still passes an
    isolation test that backpropagates the total; this one fails on it. For DT the gradient is compared with a
    replay of the loss from the block's recorded output."""
    spec = spec_for(block, method, "learned")
    shared, net = _shared(spec), build_shard(spec, 2, 0)
    calls: list[tuple] = []
    net.register_forward_hook(lambda mod, args, out: calls.append((args, out)))
    x, y = _batch(spec)
    _, denoise = get_method(method).shard_loss(net, shared, spec, 2, x, y, torch.Generator().manual_seed(0))
    params = {"embed": shared.embed} | {n: p for n, p in shared.named_parameters() if n.startswith("schedule.")}
    grads = dict(zip(params, torch.autograd.grad(denoise, list(params.values()), retain_graph=True,
                                                 allow_unused=True)))
    for name, g in grads.items():
        assert g is not None and float(g.abs().sum()) > 0, f"the denoising term does not reach {name}"
    if method == "noprop_dt":
        schedule = DTSchedule.cosine(spec.num_shards, spec.abar_max)
        (_, logits), = calls
        u_hat = torch.softmax(logits, dim=1) @ shared.embed
        replay = spec.eta * spec.num_shards / 2 * schedule.loss_weight(2) * (u_hat - shared.embed[y]).pow(2).sum(1).mean()
        assert float(replay.detach()) == pytest.approx(float(denoise.detach()), rel=1e-6)
        (want,) = torch.autograd.grad(replay, [shared.embed])
        assert torch.allclose(grads["embed"], want, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------ label-blind evaluation


def _recording(method, seen: list[torch.Tensor]):
    def call(*args):
        seen.extend(a.detach().clone() for a in args)
        return method(*args)

    return call


@pytest.mark.parametrize("block", BLOCK_CASES)
@pytest.mark.parametrize("method", METHODS)
def test_no_network_input_depends_on_the_labels_evaluation_is_given(digits, block, method):
    """Every input of every shard network during an evaluation (z_0 and every z_t, x, t) is recorded under
    labels that agree with the predictions and under labels that disagree with all of them: they must be equal
    bit for bit. Comparing predictions of an untrained chain would not do: a chain that built z_0 from the label
    gives nearly the same predictions (its first block learned, or happens, to ignore z_0)."""
    spec = spec_for(block, method, "learned", image_shape=digits.image_shape, num_shards=2)
    chain = build_chain(spec, [build_shard(spec, k, 0).state_dict() for k in (1, 2)], _shared(spec).state_dict())
    seen: list[torch.Tensor] = []
    for net in chain.blocks:
        net.register_forward_pre_hook(lambda mod, args: seen.extend(a.detach().clone() for a in args))
        for name in ("encode_image", "forward_features"):  # the split forward the CT / FM samplers use
            if hasattr(net, name):
                setattr(net, name, _recording(getattr(net, name), seen))
    x, y = torch.from_numpy(digits.test_x[:96]), torch.from_numpy(digits.test_y[:96])
    kw = {} if method == "noprop_dt" else {"steps": 6}

    def run(labels):
        seen.clear()
        acc, preds = evaluate_chain(chain, x, labels, 32, 7, lambda b: normalize(b, digits.mean, digits.std), **kw)
        return acc, preds, list(seen)

    _, preds, inputs = run(y)
    acc_agree, preds_agree, inputs_agree = run(preds.clone())
    acc_disagree, preds_disagree, inputs_disagree = run((preds + 1) % 10)
    assert inputs and len(inputs) == len(inputs_agree) == len(inputs_disagree)
    for a, b, c in zip(inputs, inputs_agree, inputs_disagree, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c), "a network's input changed with the labels"
    assert torch.equal(preds, preds_agree) and torch.equal(preds, preds_disagree)
    assert (acc_agree, acc_disagree) == (1.0, 0.0)


# ------------------------------------------------------------------ the chain file


@pytest.mark.parametrize("block", BLOCK_CASES)
@pytest.mark.parametrize("method", METHODS)
def test_the_chain_file_records_the_block_and_rebuilds_it(tmp_path, block, method):
    spec = spec_for(block, method, num_shards=2)
    chain = build_chain(spec, [build_shard(spec, k, 0).state_dict() for k in (1, 2)], _shared(spec).state_dict())
    chain.save(str(tmp_path / "chain.pt"))
    saved, _ = read_chain_file(str(tmp_path / "chain.pt"))
    assert saved.block == spec.block and saved.block_factory is None
    loaded, _ = load_chain_file(str(tmp_path / "chain.pt"))  # custom: imported by its path, custom_block:tiny_block
    x = torch.randn(5, *spec.image_shape)
    kw = {} if method == "noprop_dt" else {"steps": 5}
    assert torch.equal(loaded(x, torch.Generator().manual_seed(0), **kw), chain(x, torch.Generator().manual_seed(0), **kw))


def test_a_chain_whose_block_cannot_be_imported_names_the_module(tmp_path):
    for block, needle in [("no_such_pkg.blocks:make", "cannot import module 'no_such_pkg.blocks' (ModuleNotFoundError"),
                          ("custom_block:gone", "module 'custom_block' has no attribute 'gone'"),
                          ("__main__:make_block", "pass it again, load_chain(run_dir, block=fn)")]:
        spec = replace(spec_for("custom", num_shards=2), block=block)
        chain = build_chain(spec, [build_shard(spec, k, 0).state_dict() for k in (1, 2)], _shared(spec).state_dict())
        path = str(tmp_path / "chain.pt")
        chain.save(path)
        with pytest.raises(ValueError) as e:
            load_chain_file(path)
        assert needle in str(e.value) and "\n" not in str(e.value) and path in str(e.value)
        loaded, _ = load_chain_file(path, block=tiny_block)  # the factory itself, as load_chain(block=) takes it
        assert isinstance(loaded.blocks[0], TinyDT)


# ------------------------------------------------------------------ the check before a run


class _Frozen(nn.Module):
    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.lin = nn.Linear(spec.embed_dim, spec.num_classes)

    def forward(self, z, x):
        return self.lin(z).detach()


class _WrongWidth(TinyDT):
    def forward(self, z, x):
        return super().forward(z, x)[:, :3]


class _Nan(TinyDT):
    def __init__(self, spec):
        super().__init__(spec)
        with torch.no_grad():
            self.net[0].weight[0, 0] = float("nan")


class _Split(nn.Module):
    """Offers the split forward the CT samplers use, but it disagrees with forward."""

    def __init__(self, spec):
        super().__init__()
        self.inner = tiny_block(spec)

    def forward(self, z, x, t):
        return self.inner(z, x, t)

    def encode_image(self, x):
        return x

    def forward_features(self, h, z, t):
        return self.inner(z, h, t) + 1.0


def _raises(spec):
    raise RuntimeError("out of GPUs")


BAD = {  # case: (factory or import path, method, what the line must say)
    "no module": ("no_such_pkg.blocks:make", "noprop_dt", "cannot import module 'no_such_pkg.blocks'"),
    "no attribute": ("custom_block:missing", "noprop_dt", "module 'custom_block' has no attribute 'missing'"),
    "not callable": ("custom_block:torch", "noprop_dt", "names a module, not a factory function"),
    "no argument": (lambda: TinyDT, "noprop_dt", "the factory must take one argument, a noprop_dist BlockSpec"),
    "raises": (_raises, "noprop_dt", "the factory raised RuntimeError: out of GPUs building shard 1"),
    "not a module": (lambda spec: 42, "noprop_dt", "the factory returned a int, not a torch.nn.Module"),
    "wrong width": (_WrongWidth, "noprop_dt", "returned torch.float32 (2, 3); expected float class logits (B, m) = (2, 10)"),
    "nan weights": (_Nan, "noprop_dt", "non-finite initial values in net.0.weight"),
    "no t": (TinyDT, "noprop_ct", "forward(z, x, t) failed (TypeError"),
    "detached": (_Frozen, "noprop_dt", "do not depend on the network's parameters"),
    "split disagrees": (_Split, "noprop_fm", "forward_features(encode_image(x), z, t) disagrees with its forward"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_block_that_breaks_the_contract_stops_the_run_with_one_line(case):
    factory, method, needle = BAD[case]
    spec = spec_for("custom", method)
    spec = replace(spec, block=factory, block_factory=None) if isinstance(factory, str) else \
        replace(spec, block="tests:" + case.replace(" ", "_"), block_factory=factory)
    x, _ = _batch(spec, n=2)
    with pytest.raises(BlockError) as e:
        check_block(spec, x, seed=0)
    message = str(e.value)
    assert needle in message, message
    assert message.startswith(f"model.block={spec.block}: ") and "\n" not in message and len(message) < 400
    assert isinstance(e.value, ConfigError)  # the entry points print it as one line, exit code 2


def test_a_bad_block_on_the_command_line_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from noprop_dist.run import main

    (tmp_path / "my_blocks.py").write_text("def make(spec):\n    raise ValueError('width must be even')\n")
    monkeypatch.chdir(tmp_path)  # found as python -m would find it: from the working directory
    for block, needle in [("my_blocks:make", "the factory raised ValueError: width must be even"),
                          ("my_blockz:make", "cannot import module 'my_blockz'")]:
        rc = main(["--set", f"model.block={block}", f"run.dir={tmp_path / 'run'}", "data.train_limit=100"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"error: model.block={block}: ") and needle in err, err
        assert err.count("\n") == 1
        assert not (tmp_path / "run").exists()


def test_the_resnet_block_learns_digits_in_process(digits):
    """A short in-process NoProp-DT run with the shipped alternative block: clearly above chance (10 %)."""
    from noprop_dist.training import evaluate_states, model_spec, train_in_process

    cfg = load_config(None, ["model.block=resnet", "model.num_blocks=3", "train.epochs=3", "train.batch_size=64",
                             "model.dropout=0"])
    blocks, shared, _ = train_in_process(cfg, digits, device="cpu")
    _, acc = evaluate_states(model_spec(cfg, digits.image_shape, digits.num_classes), digits, blocks, shared, 1000, 0)
    print(f"resnet, digits, 3 epochs: {acc:.4f}")
    assert acc > 0.6, acc


def test_the_fig6_pool_gives_nn_maxpool2ds_values_and_gradients_in_the_layout_it_got():
    """core.blocks.MaxPool pools a CPU NCHW batch through channels-last while the chain is evaluated, a faster
    kernel: in and out of evaluation_pooling the values must be nn.MaxPool2d's bit for bit, as must the
    gradients of a channels-last batch (the training loop's), and the layout that comes out the one that went
    in."""
    from noprop_dist.core.blocks import MaxPool, evaluation_pooling

    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(8, 32, 28, 28, generator=g))  # ReLU's zeros: windows with ties
    for scoped in (False, True):
        for layout in (torch.contiguous_format, torch.channels_last):
            a = x.clone(memory_format=layout).requires_grad_()
            b = x.clone(memory_format=layout).requires_grad_()
            with evaluation_pooling() if scoped else contextlib.nullcontext():
                out, ref = MaxPool(2)(a), nn.MaxPool2d(2)(b)
            assert torch.equal(out, ref) and out.is_contiguous(memory_format=layout)
            w = torch.randn(ref.shape, generator=g)
            (out * w).sum().backward()
            (ref * w).sum().backward()
            if layout == torch.channels_last:
                assert torch.equal(a.grad, b.grad)
    assert any(isinstance(m, MaxPool) for m in build_shard(make_spec(image_shape=(1, 28, 28)), 1, 0).modules())


def test_fig6_blocks_batched_with_vmap_compute_what_they_compute_one_after_another():
    """torch.func.vmap over stacked Fig. 6 blocks (benchmarks/gpu_check.py part 8) on the CPU: vmap cannot query
    a channels-last layout, so the max pool must not look for one outside the chain's evaluation. Forward with
    and without gradients, and the gradients, equal the blocks run one after another."""
    spec = make_spec(image_shape=(1, 28, 28))
    blocks = [build_shard(spec, k, 0).eval() for k in (1, 2)]  # eval: BatchNorm's running statistics
    params, buffers = torch.func.stack_module_state(blocks)
    base = copy.deepcopy(blocks[0]).to("meta")
    g = torch.Generator().manual_seed(0)
    z, x = torch.randn(4, spec.embed_dim, generator=g), torch.randn(4, 1, 28, 28, generator=g)

    def one(p, b, z, x):
        return torch.func.functional_call(base, (p, b), (z, x))

    batched = torch.func.vmap(one, in_dims=(0, 0, None, None))
    with torch.no_grad():
        assert torch.allclose(batched(params, buffers, z, x), torch.stack([m(z, x) for m in blocks]), atol=1e-5)
    batched(params, buffers, z, x).sum().backward()
    sum(m(z, x).sum() for m in blocks).backward()
    for name, grad in ((n, p.grad) for n, p in params.items()):
        expected = torch.stack([dict(m.named_parameters())[name].grad for m in blocks])
        assert torch.allclose(grad, expected, atol=1e-4), name

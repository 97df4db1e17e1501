"""The shard loop at accelerator speed: one fused finiteness check, skipped steps on the device, no host sync
per step, batches gathered where the data sits, bf16 autocast. The GPU-only paths run here on the CPU."""
import copy
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import make_spec
from torch.utils._python_dispatch import TorchDispatchMode

from noprop_dist.config import TrainConfig, load_config
from noprop_dist.core import build_chain, evaluate_chain, randn_like
from noprop_dist.data import load_dataset, normalize
from noprop_dist.training import (
    ShardTrainer,
    ShardGroup,
    TrainingData,
    model_spec,
    nonfinite,
    resolve_precision,
)
from noprop_dist.training.shared_state import (
    LocalClient,
    SharedReplica,
    SharedStateServer,
)

CPU = torch.device("cpu")


def _trainer_and_replica(spec, train=None):
    train = train or TrainConfig(seed=0)
    replica = SharedReplica(spec, train, LocalClient(SharedStateServer(spec, 0)), CPU)
    replica.begin_epoch()
    return ShardTrainer(spec, 1, train, CPU), replica


def _batch(spec, n=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn((n, *spec.image_shape), generator=g), torch.randint(0, spec.num_classes, (n,), generator=g)


@pytest.mark.parametrize("where", ["loss", "grad"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_flags_a_bad_loss_or_any_bad_gradient(where, bad):
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(4)]
    for p in params:
        p.grad = torch.ones(3)
    params[1].grad = None  # a parameter the loss did not reach
    loss = torch.tensor(2.0)
    assert float(nonfinite(loss, params)) == 0.0
    if where == "loss":
        loss = torch.tensor(bad)
    else:
        params[3].grad[2] = bad
    assert float(nonfinite(loss, params)) == 1.0
    assert torch.equal(params[0].grad, torch.ones(3))  # the check leaves the gradients as they are


def test_a_nonfinite_step_changes_neither_the_block_nor_its_optimizer_nor_the_shared_replica():
    spec = make_spec("learned", num_shards=2)
    trainer, replica = _trainer_and_replica(spec)
    x, y = _batch(spec)
    trainer.step(x, y, replica)  # a good step first: the optimizers have state to protect
    block, opt = copy.deepcopy(trainer.block.state_dict()), copy.deepcopy(trainer.optimizer.state_dict())
    shared, shared_opt = replica.flat.clone(), copy.deepcopy(replica.optimizer.state_dict())
    x_bad = x.clone()
    x_bad[0, 0, 0, 0] = float("nan")
    loss, found_inf = trainer.step(x_bad, y, replica)
    assert not bool(torch.isfinite(loss)) and float(found_inf) == 1.0
    for k, v in trainer.block.state_dict().items():
        if k.endswith("num_batches_tracked") or "running" in k:
            continue  # BatchNorm's statistics move in the forward pass; a rollback restores them
        assert torch.equal(v, block[k]), k
    assert torch.equal(replica.flat, shared), "a NaN step reached the shared replica"
    for before, now in ((opt, trainer.optimizer.state_dict()), (shared_opt, replica.optimizer.state_dict())):
        for i, st in before["state"].items():
            for k, v in st.items():
                assert torch.equal(now["state"][i][k], v), f"optimizer state {i}.{k} moved"


class _HostSyncs(TorchDispatchMode):
    """Counts the ops that copy one value to the host (``.item()``, ``float(t)``, ``bool(t)``) and those that
    bring host data into a step (``torch.tensor([...])``: on a GPU a copy to the device, which waits)."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

    def __init__(self):
        super().__init__()
        self.count, self.uploads = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.count += 1
        elif func == torch.ops.aten.lift_fresh.default:
            self.uploads += 1
        return func(*args, **(kwargs or {}))


class _OnGPU(torch.Tensor):
    """A CPU tensor that reports cuda:0 as its device and turns into a plain CPU tensor only when copied there:
    what a worker's optimizer state is on a GPU, on a machine with none. Pickling one keeps its device, as a
    real CUDA tensor's pickle does (and a driver without CUDA then fails to load it)."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype, strides=data.stride(),
                                                device=torch.device("cuda", 0))
        t.host = data
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        unwrap = lambda a: a.host if isinstance(a, _OnGPU) else a  # noqa: E731
        out = func(*torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs))
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") == CPU:
            return out
        return torch.utils._pytree.tree_map(lambda a: _OnGPU(a) if isinstance(a, torch.Tensor) else a, out)


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def test_worker_states_leave_on_the_cpu_whatever_device_trained_them():
    """Checkpoints, optimizer and replica states are unpickled on the driver, which may have no GPU (a KubeRay
    head): every tensor in them must be a plain CPU tensor even when the worker's live state is on a GPU."""
    spec = make_spec("learned", num_shards=2)
    data = load_dataset("digits", train_limit=64)
    group = ShardGroup(spec, [1, 2], TrainConfig(seed=0, batch_size=32), data.train_x, data.train_y, data.mean,
                       data.std, LocalClient(SharedStateServer(spec, 0)))
    group.train_epoch(0)
    live = [group.replica.optimizer.state]
    for tr in group.trainers.values():
        live.append(tr.optimizer.state)
        for module in tr.block.modules():  # buffers (BatchNorm's statistics) too
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = _OnGPU(buf)
    for state in live:
        for per_param in state.values():
            for k, v in per_param.items():
                if isinstance(v, torch.Tensor):
                    per_param[k] = _OnGPU(v)
    assert any(isinstance(t, _OnGPU) for t in _tensors([dict(s) for s in live]))
    out = [group.state_dicts(), group.replica.state_dict()]
    tensors = list(_tensors(out))
    assert tensors and all(type(t) is torch.Tensor and t.device == CPU for t in tensors), \
        sorted({str(t.device) for t in tensors})


@pytest.mark.parametrize("method,extra", [
    ("noprop_dt", []),
    ("noprop_ct", ["model.num_shards=2"]),
    ("noprop_ct", ["model.num_shards=2", "model.shard_partition=log_snr", "model.shard_overlap=0.2"]),
    ("noprop_fm", ["model.num_shards=2", "model.shard_partition=equal_mass", "model.shard_overlap=0.2"]),
])
def test_an_epoch_reads_no_single_value_back_per_step(method, extra):
    """A step at accelerator speed takes milliseconds: a read of one value (or a small upload) per step stalls
    it on the device. CT's and FM's steps are covered too: they built a (2,) tensor from a Python list and read a
    bool back every step."""
    cfg = load_config(None, [f"model.method={method}", "model.num_blocks=2", "train.batch_size=64",
                             "train.sync_every=3", *extra])
    data = load_dataset("digits", train_limit=640)
    spec = model_spec(cfg, data.image_shape, data.num_classes)
    group = ShardGroup(spec, [1, 2], cfg.train, data.train_x, data.train_y, data.mean, data.std,
                       LocalClient(SharedStateServer(spec, 0)))
    group.train_epoch(0)  # what is built once (DT's schedule, cached) is built here, not counted below
    with _HostSyncs() as syncs:
        stats = group.train_epoch(1)
    assert stats[1]["total_steps"] == 20 and np.isfinite(stats[1]["loss"])
    # The losses and flags come back once per exchange (tolist), not value by value.
    assert syncs.count == 0, f"{syncs.count} single-value reads in an epoch of 20 shard steps"
    assert syncs.uploads == 0, f"{syncs.uploads} tensors built from host data in an epoch of 20 shard steps"


def test_batches_are_gathered_from_the_placed_set_as_from_the_arrays():
    data = load_dataset("digits", train_limit=300)
    placed = TrainingData(data.train_x, data.train_y, data.mean, data.std, CPU)
    assert placed.on_device and len(placed) == 300
    idx = torch.tensor([5, 0, 299, 17])
    x, y = placed.batch(idx)
    assert torch.equal(x, normalize(torch.from_numpy(data.train_x[idx.numpy()]), data.mean, data.std))
    assert torch.equal(y, torch.from_numpy(data.train_y[idx.numpy()]).long())


def test_noise_is_drawn_where_the_generator_lives():
    z = torch.empty(4, 3)
    a = randn_like(z, torch.Generator().manual_seed(7))
    b = torch.randn((4, 3), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.device == z.device


def test_evaluation_on_an_explicit_device_gives_the_default_predictions():
    spec = make_spec("learned", num_shards=2)
    trainer, replica = _trainer_and_replica(spec)
    chain = build_chain(spec, [trainer.block.state_dict(), trainer.block.state_dict()], replica.shared.state_dict())
    data = load_dataset("digits", test_limit=64)
    images, labels = torch.from_numpy(np.ascontiguousarray(data.test_x)), torch.from_numpy(data.test_y)
    norm = lambda xb: normalize(xb, data.mean, data.std)  # noqa: E731
    acc_a, pred_a = evaluate_chain(chain, images, labels, 32, 3, norm)
    acc_b, pred_b = evaluate_chain(chain, images, labels, 32, 3, norm, device="cpu")
    assert acc_a == acc_b and torch.equal(pred_a, pred_b)


def _epoch_losses(precision: str, epochs: int = 3) -> tuple[list[dict], ShardGroup]:
    cfg = load_config(None, ["model.num_blocks=10", "train.batch_size=64", f"train.precision={precision}"])
    data = load_dataset("digits", train_limit=640)
    spec = model_spec(cfg, data.image_shape, data.num_classes)
    group = ShardGroup(spec, [1, 10], cfg.train, data.train_x, data.train_y, data.mean, data.std,
                       LocalClient(SharedStateServer(spec, 0)))
    return [{t: s["last_epoch_mean_loss"] for t, s in group.train_epoch(e).items()} for e in range(epochs)], group


def test_bf16_training_lowers_the_loss_like_fp32_and_keeps_fp32_weights():
    bf16, group = _epoch_losses("bf16")
    fp32, _ = _epoch_losses("fp32")
    # Block 10's denoising term dominates its loss; block 1's is mostly the shared CE, which falls slowly.
    assert bf16[-1][10] < 0.2 * bf16[0][10] and bf16[-1][1] < bf16[0][1], bf16
    assert bf16 != fp32, "autocast changed nothing: bf16 is not in effect"
    assert all(abs(b[t] - f[t]) < 0.1 * f[t] for b, f in zip(bf16, fp32) for t in (1, 10)), (bf16, fp32)
    assert all(p.dtype == torch.float32 for t in (1, 10) for p in group.trainers[t].block.parameters())
    assert group.replica.flat.dtype == torch.float32


def test_precision_is_checked():
    with pytest.raises(Exception, match="train.precision: 'fp16' is not allowed; allowed: fp32, bf16, auto"):
        load_config(None, ["train.precision=fp16"])


def test_precision_auto_is_bf16_only_where_the_cpu_computes_it_natively():
    """bf16 without AVX512-BF16 or AMX is emulated and slower than fp32 (benchmarks/README.md): ``auto`` must
    not pick it there, and an explicit bf16 there warns. The CPU flags are read here from /proc/cpuinfo,
    independently of torch's capability report that resolve_precision uses."""
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to check against")
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert resolve_precision("auto", CPU) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_precision("bf16", CPU) == "bf16"
    assert bool(caught) != native, [str(w.message) for w in caught]
    trainer, _ = _trainer_and_replica(make_spec(), load_config(None, ["train.precision=auto"]).train)
    assert trainer.bf16 == native

"""The paper's Table 1 baselines (backprop, adjoint, DTP) on the real digits data; run_baseline end to end."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_spec
from torchdiffeq import odeint

from noprop_dist.baselines import run_baseline
from noprop_dist.baselines.adjoint import (
    NOISE_LEFT,
    AdjointODE,
    fixed_grid,
    initial_rate,
)
from noprop_dist.baselines.backprop import BackpropChain
from noprop_dist.baselines.dtp import DTPNet, dtp_hyper, dtp_losses
from noprop_dist.baselines.head import HEAD_LOGIT_STD, widen_head
from noprop_dist.baselines.learner import build_learner
from noprop_dist.config import ConfigError, load_config
from noprop_dist.core import build_shared
from noprop_dist.data import load_dataset, normalize
from noprop_dist.storage.summary import RunSummary

SUMMARY_KEYS = {"method", "dataset", "embedding", "num_workers", "epochs", "seed", "test_accuracy", "train_accuracy",
                "train_seconds", "curve", "peak_memory_mb", "peak_memory_kind", "run_dir"}


def _cfg(method: str, *overrides: str):
    return load_config(None, [f"model.method={method}", "data.name=digits", "cluster.num_workers=1", *overrides])


def _batch(digits, n: int = 64):
    idx = np.random.default_rng(0).permutation(len(digits.train_y))[:n]
    return torch.from_numpy(digits.train_x[idx]), torch.from_numpy(digits.train_y[idx])


def _fixed_loss(learner, x, y) -> float:
    """Cross-entropy of the model in eval mode with a fixed z_0: comparable before and after training."""
    return float(F.cross_entropy(learner.logits(x, torch.Generator().manual_seed(5)), y))


def _lowers_loss(learner, x, y, steps: int) -> tuple[float, float]:
    before = _fixed_loss(learner, x, y)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        learner.train_step(x, y, gen)
    return before, _fixed_loss(learner, x, y)


# ----------------------------------------------------------------------------------------------- backprop

@pytest.mark.parametrize("embedding", ["one_hot", "learned", "prototype"])
def test_backprop_lowers_its_loss(digits, embedding):
    cfg = _cfg("backprop", "model.num_blocks=3", f"model.embedding={embedding}", "train.lr=0.005")
    learner = build_learner(cfg, digits, torch.device("cpu"))
    before, after = _lowers_loss(learner, *_batch(digits), steps=12)
    assert after < before - 0.1, (before, after)


def test_backprop_gradient_reaches_the_first_block_from_the_output_loss(digits):
    spec = make_spec("learned", num_shards=3)
    model = BackpropChain(spec, seed=0)
    x, y = _batch(digits, 16)
    logits = model(normalize(x, digits.mean, digits.std), torch.randn(16, spec.embed_dim))
    # One cross-entropy on raw scores: the model returns logits, not probabilities (no double softmax).
    assert not torch.allclose(logits.exp().sum(dim=1), torch.ones(16))
    F.cross_entropy(logits, y).backward()
    for t, block in enumerate(model.blocks, start=1):  # block 1 is reached only through blocks 2..T
        assert all(p.grad is not None for p in block.parameters()), t
        assert sum(float(p.grad.abs().sum()) for p in block.parameters()) > 0, t
    assert model.w.grad is not None and bool((model.w.grad != 0).all())
    assert torch.allclose(model.mixing(), torch.full((3,), 0.5))  # a_t = tanh(w_t) starts at 0.5


# ----------------------------------------------------------------------------------------------- both heads

@pytest.mark.parametrize("embedding", ["one_hot", "learned", "prototype"])
def test_both_baselines_start_with_the_same_logit_spread_at_the_embeddings(embedding):
    """The head is widened by one rule for backprop and adjoint; the blocks' and W_embed's init stay NoProp-DT's."""
    spec = make_spec(embedding)
    protos = torch.randn(spec.num_classes, spec.embed_dim) * 5 if embedding == "prototype" else None
    default = build_shared(spec, 0, protos)
    for model in (BackpropChain(spec, 0, protos), AdjointODE(dataclasses.replace(spec, method="noprop_ct"), 0, protos)):
        shared = model.shared
        assert torch.equal(shared.embed, default.embed) and torch.equal(shared.head.bias, default.head.bias)
        assert torch.allclose(shared.head.weight, default.head.weight * model.head_gain)
        spread = float((shared.embed @ shared.head.weight.T).detach().std())
        assert spread == pytest.approx(HEAD_LOGIT_STD, rel=1e-5)
        if embedding != "prototype":  # embeddings of norm ~1: the default init's logits are far narrower
            assert model.head_gain > 5, model.head_gain
    with pytest.raises(ValueError, match="logit_std"):
        widen_head(default, 0.0)


def test_a_prototype_replica_without_prototypes_keeps_its_head():
    """W_embed all zero (values to come from load_state_dict): nothing to scale by, the head is left alone."""
    spec = make_spec("prototype")
    assert BackpropChain(spec, 0).head_gain == 1.0


# ----------------------------------------------------------------------------------------------- adjoint

@pytest.mark.parametrize("steps", [1, 4, 10, 20, 100])
def test_the_adjoint_starts_at_the_rate_that_leaves_two_to_the_minus_ten_of_the_noise(steps):
    """The model's initial r, solved by its own Euler grid on dz/dt = -r z, scales z_0 by 2^-10 (as a_t = 0.5
    does over the backprop chain's 10 blocks), and each step stays stable (r h < 1)."""
    spec = dataclasses.replace(make_spec("one_hot"), method="noprop_ct", inference_steps=steps)
    rate = float(AdjointODE(spec, seed=0).log_rate.exp())
    assert rate == pytest.approx(initial_rate(steps), rel=1e-6) and rate / steps < 1
    z0 = torch.randn(3, 10, dtype=torch.float64)
    z1 = odeint(lambda t, z: -rate * z, z0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="euler",
                options={"grid_constructor": fixed_grid(steps)})[-1]
    assert torch.allclose(z1, z0 * NOISE_LEFT, rtol=1e-9)
    assert initial_rate(10) == pytest.approx(5.0)  # a_t = 0.5 per step, exactly the backprop chain
    with pytest.raises(ValueError, match="steps"):
        initial_rate(0)


def test_adjoint_lowers_its_loss(digits):
    cfg = _cfg("adjoint", "model.inference_steps=4", "model.embedding=one_hot", "train.lr=0.003")
    learner = build_learner(cfg, digits, torch.device("cpu"))
    before, after = _lowers_loss(learner, *_batch(digits, 32), steps=25)
    assert after < before - 0.5, (before, after)  # measured: 2.540 -> 1.408 (lr 0.02 overshoots: -> 2.987)


@pytest.mark.parametrize("solver, steps, rtol", [("rk4", 32, 1e-3), ("euler", 128, 3e-2)])
def test_adjoint_gradients_match_direct_backprop(solver, steps, rtol):
    """odeint_adjoint's gradients vs back-propagation through odeint's steps, same fixed grid and solver.

    They differ only by the error of solving z backwards in time, which grows with r h (the model's initial rate r
    is 6.2 and 6.7 at these step counts): O((r h)^4) for rk4 (relative error 2.1e-4 measured at 32 steps; tolerance
    1e-3 of the gradient norm), O(r h) for Euler (9.1e-3 at 128 steps; tolerance 3e-2).
    """
    spec = dataclasses.replace(make_spec("learned"), method="noprop_ct", num_shards=1, inference_steps=steps)
    gen = torch.Generator().manual_seed(0)
    x, z0 = torch.randn(5, 1, 8, 8, generator=gen), torch.randn(5, spec.embed_dim, generator=gen)
    y = torch.arange(5)
    grads = []
    for adjoint in (True, False):
        model = AdjointODE(spec, seed=0, solver=solver, adjoint=adjoint).eval()  # eval: dropout off in both
        F.cross_entropy(model(x, z0), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    adj, direct = grads
    assert adj.keys() == direct.keys() and "log_rate" in adj and "block.image_path.proj.0.weight" in adj
    flat_a, flat_d = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (adj, direct))
    assert float((flat_a - flat_d).norm() / flat_d.norm()) < rtol


# ----------------------------------------------------------------------------------------------- DTP

def test_dtp_lowers_its_loss_with_the_papers_network(digits):
    learner = build_learner(_cfg("dtp", "train.lr=0.0148893490317", "train.weight_decay=0"), digits,
                            torch.device("cpu"))
    assert [l.out_features for l in learner.module.forward_layers] == [240] * 7  # Lee et al. 2015, MNIST
    before, after = _lowers_loss(learner, *_batch(digits), steps=10)
    assert after < before - 0.2, (before, after)


def test_dtp_losses_are_layer_local(digits):
    """Each loss reaches its own layer only: the output CE the output layer, the inverse losses the g_l."""
    hyper = dtp_hyper("digits")
    net = DTPNet(64, 10, hidden=(20, 20, 20), seed=0)
    x = torch.from_numpy(digits.train_x[:32]).reshape(32, -1).float() / 255
    y = torch.from_numpy(digits.train_y[:32])
    total, ce, inverse = dtp_losses(net, x, y, hyper, torch.Generator().manual_seed(0))
    inverse.backward(retain_graph=True)
    assert all(p.grad is None for p in [*net.forward_layers.parameters(), *net.out.parameters()])
    assert all(p.grad is not None for p in net.inverse.parameters())
    net.zero_grad(set_to_none=True)
    ce.backward(retain_graph=True)
    assert all(p.grad is None for p in [*net.forward_layers.parameters(), *net.inverse.parameters()])
    net.zero_grad(set_to_none=True)
    total.backward()
    assert all(p.grad is not None for p in net.parameters())
    assert dtp_hyper("cifar10").hidden == (1000, 1000, 1000) and dtp_hyper("mnist", 0.01).forward_lr == 0.01


def test_dtp_needs_a_single_worker(tmp_path):
    cfg = _cfg("dtp", f"run.dir={tmp_path}/r", "cluster.num_workers=2")
    with pytest.raises(ConfigError, match="cluster.num_workers"):
        run_baseline(cfg, log=lambda s: None)


# ----------------------------------------------------------------------------------------------- run_baseline

def test_run_baseline_writes_summary_checkpoints_and_does_not_retrain(tmp_path):
    run_dir = str(tmp_path / "dtp")
    cfg = _cfg("dtp", "train.epochs=2", "train.batch_size=64", "train.lr=0.0148893490317", f"run.dir={run_dir}")
    lines: list[str] = []
    summary = run_baseline(cfg, log=lines.append)
    assert sum("epoch" in ln and "test accuracy" in ln for ln in lines) == 2  # a line per epoch
    with open(os.path.join(run_dir, "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk == summary and SUMMARY_KEYS <= summary.keys()
    assert summary["method"] == "dtp" and summary["dataset"] == "digits" and summary["num_workers"] == 1
    assert set(RunSummary.__annotations__) <= set(summary), "the keys every run's summary has"
    ds = load_dataset(cfg.data.name, cfg.data.root, False, cfg.data.train_limit, cfg.data.test_limit)
    assert summary["train_accuracy_examples"] == len(ds.train_accuracy_subset()[1])
    assert 0.5 < summary["test_accuracy"] <= 1 and 0 <= summary["train_accuracy"] <= 1
    assert [c["epoch"] for c in summary["curve"]] == [1, 2]
    assert summary["curve"][-1]["test_accuracy"] == summary["test_accuracy"]
    assert summary["curve"][-1]["train_seconds"] == summary["train_seconds"] > 0
    assert summary["peak_memory_kind"] == "rss" and summary["peak_memory_mb"] > 0
    ckpts = os.listdir(os.path.join(run_dir, "checkpoints"))
    assert ckpts and all(torch.load(os.path.join(run_dir, "checkpoints", c), weights_only=True) for c in ckpts)

    lines.clear()
    again = run_baseline(cfg, log=lines.append)  # finished: re-evaluated, not retrained
    assert any("not retraining" in ln for ln in lines) and not any("epoch 1/" in ln for ln in lines)
    assert again["test_accuracy"] == summary["test_accuracy"] and again["train_seconds"] == summary["train_seconds"]

    lines.clear()
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3))
    resumed = run_baseline(longer, log=lines.append)  # resumed: only the third epoch trains
    assert any("resuming from epoch 2" in ln for ln in lines) and [c["epoch"] for c in resumed["curve"]] == [1, 2, 3]


def test_run_baseline_backprop_end_to_end(tmp_path):
    cfg = _cfg("backprop", "model.num_blocks=2", "train.epochs=1", "data.train_limit=200", "data.test_limit=100",
               f"run.dir={tmp_path}/bp")
    summary = run_baseline(cfg, log=lambda s: None)
    assert SUMMARY_KEYS <= summary.keys() and summary["method"] == "backprop" and summary["embedding"] == "learned"
    assert len(summary["curve"]) == 1 and 0 <= summary["test_accuracy"] <= 1
    with pytest.raises(ConfigError, match="model.num_blocks"):  # another model in the same run.dir is refused
        run_baseline(_cfg("backprop", "model.num_blocks=3", "train.epochs=1", "data.train_limit=200",
                          "data.test_limit=100", f"run.dir={tmp_path}/bp"), log=lambda s: None)


def test_a_long_baseline_epoch_shows_its_progress(tmp_path, monkeypatch):
    """Within an epoch the baselines log step, loss, rate and ETA (every PROGRESS_EVERY_S seconds; 0 here, so
    after every step but the last); a full-dataset epoch otherwise runs for many minutes without a line."""
    from noprop_dist.baselines import runner

    monkeypatch.setattr(runner, "PROGRESS_EVERY_S", 0.0)
    cfg = _cfg("backprop", "model.num_blocks=2", "train.epochs=1", "train.batch_size=256",
               f"run.dir={tmp_path / 'bp'}")
    lines: list[str] = []
    run_baseline(cfg, log=lines.append)
    steps = [ln for ln in lines if " step " in ln]
    train = load_dataset(cfg.data.name, cfg.data.root, False, cfg.data.train_limit, cfg.data.test_limit).train_y
    n = len(runner.rank_batches(torch.arange(len(train)), 256, 0, 1))
    assert [ln.split(" step ")[1].split(" ")[0] for ln in steps] == [f"{i}/{n}" for i in range(1, n)]
    assert all("[backprop] epoch 1/1" in ln and "samples/s | ETA " in ln for ln in steps)


def _train_recording_lr(cfg, tmp_path) -> tuple[list[list[float]], int]:
    """train_epochs of cfg's baseline on digits; the rates every optimizer's first group had at each step."""
    from noprop_dist.baselines import runner
    from noprop_dist.storage.run_dir import RunDir

    ds = load_dataset(cfg.data.name, cfg.data.root, False, cfg.data.train_limit, cfg.data.test_limit)
    learner = build_learner(cfg, ds, torch.device("cpu"))
    seen: list[list[float]] = []
    step = learner.train_step

    def recording(x, y, gen):
        seen.append([o.param_groups[0]["lr"] for o in learner.optimizers()])
        return step(x, y, gen)

    learner.train_step = recording
    rundir = RunDir(cfg.run.dir)
    rundir.prepare(cfg)
    runner.train_epochs(cfg, ds, learner, rundir, 0, 0.0, runner.empty_progress(), log=lambda s: None)
    return seen, len(runner.rank_batches(torch.arange(len(ds.train_y)), cfg.train.batch_size, 0, 1))


@pytest.mark.parametrize("method", ["backprop", "dtp"])
def test_the_baselines_follow_the_learning_rate_schedule(tmp_path, method):
    """train.lr_schedule applies to a baseline as to the NoProp blocks: a cosine run comparing NoProp with a
    baseline held at a constant rate would compare two schedules, not two methods."""
    from noprop_dist.training import lr_schedule_factor

    cfg = _cfg(method, "model.num_blocks=2", "train.epochs=2", "train.batch_size=256", "train.lr_schedule=cosine",
               "train.warmup_epochs=0.5", "data.train_limit=1024", "data.test_limit=64", f"run.dir={tmp_path}/c")
    seen, n = _train_recording_lr(cfg, tmp_path)
    first = _train_recording_lr(dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, lr_schedule="constant", warmup_epochs=0.0), run=dataclasses.replace(cfg.run, dir=f"{tmp_path}/k")),
        tmp_path)[0][0]  # the rates as built: train.lr (DTP: its two rates, from it)
    assert len(seen) == 2 * n
    for i, rates in enumerate(seen):
        factor = lr_schedule_factor(cfg.train, i // n + (i % n) / n)
        assert rates == pytest.approx([r * factor for r in first], rel=1e-9), f"step {i}"
    assert seen[-1][0] < 0.2 * first[0] and seen[0][0] < 0.01 * first[0]  # cosine's tail; the warm-up's start


def test_backprop_trains_under_bf16_autocast_when_asked_and_reports_it(tmp_path, digits):
    """train.precision=bf16 runs the baseline's training forward in bf16 as it runs the NoProp shards' (not
    silently fp32, which would time the two in different precisions); evaluation stays fp32."""
    x, y = _batch(digits)
    dtypes = {}
    for precision in ("fp32", "bf16"):
        learner = build_learner(_cfg("backprop", "model.num_blocks=2", f"train.precision={precision}"), digits,
                                torch.device("cpu"))
        seen: list[torch.dtype] = []
        learner.module.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        learner.train_step(x, y, torch.Generator().manual_seed(0))
        learner.logits(x, torch.Generator().manual_seed(0))
        dtypes[precision] = seen
        assert learner.precision == precision
    assert dtypes == {"fp32": [torch.float32, torch.float32], "bf16": [torch.bfloat16, torch.float32]}
    summary = run_baseline(_cfg("backprop", "model.num_blocks=2", "train.epochs=1", "train.precision=bf16",
                                "data.train_limit=128", "data.test_limit=64", f"run.dir={tmp_path}/bf"),
                           log=lambda s: None)
    assert summary["precision"] == "bf16"


def test_dtp_refuses_bf16(tmp_path):
    with pytest.raises(ConfigError, match="train.precision.*dtp"):
        run_baseline(_cfg("dtp", "train.precision=bf16", f"run.dir={tmp_path}/d"), log=lambda s: None)


def test_a_baseline_trains_the_share_of_a_partial_last_epoch(tmp_path):
    """train.epochs = 1.5 for a baseline as for the NoProp shards: 4 batches, then 2, on the schedule that ends
    at 1.5 epochs; the curve's last point says 1.5."""
    from noprop_dist.training import lr_schedule_factor

    cfg = _cfg("backprop", "model.num_blocks=2", "train.epochs=1.5", "train.batch_size=256", "train.lr_schedule=cosine",
               "data.train_limit=1024", "data.test_limit=64", f"run.dir={tmp_path}/h")
    seen, n = _train_recording_lr(cfg, tmp_path)
    assert n == 4 and len(seen) == 4 + 2
    assert seen[-1][0] == pytest.approx(cfg.train.lr * lr_schedule_factor(cfg.train, 1 + 1 / 4))
    summary = run_baseline(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=f"{tmp_path}/s")),
                           log=lambda s: None)
    assert summary["epochs"] == 1.5 and [p["epoch"] for p in summary["curve"]] == [1, 1.5]

"""One interface over the three baselines: a learner takes uint8 batches, trains a step, predicts, checkpoints.

The epoch loop (``runner.train_epochs``) and Ray Train's workers drive any learner the same way.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..core.blocks import prefers_channels_last
from ..data import ImageDataset, normalize
from ..registry import get_method
from ..training import initial_prototypes, model_spec, resolve_precision
from .backprop import BackpropChain
from .dtp import DTPHyper, DTPNet, dtp_hyper, dtp_losses

Wrap = Callable[[nn.Module], nn.Module]  # e.g. ray.train.torch.prepare_model (DDP); identity in process


def _noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """N(0, I) drawn on the generator's device (CPU: the same draws on any device), moved to ``device``."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


class Learner:
    """Base: ``train_step`` / ``logits`` take uint8 images (B, C, H, W) and labels (B,) on any device."""

    module: nn.Module  # the unwrapped model: what is checkpointed and evaluated
    device: torch.device
    nonfinite_steps: int = 0
    _base_lrs: list[list[float]] | None = None

    def optimizers(self) -> list[torch.optim.Optimizer]:
        raise NotImplementedError

    def set_lr_factor(self, factor: float) -> None:
        """Every param group's rate = the rate it was built with x ``factor`` (train.lr_schedule's, from
        ``training.lr_schedule_factor``): the baselines follow the schedule the NoProp blocks follow."""
        opts = self.optimizers()
        if self._base_lrs is None:  # read before the first change: the rates the config gave
            self._base_lrs = [[g["lr"] for g in o.param_groups] for o in opts]
        for opt, base in zip(opts, self._base_lrs):
            for group, lr in zip(opt.param_groups, base):
                group["lr"] = lr * factor

    def train_step(self, x_u8: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> float:
        raise NotImplementedError

    def logits(self, x_u8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class GradientLearner(Learner):
    """Backprop / adjoint: ``model(x, z0) -> logits``, one cross-entropy, one optimizer over everything.

    ``net`` is what trains (DDP under Ray Train: its backward all-reduces the gradients); ``module`` is the bare
    model inside it, kept channels_last like the NoProp blocks. ``precision`` ("fp32" or "bf16": train.precision
    resolved for ``device``) is the autocast of the training forward and backward, as in the NoProp shards;
    evaluation runs in fp32 in both.
    """

    def __init__(self, module: nn.Module, net: nn.Module, optimizer: torch.optim.Optimizer,
                 mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                 precision: str = "fp32") -> None:
        self.module, self.net, self.optimizer = module, net, optimizer
        self.mean, self.std, self.device = mean, std, device
        self.precision = precision
        self.channels_last = prefers_channels_last(module)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def _inputs(self, x_u8: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalize(x_u8.to(self.device), self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, _noise((x.shape[0], self.module.embed_dim), generator, self.device)  # z_0 ~ N(0, I)

    def train_step(self, x_u8: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> float:
        self.net.train()
        x, z0 = self._inputs(x_u8, generator)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = self.net(x, z0)
        loss = F.cross_entropy(logits.float(), y.to(self.device))  # the model returns logits: one softmax
        loss.backward()
        value = float(loss.detach())
        finite = math.isfinite(value) and all(
            bool(torch.isfinite(p.grad).all()) for p in self.module.parameters() if p.grad is not None)
        if not finite:  # a NaN must not reach the weights; the step is skipped and counted
            self.nonfinite_steps += 1
            return value
        self.optimizer.step()
        return value

    @torch.no_grad()
    def logits(self, x_u8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self.module.eval()
        return self.module(*self._inputs(x_u8, generator))

    def state_dict(self) -> dict:
        return {"model": {k: v.cpu() for k, v in self.module.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class DTPLearner(Learner):
    """Difference target propagation on images flattened and scaled to [0, 1] (Lee et al. 2015: inputs in [0, 1])."""

    def __init__(self, net: DTPNet, hyper: DTPHyper, weight_decay: float, device: torch.device) -> None:
        self.module, self.hyper, self.device = net.to(device), hyper, device

        def rmsprop(params, lr: float) -> torch.optim.Optimizer:
            return torch.optim.RMSprop(params, lr=lr, alpha=hyper.rms_alpha, eps=hyper.rms_eps,
                                       momentum=hyper.rms_momentum, centered=True, weight_decay=weight_decay)

        self.forward_opt = rmsprop([*net.forward_layers.parameters(), *net.out.parameters()], hyper.forward_lr)
        self.feedback_opt = rmsprop(net.inverse.parameters(), hyper.feedback_lr)
        self.precision = "fp32"  # its MLP trains in fp32 (check_baseline refuses bf16 for it)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.forward_opt, self.feedback_opt]

    def _inputs(self, x_u8: torch.Tensor) -> torch.Tensor:
        return x_u8.to(self.device).reshape(x_u8.shape[0], -1).float() / 255.0

    def train_step(self, x_u8: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> float:
        self.module.train()
        self.forward_opt.zero_grad(set_to_none=True)
        self.feedback_opt.zero_grad(set_to_none=True)
        total, ce, _ = dtp_losses(self.module, self._inputs(x_u8), y.to(self.device), self.hyper, generator)
        total.backward()
        value = float(ce.detach())
        if not math.isfinite(float(total.detach())):
            self.nonfinite_steps += 1
            return value
        self.forward_opt.step()
        self.feedback_opt.step()
        return value

    @torch.no_grad()
    def logits(self, x_u8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self.module.eval()
        return self.module(self._inputs(x_u8))

    def state_dict(self) -> dict:
        return {"model": {k: v.cpu() for k, v in self.module.state_dict().items()},
                "forward_opt": self.forward_opt.state_dict(), "feedback_opt": self.feedback_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.forward_opt.load_state_dict(state["forward_opt"])
        self.feedback_opt.load_state_dict(state["feedback_opt"])


def build_learner(cfg: Config, dataset: ImageDataset, device: torch.device,
                  wrap: Wrap = lambda m: m, block: Callable | None = None) -> Learner:
    """The learner of ``model.method`` (its registry.METHODS entry's: :func:`backprop_learner`,
    :func:`adjoint_learner`, :func:`dtp_learner`), its initial weights a function of train.seed (and the data, for
    prototype embeddings) only. ``wrap`` turns the model into what trains (DDP under Ray Train); ``block``: the
    block factory the Python API was given (backprop)."""
    return get_method(cfg.model.method).learner(cfg, dataset, device, wrap, block)


def backprop_learner(cfg: Config, dataset: ImageDataset, device: torch.device, wrap: Wrap,
                     block: Callable | None) -> Learner:
    """The DT blocks chained (T = model.num_blocks blocks of model.block, ``block`` its factory when the Python API
    was given one) and trained end to end with AdamW (Table 3, DT setting)."""
    spec = model_spec(cfg, dataset.image_shape, dataset.num_classes, block)
    module = BackpropChain(spec, cfg.train.seed, initial_prototypes(spec, dataset, cfg.train.seed))
    return _gradient_learner(cfg, dataset, device, wrap, module, torch.optim.AdamW)


def adjoint_learner(cfg: Config, dataset: ImageDataset, device: torch.device, wrap: Wrap,
                    block: Callable | None) -> Learner:
    """A neural ODE whose vector field is one CT network, trained through adjoint gradients with Adam and weight
    decay (Table 3, CT setting)."""
    from .adjoint import AdjointODE  # torchdiffeq and the CT network: only this baseline needs them

    spec = model_spec(cfg, dataset.image_shape, dataset.num_classes, block)
    module = AdjointODE(spec, cfg.train.seed, initial_prototypes(spec, dataset, cfg.train.seed))
    return _gradient_learner(cfg, dataset, device, wrap, module, torch.optim.Adam)


def dtp_learner(cfg: Config, dataset: ImageDataset, device: torch.device, wrap: Wrap,
                block: Callable | None) -> Learner:
    """Difference target propagation's MLP on the flattened images (its own network: no block; one worker: no
    wrap)."""
    c, h, w = dataset.image_shape
    t = cfg.train
    hyper = dtp_hyper(cfg.data.name, t.lr)
    return DTPLearner(DTPNet(c * h * w, dataset.num_classes, hyper.hidden, t.seed), hyper, t.weight_decay, device)


def _gradient_learner(cfg: Config, dataset: ImageDataset, device: torch.device, wrap: Wrap, module: nn.Module,
                      make_opt: Callable[..., torch.optim.Optimizer]) -> GradientLearner:
    """``module`` (backprop's or the adjoint's model) on ``device``, wrapped to train, with its optimizer."""
    t = cfg.train
    # channels_last: as the NoProp blocks (training.ShardTrainer), so the two time the same convolutions.
    module = module.to(device)
    if prefers_channels_last(module):
        module = module.to(memory_format=torch.channels_last)
    net = wrap(module)
    optimizer = make_opt(module.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return GradientLearner(module, net, optimizer, dataset.mean, dataset.std, device,
                           resolve_precision(t.precision, device))


def accuracy(learner: Learner, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int) -> float:
    """Fraction of uint8 images (N, C, H, W) classified as ``labels`` (N,); z_0 drawn from a generator seeded by
    ``seed`` (eval.seed), so a checkpoint re-evaluates identically. Labels only score, never feed, the model."""
    gen = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(0, len(labels), batch_size):
        xb = torch.from_numpy(np.array(images[i : i + batch_size]))  # a copy: Ray hands out read-only arrays
        pred = learner.logits(xb, gen).argmax(dim=1).cpu()
        correct += int((pred == torch.from_numpy(labels[i : i + batch_size])).sum())
    return correct / max(1, len(labels))

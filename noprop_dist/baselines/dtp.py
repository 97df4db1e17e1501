"""Difference Target Propagation (Lee, Zhang, Fischer, Bengio 2015; seeds/004) on flattened images.

Forward layers f_l(h) = tanh(W_l h + b_l), l = 1..L, and a softmax output layer; learned approximate inverses
g_l(h_l) = tanh(V_l h_l + c_l) for l = 2..L (layer 1 needs none: nothing sits below it). One mini-batch:

1. forward pass h_0 = x, h_l = f_l(h_{l-1});
2. top target from a gradient step on the output loss: h_hat_L = h_L - eta_hat * dCE/dh_L;
3. difference-corrected targets, top down: h_hat_{l-1} = h_{l-1} + g_l(h_hat_l) - g_l(h_l);
4. local losses, each reaching one layer only: ||f_l(h_{l-1}) - h_hat_l||^2 for f_l (input h_{l-1} held fixed),
   CE for the output layer (input h_L held fixed), and the noise-corrupted reconstruction
   ||g_l(f_l(h_{l-1} + e)) - (h_{l-1} + e)||^2, e ~ N(0, sigma^2 I), for g_l (f_l's output held fixed).

No gradient crosses a layer: the only derivative taken through anything but a single layer is dCE/dh_L at the
output layer, which is how the paper forms the top target. Squared errors are summed over units and averaged
over the batch, as in the paper's released code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.seeds import dtp_init_seed


@dataclass(frozen=True)
class DTPHyper:
    """Hyperparameters of Lee et al. (2015), Sec. 3.1 (MNIST, 7 x 240 tanh), as released with the paper
    (github.com/donghyunlee/dtp, conti_dtp.py: the values after hyperparameter search). The paper uses the same
    settings for CIFAR-10 with a 3072-1000-1000-1000-10 network (seeds/004); it gives no separate values."""

    hidden: tuple[int, ...] = (240,) * 7  # Sec. 3.1: 7 hidden layers of 240 tanh units (MNIST)
    # eta_hat of the top target h_hat_L = h_L - eta_hat dL/dh_L, with L the batch-MEAN NLL at the paper's batch of
    # 100; here applied to the per-example gradient, so it is 0.3277 / 100 whatever train.batch_size is.
    target_step: float = 0.327736332653 / 100
    noise_std: float = 0.359829566008  # sigma of the corruption in the inverse loss
    forward_lr: float = 0.0148893490317  # RMSprop step of the forward weights (configs set train.lr to it)
    feedback_lr: float = 0.00501149118237  # RMSprop step of the inverses g_l
    # Their RMSprop: centred, decay 0.95, momentum 0.9, g / sqrt(var + 1e-3). torch adds eps after the sqrt:
    # eps = sqrt(1e-3) matches it where the variance is small.
    rms_alpha: float = 0.95
    rms_momentum: float = 0.9
    rms_eps: float = 1e-3 ** 0.5


def dtp_hyper(dataset: str, lr: float | None = None) -> DTPHyper:
    """The paper's settings for ``dataset``: 3 x 1000 hidden units on CIFAR, 7 x 240 otherwise; ``lr`` (train.lr)
    replaces the forward learning rate when given."""
    hidden = (1000,) * 3 if dataset.startswith("cifar") else (240,) * 7
    hyper = DTPHyper(hidden=hidden)
    if lr is not None:
        hyper = DTPHyper(**{**hyper.__dict__, "forward_lr": lr})
    return hyper


def _orthogonal_linear(n_in: int, n_out: int) -> nn.Linear:
    """Random orthogonal weights and zero biases (Lee et al. 2015, Sec. 3: initialisation)."""
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class DTPNet(nn.Module):
    """forward[l-1] = f_l (l = 1..L), out = the softmax layer, inverse[l-2] = g_l (l = 2..L)."""

    def __init__(self, in_dim: int, num_classes: int, hidden: tuple[int, ...], seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(dtp_init_seed(seed))
            sizes = (in_dim, *hidden)
            self.forward_layers = nn.ModuleList(_orthogonal_linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
            self.out = _orthogonal_linear(hidden[-1], num_classes)
            self.inverse = nn.ModuleList(_orthogonal_linear(b, a) for a, b in zip(hidden[:-1], hidden[1:]))

    def f(self, l: int, h: torch.Tensor) -> torch.Tensor:
        """f_l, l in 1..L: (B, n_{l-1}) -> (B, n_l)."""
        return torch.tanh(self.forward_layers[l - 1](h))

    def g(self, l: int, h: torch.Tensor) -> torch.Tensor:
        """g_l, l in 2..L, approximate inverse of f_l: (B, n_l) -> (B, n_{l-1})."""
        return torch.tanh(self.inverse[l - 2](h))

    def hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[h_0 = x, h_1, ..., h_L] for x (B, D)."""
        hs = [x]
        for l in range(1, len(self.forward_layers) + 1):
            hs.append(self.f(l, hs[-1]))
        return hs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, m) of flattened images x (B, D) in [0, 1]."""
        return self.out(self.hidden_states(x)[-1])


def dtp_losses(net: DTPNet, x: torch.Tensor, y: torch.Tensor, hyper: DTPHyper,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of the local losses, the output CE, the inverse losses' sum) of one batch x (B, D), y (B,).

    Backward on the first gives every parameter its own layer's gradient and nothing else.
    """
    with torch.no_grad():
        hs = net.hidden_states(x)
    L = len(hs) - 1
    # Top target: one gradient step on the output loss w.r.t. h_L (per-example gradient: summed CE).
    h_top = hs[L].clone().requires_grad_(True)
    (grad_top,) = torch.autograd.grad(F.cross_entropy(net.out(h_top), y, reduction="sum"), h_top)
    targets = {L: hs[L] - hyper.target_step * grad_top}
    with torch.no_grad():
        for l in range(L, 1, -1):  # difference correction: targets[l-1] - h_{l-1} = g_l(targets[l]) - g_l(h_l)
            targets[l - 1] = hs[l - 1] + net.g(l, targets[l]) - net.g(l, hs[l])

    def sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).pow(2).sum(dim=1).mean()

    ce = F.cross_entropy(net.out(hs[L]), y)  # hs are detached: reaches the output layer only
    forward_loss = sum(sq(net.f(l, hs[l - 1]), targets[l]) for l in range(1, L + 1))
    inverse_loss = torch.zeros((), device=x.device)
    for l in range(2, L + 1):
        noise = torch.randn(hs[l - 1].shape, generator=generator,
                            device=generator.device if generator is not None else x.device).to(x.device)
        h_c = hs[l - 1] + hyper.noise_std * noise
        with torch.no_grad():
            f_c = net.f(l, h_c)  # the inverse loss trains g_l only
        inverse_loss = inverse_loss + sq(net.g(l, f_c), h_c)
    return ce + forward_loss + inverse_loss, ce, inverse_loss

"""Adjoint baseline in the CT setting (NoProp paper Sec. 5; NOPROP.md "Baselines from the paper").

A neural ODE whose vector field is the NoProp-CT network, integrated over t in [0, 1] with a fixed-step solver
(``model.inference_steps`` steps, 1000 in the paper, for training and inference alike), a linear classifier on
z_1 (the head of the shared state, ``class_prob: softmax``) and ONE cross-entropy. Gradients come from the
adjoint sensitivity method (Chen et al. 2018) through ``torchdiffeq.odeint_adjoint``: the backward pass solves
the adjoint ODE backwards in time and stores no intermediate states, which is what the paper compares against.

Vector field (our choice; the paper does not spell it out):

    dz/dt = r * (u_hat(z, x, t) - z),   u_hat = softmax(CTBlock(z, x, t)) @ W_embed,   r = exp(rho) > 0,

the continuous-time limit of the backprop baseline's update z_t = z_{t-1} + a_t (u_hat_t - z_{t-1}) (Eq. 18):
z relaxes towards the network's denoised label, as in NoProp-CT, where u_hat is the same softmax-weighted
combination of class embeddings. The pull towards the convex hull of the embeddings keeps z bounded, so a
fixed-step solver stays stable. The rate r is learnable for the same reason a_t is learnable in Eq. 19.

Initial values the paper leaves open: the head is widened as the backprop chain's (``head.widen_head``), and r
starts at ``initial_rate(inference_steps)``: the rate at which the Euler solve leaves ``NOISE_LEFT`` = 2^-10 of
z_0 in z_1, what the backprop chain's a_t = 0.5 leaves after its 10 blocks. (At r = 1, e^-1 of the noise, norm
about 3 for d = 10, reached the classifier, and the model stayed at chance: ``benchmarks/baseline_start.py``.)
It is below inference_steps, so each Euler step moves z less than all the way to u_hat (stable: r h < 2).

z_0 ~ N(0, I) as in NoProp-CT (time runs from noise to label). Fresh noise per training batch; evaluation draws
it from a generator seeded by ``eval.seed``.

The adjoint's backward solve re-evaluates the field at reconstructed states, so the field must be a deterministic
function of (t, z): the image features h_x = image_path(x) (with its dropout) are computed once per batch outside
the solver and carried as a constant part of the ODE state (dh_x/dt = 0), which also lets the adjoint return
their gradient, and the layers inside the field run in eval mode (their dropout off) even while training.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from ..core import (
    CTBlock,
    ModelSpec,
    build_ct_block,
    build_shared,
    class_logits,
    denoised_estimate,
)
from .head import widen_head

# Explicit Euler: one network evaluation per step, as NoProp-CT's 1000-step inference chain.
DEFAULT_SOLVER = "euler"
# What the backprop chain leaves of z_0 at the start: (1 - A_INIT)^T = 2^-10 for T = 10 blocks.
NOISE_LEFT = 2.0**-10


def initial_rate(steps: int, noise_left: float = NOISE_LEFT) -> float:
    """r such that ``steps`` Euler steps of dz/dt = -r z scale z_0 by ``noise_left``: (1 - r/steps)^steps.

    r = steps (1 - noise_left^(1/steps)); 5.0 for 10 steps (a_t = 0.5 per step, the backprop chain exactly),
    6.70 for 100, tending to ln(1/noise_left) = 10 ln 2 = 6.93, the exact solution's e^-r.
    """
    if steps < 1 or not 0.0 < noise_left < 1.0:
        raise ValueError(f"need steps >= 1 and 0 < noise_left < 1, got steps={steps}, noise_left={noise_left}")
    return steps * (1.0 - noise_left ** (1.0 / steps))


def fixed_grid(steps: int) -> Callable[[object, object, torch.Tensor], torch.Tensor]:
    """A torchdiffeq ``grid_constructor`` with exactly ``steps`` equal steps between t[0] and t[-1].

    (``options={"step_size": 1/steps}`` would round: ceil(1 / fl(1/steps) + 1) can add a step.) The adjoint pass
    gets the same options, hence the same grid, reversed.
    """
    def construct(func, y0, t: torch.Tensor) -> torch.Tensor:
        return torch.linspace(float(t[0]), float(t[-1]), steps + 1, dtype=t.dtype, device=t.device)

    return construct


class AdjointODE(nn.Module):
    """CT network as the vector field of a neural ODE from z_0 (noise) to z_1, classified by a linear head."""

    def __init__(self, spec: ModelSpec, seed: int, prototype_init: torch.Tensor | None = None,
                 solver: str = DEFAULT_SOLVER, adjoint: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.block: CTBlock = build_ct_block(spec, 1, seed)
        self.shared = build_shared(spec, seed, prototype_init)
        self.head_gain = widen_head(self.shared)  # kept for baseline_start.py's default-init variant
        self.log_rate = nn.Parameter(torch.tensor(math.log(initial_rate(spec.inference_steps))))
        self.solver = solver
        self.adjoint = adjoint  # False: back-propagate through the solver's steps (the test's reference)

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    def train(self, mode: bool = True) -> AdjointODE:
        super().train(mode)
        # Inside the solver the field must be deterministic (module docstring): only the image path, which
        # runs once per batch outside the solver, keeps its train-mode dropout.
        for name, module in self.block.named_children():
            if name != "image_path":
                module.train(False)
        return self

    def field_params(self) -> tuple[nn.Parameter, ...]:
        """Parameters the vector field reads (the adjoint's ``adjoint_params``): everything but the image path
        (its gradient arrives through h_x) and the head (used after the solver)."""
        params = [p for n, p in self.block.named_parameters() if not n.startswith("image_path.")]
        params += [self.log_rate] + ([self.shared.embed] if isinstance(self.shared.embed, nn.Parameter) else [])
        return tuple(p for p in params if p.requires_grad)

    def _field(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """d(z, h_x)/dt at scalar time t: z (B, d), h_x (B, 256) -> ((B, d), zeros (B, 256))."""
        z, h_x = state
        logits = self.block.forward_features(h_x, z, t.expand(z.shape[0]))
        dz = self.log_rate.exp() * (denoised_estimate(logits, self.shared.embed) - z)
        return dz, torch.zeros_like(h_x)

    def final_state(self, x: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """z_1 from x (B, C, H, W) normalised images and z_0 (B, d): (B, d)."""
        h_x = self.block.encode_image(x)
        t = torch.tensor([0.0, 1.0], dtype=z0.dtype, device=z0.device)
        options = {"grid_constructor": fixed_grid(self.spec.inference_steps)}
        if self.adjoint and torch.is_grad_enabled():
            zs, _ = odeint_adjoint(self._field, (z0, h_x), t, method=self.solver, options=options,
                                   adjoint_params=self.field_params())
        else:  # inference, or direct back-propagation through every step
            zs, _ = odeint(self._field, (z0, h_x), t, method=self.solver, options=options)
        return zs[-1]

    def forward(self, x: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """Class logits (B, m), unnormalised: the caller applies ONE cross-entropy / argmax."""
        return class_logits(self.shared, self.final_state(x, z0), self.spec.class_prob, self.spec.radial_sigma)

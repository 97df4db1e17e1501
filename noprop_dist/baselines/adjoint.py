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
fixed-step solver stays stable. The rate r is learnable (initially 1) for the same reason a_t is learnable in
Eq. 19: with r fixed at 1 a fraction e^-1 of the initial noise would reach the classifier whatever the network
does. Explicit Euler is stable while r / inference_steps < 2.

z_0 ~ N(0, I) as in NoProp-CT (time runs from noise to label). Fresh noise per training batch; evaluation draws
it from a generator seeded by ``eval.seed``.

The adjoint's backward solve re-evaluates the field at reconstructed states, so the field must be a deterministic
function of (t, z): the image features h_x = image_path(x) (with its dropout) are computed once per batch outside
the solver and carried as a constant part of the ODE state (dh_x/dt = 0), which also lets the adjoint return
their gradient, and the layers inside the field run in eval mode (their dropout off) even while training.
"""
from __future__ import annotations

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

# Explicit Euler: one network evaluation per step, as NoProp-CT's 1000-step inference chain.
DEFAULT_SOLVER = "euler"


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
        self.log_rate = nn.Parameter(torch.zeros(()))
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

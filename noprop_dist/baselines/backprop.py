"""Backprop baseline in the DT setting (NoProp paper, Eq. 17-19; NOPROP.md "Baselines from the paper").

The T blocks of NoProp-DT chained into one network and trained end to end with back-propagation:

    z_0 ~ N(0, I),   z_t = (1 - a_t) z_{t-1} + a_t u_hat_t(z_{t-1}, x),   a_t = tanh(w_t),   t = 1..T,
    p(y | x) = p_out(y | z_T),

with ``u_hat_t = softmax(block_t logits) @ W_embed`` and ONE cross-entropy on ``class_logits(z_T)``. The blocks,
W_embed and the head are the very modules NoProp-DT trains (``build_shard``, ``build_shared``, with
``model.block``'s blocks), so the two differ only in how credit is assigned.

z_0: Eq. 17 of the paper draws z_0 from N(0, I), as NoProp-DT's inference does; we follow it. Training draws
fresh noise every batch; evaluation draws it from a generator seeded by ``eval.seed`` so a checkpoint
re-evaluates identically.

Initial values the paper leaves open: a_t = 0.5 (``A_INIT``) and a head widened by ``head.widen_head``, without
which the chain's bounded logits hold it near chance for hundreds of steps (see that module).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..core import ModelSpec, build_shard, build_shared, class_logits, denoised_estimate
from .head import widen_head

# The paper does not give the initial w_t. a_t = tanh(w_t) = 0.5 moves z halfway towards each block's
# prediction: after T = 10 blocks the initial noise is scaled by 2^-10, and every block still matters.
A_INIT = 0.5


class BackpropChain(nn.Module):
    """T DT blocks + shared state (W_embed, head) + the mixing weights w_1..w_T, one differentiable network."""

    def __init__(self, spec: ModelSpec, seed: int, prototype_init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.spec = spec
        # Same initial blocks and W_embed as NoProp-DT for the same seed; the head is widened (module docstring).
        self.blocks = nn.ModuleList(build_shard(spec, t, seed) for t in range(1, spec.num_shards + 1))
        self.shared = build_shared(spec, seed, prototype_init)
        self.head_gain = widen_head(self.shared)  # kept for baseline_start.py's default-init variant
        self.w = nn.Parameter(torch.full((spec.num_shards,), math.atanh(A_INIT)))

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    def mixing(self) -> torch.Tensor:
        """a_t = tanh(w_t), t = 1..T: (T,), each in (-1, 1) (Eq. 19)."""
        return torch.tanh(self.w)

    def final_state(self, x: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """z_T from x (B, C, H, W) normalised images and z_0 (B, d): (B, d)."""
        a = self.mixing()
        z = z0
        for t, block in enumerate(self.blocks):
            u_hat = denoised_estimate(block(z, x), self.shared.embed)
            z = (1 - a[t]) * z + a[t] * u_hat
        return z

    def forward(self, x: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """Class logits (B, m), unnormalised: the caller applies ONE cross-entropy / argmax."""
        return class_logits(self.shared, self.final_state(x, z0), self.spec.class_prob, self.spec.radial_sigma)

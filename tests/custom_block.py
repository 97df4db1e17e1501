"""A block the package does not ship, as a user would write one: a small MLP with no convolution, for the
contract tests (the same guarantees for every block) and the Ray tests (a factory that reaches the workers by
value from a module that is not installed)."""
from __future__ import annotations

import torch
from torch import nn

from noprop_dist import BlockSpec


class TinyMLP(nn.Module):
    """logits = MLP([x flattened, z(, sin/cos of t)]): (B, d), (B, C, H, W)(, (B,)) -> (B, m)."""

    def __init__(self, spec: BlockSpec, hidden: int = 64) -> None:
        super().__init__()
        c, h, w = spec.image_shape
        self.time = spec.time_conditioned
        width = c * h * w + spec.embed_dim + (2 if self.time else 0)
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                 nn.Linear(hidden, spec.num_classes))

    def forward(self, z: torch.Tensor, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        # .view, not .reshape: it fails on the channels-last images that convolutional blocks are given
        parts = [x.view(x.shape[0], -1), z]
        if self.time:
            parts += [torch.sin(3 * t)[:, None], torch.cos(3 * t)[:, None]]
        return self.net(torch.cat(parts, dim=1))


class TinyDT(TinyMLP):
    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # DT blocks take no t
        return super().forward(z, x)


def tiny_block(spec: BlockSpec) -> nn.Module:
    """The factory: ``forward(z, x)`` for NoProp-DT and backprop, ``forward(z, x, t)`` for CT and FM."""
    return TinyMLP(spec) if spec.time_conditioned else TinyDT(spec)

"""``model.block: resnet``: Fig. 6's block with a small residual image path in place of its three plain
convolutions. The label path, the time path (CT / FM) and the fusion are Fig. 6's, so the two blocks differ
only in how they read the image.

The image path: a 3x3 conv stem (32 channels, BatchNorm, ReLU) at full resolution, then two residual stages
(He et al. 2016, "basic" blocks) that each halve the resolution and double the channels (64, 128), then a global
average pool and FC256 (+ BatchNorm where the block has it). Every convolution is followed by BatchNorm, which in
eval mode is a fixed affine map: the features stay a function of each image alone, as the samplers need.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import BlockSpec, DTBlock
from .ct_blocks import CTBlock


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (a strided 1x1 conv when the shape changes).
    (B, c_in, H, W) -> (B, c_out, H / stride, W / stride)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.shortcut: nn.Module = (nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class ResidualEncoder(nn.Module):
    """stem conv3x3(32) -> BasicBlock(64, /2) -> BasicBlock(128, /2) -> global average pool -> dropout -> FC256
    (-> BN with ``batch_norm``). (B, C, H, W) -> (B, 256); any H, W (the pool makes the width independent of them)."""

    def __init__(self, image_shape: tuple[int, int, int], dropout: float, batch_norm: bool = True) -> None:
        super().__init__()
        c = image_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            BasicBlock(32, 64, stride=2), BasicBlock(64, 128, stride=2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
        )
        self.proj = nn.Sequential(nn.Linear(128, 256), nn.BatchNorm1d(256) if batch_norm else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x))


def resnet(spec: BlockSpec) -> nn.Module:
    """The ``resnet`` block of one shard: Fig. 6's DT block or CT / FM network with :class:`ResidualEncoder`."""
    return CTBlock(spec, ResidualEncoder) if spec.time_conditioned else DTBlock(spec, ResidualEncoder)

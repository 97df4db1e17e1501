"""A block of your own: a small CNN that reads the image, adds what it makes of the noisy label z (and, for
NoProp-CT / FM, of the time t), and returns class logits."""
import torch
from torch import nn

from noprop_dist import BlockSpec


class SmallBlock(nn.Module):
    def __init__(self, spec: BlockSpec, width: int = 128) -> None:
        super().__init__()
        c, h, w = spec.image_shape
        self.image = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, width),
        )
        self.label = nn.Sequential(nn.Linear(spec.embed_dim, width), nn.ReLU(), nn.Linear(width, width))
        self.time = nn.Linear(1, width) if spec.time_conditioned else None
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(width, spec.num_classes))

    def forward(self, z: torch.Tensor, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """z: (B, d) noisy label, x: (B, C, H, W) normalised images, t: (B,) times (CT / FM) -> logits (B, m)."""
        h = self.image(x) + self.label(z)
        if self.time is not None:
            h = h + self.time(t[:, None])
        return self.out(h)


def small_block(spec: BlockSpec) -> nn.Module:
    """The factory: called once per shard (spec.shard = 1..spec.num_shards) with the same kind of spec."""
    return SmallBlock(spec)

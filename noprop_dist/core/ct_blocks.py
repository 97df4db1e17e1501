"""Networks of NoProp-CT and NoProp-FM: the Fig. 6 block without BatchNorm plus a time path (NOPROP.md,
"Block architecture"), optionally with the DT block's BatchNorm after the image path
(``model.image_batch_norm``). One network per time shard; K = 1 is the paper's single network.

In eval mode (dropout off, BatchNorm on its running statistics) a network's output for one example does not
depend on the rest of the batch and the image features are a pure function of x: samplers compute them once
(``encode_image``) and reuse them for all inference steps (``forward_features``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .blocks import (
    BlockSpec,
    ConvEncoder,
    ImageEncoder,
    ModelSpec,
)
from .seeds import shard_init_seed

TIME_EMBED_DIM = 64
# Times in [0, 1] are scaled to [0, 1000] before the sinusoids, as if they were the step index of a 1000-step
# chain (the paper's inference grid): then the lowest frequencies still separate neighbouring steps.
TIME_SCALE = 1000.0


def sinusoidal_time_embedding(t: torch.Tensor, dim: int = TIME_EMBED_DIM) -> torch.Tensor:
    """Transformer-style position embedding of times t in [0, 1]: (B,) -> (B, dim) = [sin(w_i s), cos(w_i s)],
    s = 1000 t, w_i = 10000^(-i / (dim/2)), i = 0 .. dim/2 - 1."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = (TIME_SCALE * t.float())[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class LabelEncoderNoBN(nn.Module):
    """Noisy label path without BatchNorm: FC256-ReLU, then a residual pair FC256-ReLU-FC256. (B, d) -> (B, 256)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(embed_dim, 256), nn.ReLU())
        self.residual = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.inp(z)
        return h + self.residual(h)


class CTBlock(nn.Module):
    """The network of one time shard, ``(z_t, x, t) -> class logits (B, m)`` (used by CT and FM alike).

    CT reads ``softmax(logits) @ W_embed`` (a denoised label), FM ``logits @ W_embed`` (a velocity); both are
    formed by the objective / chain because W_embed is shared state the network does not own.
    """

    def __init__(self, spec: BlockSpec | ModelSpec, encoder: ImageEncoder = ConvEncoder) -> None:
        super().__init__()
        self.spec = spec
        # image_batch_norm: the BatchNorm the DT block has after its FC256 (the paper's CT / FM network has none);
        # in eval mode it uses running statistics, so the features stay a function of x alone.
        self.image_path = encoder(spec.image_shape, spec.dropout, spec.image_batch_norm)
        # Prototype labels live in image space: the same kind of image path (own weights) as the image.
        self.label_path: nn.Module = (
            encoder(spec.image_shape, spec.dropout, False) if spec.image_like_label
            else LabelEncoderNoBN(spec.embed_dim)
        )
        self.time_path = nn.Sequential(nn.Linear(TIME_EMBED_DIM, 256), nn.ReLU())
        self.fuse = nn.Sequential(
            nn.Linear(768, 256), nn.ReLU(),
            nn.Linear(256, 128), nn.ReLU(),
            nn.Linear(128, spec.num_classes),
        )

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Image features (B, C, H, W) -> (B, 256); computed once per network and reused across steps."""
        return self.image_path(x)

    def forward_features(self, h_x: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """h_x: (B, 256) from encode_image, z: (B, d) noisy label, t: (B,) times in [0, 1] -> logits (B, m)."""
        if self.spec.image_like_label:
            z = z.view(z.shape[0], *self.spec.image_shape)
        h_t = self.time_path(sinusoidal_time_embedding(t))
        return self.fuse(torch.cat([h_x, self.label_path(z), h_t], dim=1))

    def forward(self, z: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z: (B, d), x: (B, C, H, W) normalised image, t: (B,) -> logits (B, m)."""
        return self.forward_features(self.encode_image(x), z, t)


def build_ct_block(spec: ModelSpec, k: int, seed: int) -> CTBlock:
    """Network of shard k (1..K) with initial weights that depend only on (seed, k): every process builds the same."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(shard_init_seed(seed, k, time_conditioned=True))
        return CTBlock(spec)

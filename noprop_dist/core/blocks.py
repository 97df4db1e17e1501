"""Block networks of NoProp-DT (paper Fig. 6) and the model specification that builds them."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild blocks, shared state and chain without the run config."""

    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int  # m
    num_shards: int  # the networks trained apart: T blocks (noprop_dt) or K time intervals (noprop_ct / fm)
    embedding: str  # one_hot | learned | prototype
    embed_dim: int  # d: m for one_hot, C*H*W for prototype
    dropout: float
    class_prob: str  # softmax | radial
    radial_sigma: float
    eta: float
    abar_max: float
    method: str = "noprop_dt"  # noprop_dt | noprop_ct | noprop_fm (older saved chains have no key: DT)
    inference_steps: int = 1000  # CT / FM: steps of the inference chain / ODE solver
    # The chain's default inference sampler (config.SAMPLERS); None: the paper's (config.PAPER_SAMPLER), which
    # is what chains saved before samplers existed ran, so they re-evaluate as they did.
    sampler: str | None = None
    ensemble_draws: int = 8
    # CT / FM (core.partition, core.continuous): how [0, 1] is split among the K shards, how far each shard's
    # training interval reaches into its neighbours', and CT's denoising weight. The defaults are what chains
    # saved before these keys existed used.
    shard_partition: str = "uniform"
    shard_overlap: float = 0.0
    ct_loss_weight: str = "snr_prime"
    image_batch_norm: bool = False  # CT / FM networks: BatchNorm after the image path (DT blocks always have it)
    ct_readout: str = "head"  # CT's class readout at z_1: head (Eq. 14) | nearest (class embedding, as FM's)
    fm_target: str = "velocity"  # FM's network predicts: velocity (the paper's) | endpoint (core.continuous.fm_field)

    @property
    def image_like_label(self) -> bool:
        """The noisy label is processed like an image when d equals the image size (prototypes)."""
        c, h, w = self.image_shape
        return self.embed_dim == c * h * w

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        d["image_shape"] = tuple(d["image_shape"])
        if "num_blocks" in d and "num_shards" not in d:  # the key's name in chains saved before 2026-12
            d["num_shards"] = d.pop("num_blocks")
        old = d.pop("ct_inference", None)  # the CT sampler's name before eval.sampler: chain | ode
        if old is not None and "sampler" not in d:
            d["sampler"] = {"chain": "eq3"}.get(old, old)
        return cls(**d)


class ConvEncoder(nn.Module):
    """conv3x3(32)-ReLU-maxpool2-dropout -> conv(64)-ReLU-dropout -> conv(128)-ReLU-maxpool2-dropout
    -> flatten -> FC256 -> BN (no BN with ``batch_norm=False``: the CT/FM blocks).  (B, C, H, W) -> (B, 256)."""

    def __init__(self, image_shape: tuple[int, int, int], dropout: float, batch_norm: bool = True) -> None:
        super().__init__()
        c, h, w = image_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Dropout(dropout),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout),
            nn.Flatten(),
        )
        flat = 128 * (h // 2 // 2) * (w // 2 // 2)
        self.proj = nn.Sequential(nn.Linear(flat, 256), nn.BatchNorm1d(256) if batch_norm else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x))


class LabelEncoder(nn.Module):
    """Noisy label path: FC256-BN-ReLU, then a residual pair FC256-BN-ReLU-FC256-BN. (B, d) -> (B, 256)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(embed_dim, 256), nn.BatchNorm1d(256), nn.ReLU())
        self.residual = nn.Sequential(
            nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 256), nn.BatchNorm1d(256)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.inp(z)
        return h + self.residual(h)


class DTBlock(nn.Module):
    """One NoProp-DT block u_hat_t(z_{t-1}, x): returns class logits (B, m).

    The block's denoised estimate is ``softmax(logits) @ W_embed``, formed by the objective and the chain,
    because W_embed is shared state that the block does not own.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.image_path = ConvEncoder(spec.image_shape, spec.dropout)
        # Prototype labels live in image space: same conv path (own weights) as the image.
        self.label_path: nn.Module = (
            ConvEncoder(spec.image_shape, spec.dropout) if spec.image_like_label else LabelEncoder(spec.embed_dim)
        )
        self.fuse = nn.Sequential(
            nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(),
            nn.Linear(256, 128), nn.BatchNorm1d(128), nn.ReLU(),
            nn.Linear(128, spec.num_classes),
        )

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """z: (B, d) noisy label, x: (B, C, H, W) normalised image -> logits (B, m)."""
        if self.spec.image_like_label:
            z = z.view(z.shape[0], *self.spec.image_shape)
        return self.fuse(torch.cat([self.image_path(x), self.label_path(z)], dim=1))


def build_block(spec: ModelSpec, t: int, seed: int) -> DTBlock:
    """Block t (1..T) with initial weights that depend only on (seed, t): every process builds the same."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100_003 + t)
        return DTBlock(spec)

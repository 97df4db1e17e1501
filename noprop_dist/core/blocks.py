"""The block contract and the model specification: what a shard's network is told (:class:`BlockSpec`), how it is
built from ``model.block`` (:func:`build_shard`), and the paper's Fig. 6 networks of NoProp-DT.

A block is any ``nn.Module`` a factory returns from a :class:`BlockSpec`, with ``forward(z, x) -> logits (B, m)``
(NoProp-DT, backprop) or ``forward(z, x, t) -> logits (B, m)`` (NoProp-CT / FM). The objectives, embeddings,
schedules, samplers and chain are the package's; only the network is the factory's. ``model.block`` names the
factory (noprop_dist.registry.BLOCKS: ``fig6``, ``resnet``) or gives its import path ``package.module:factory``.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field, fields
from typing import Callable, Iterator

import torch
from torch import nn

from ..config import ConfigError, EvalConfig, ModelConfig
from ..registry import BLOCKS, get_method
from .seeds import shard_init_seed

# What a chain file saved before a ModelSpec key existed was trained and evaluated with: ModelSpec.from_dict fills
# the key the file lacks with it, whatever the config's default has become since. sampler None: the paper's
# (registry.Method.paper_sampler), what chains ran before samplers existed.
_BEFORE_THE_KEY = {
    "method": "noprop_dt", "inference_steps": 1000, "sampler": None, "ensemble_draws": 8,
    "shard_partition": "uniform", "shard_overlap": 0.0, "ct_loss_weight": "snr_prime", "image_batch_norm": False,
    "ct_readout": "head", "fm_target": "velocity", "block": "fig6",
}


@dataclass(frozen=True)
class BlockSpec:
    """What a block factory is told about the shard it builds: ``factory(spec) -> nn.Module``.

    The module it returns takes z: (B, embed_dim) the noisy label, x: (B, C, H, W) the normalised images and,
    when ``time_conditioned``, t: (B,) times in [0, 1]; it returns class logits (B, num_classes). With
    ``image_like_label`` (prototype embeddings, d = C*H*W) z can be viewed as an image (B, C, H, W).
    """

    image_shape: tuple[int, int, int]  # (C, H, W) of x
    num_classes: int  # m: the logits' width
    embed_dim: int  # d: z's width
    method: str  # model.method: noprop_dt | noprop_ct | noprop_fm | backprop | adjoint (registry.METHODS)
    shard: int  # which network this is, 1..num_shards (DT: block t, CT / FM: time-shard k)
    num_shards: int  # T blocks or K time-shards
    image_like_label: bool  # d == C*H*W
    dropout: float = 0.0  # model.dropout, for blocks that use dropout
    image_batch_norm: bool = False  # model.image_batch_norm (CT / FM), for blocks that offer the choice

    @property
    def time_conditioned(self) -> bool:
        """Whether the block is called as ``forward(z, x, t)`` (CT / FM) rather than ``forward(z, x)``."""
        return get_method(self.method).time_conditioned


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild blocks, shared state and chain without the run config. The optional fields
    default to the config's defaults (training.model_spec passes every one of them)."""

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
    method: str = ModelConfig.method  # noprop_dt | noprop_ct | noprop_fm
    inference_steps: int = ModelConfig.inference_steps  # CT / FM: steps of the inference chain / ODE solver
    # The chain's default inference sampler (config.SAMPLERS); None: the paper's (Method.paper_sampler).
    sampler: str | None = EvalConfig.sampler
    ensemble_draws: int = EvalConfig.ensemble_draws
    # CT / FM (core.partition, core.paths): how [0, 1] is split among the K shards, how far each shard's
    # training interval reaches into its neighbours', and CT's denoising weight.
    shard_partition: str = ModelConfig.shard_partition
    shard_overlap: float = ModelConfig.shard_overlap
    ct_loss_weight: str = ModelConfig.ct_loss_weight
    # CT / FM networks: BatchNorm after the image path (DT blocks always have it)
    image_batch_norm: bool = ModelConfig.image_batch_norm
    ct_readout: str = ModelConfig.ct_readout  # CT's class readout at z_1: head (Eq. 14) | nearest (class embedding)
    fm_target: str = ModelConfig.fm_target  # FM's network predicts: velocity (the paper's) | endpoint (fm_field)
    block: str = ModelConfig.block  # model.block: a registered block's name or a factory's import path
    # The factory itself when the Python API was given a function (train(..., block=fn)): it travels to the
    # workers with the spec, by value where its module is not importable there; never written to a file.
    block_factory: Callable[[BlockSpec], nn.Module] | None = field(default=None, compare=False, repr=False)

    @property
    def image_like_label(self) -> bool:
        """The noisy label is processed like an image when d equals the image size (prototypes)."""
        c, h, w = self.image_shape
        return self.embed_dim == c * h * w

    def block_spec(self, k: int) -> BlockSpec:
        """What the factory of shard k in 1..num_shards is told."""
        return BlockSpec(image_shape=tuple(self.image_shape), num_classes=self.num_classes, embed_dim=self.embed_dim,
                         method=self.method, shard=k, num_shards=self.num_shards,
                         image_like_label=self.image_like_label, dropout=self.dropout,
                         image_batch_norm=self.image_batch_norm)

    def to_dict(self) -> dict:
        """The spec as plain values (chain files, checkpoints): the factory is recorded by ``block`` alone."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "block_factory"}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """The spec :meth:`to_dict` recorded (chain files): renamed keys under their names of today, and a key the
        file predates with the value its chain was trained with (:data:`_BEFORE_THE_KEY`)."""
        d = dict(d)
        d["image_shape"] = tuple(d["image_shape"])
        if "num_blocks" in d and "num_shards" not in d:  # the key's name in chains saved before 2026-12
            d["num_shards"] = d.pop("num_blocks")
        old = d.pop("ct_inference", None)  # the CT sampler's name before eval.sampler: chain | ode
        if old is not None and "sampler" not in d:
            d["sampler"] = {"chain": "eq3"}.get(old, old)
        return cls(**(_BEFORE_THE_KEY | d))


# Set while the chain is evaluated (core.scoring.count_stages): only there does MaxPool change its kernel.
_EVALUATION_POOLING = contextvars.ContextVar("evaluation_pooling", default=False)


@contextlib.contextmanager
def evaluation_pooling() -> Iterator[None]:
    """Within it, :class:`MaxPool` pools a CPU batch held as NCHW through channels-last (the chain's evaluation,
    core.scoring). Scoped rather than always on: torch.func.vmap cannot query a channels-last layout, and a
    block batched with vmap (benchmarks/gpu_check.py) must pool as nn.MaxPool2d does."""
    token = _EVALUATION_POOLING.set(True)
    try:
        yield
    finally:
        _EVALUATION_POOLING.reset(token)


class MaxPool(nn.MaxPool2d):
    """nn.MaxPool2d that, inside :func:`evaluation_pooling`, pools a CPU NCHW batch in channels-last layout and
    gives it back as NCHW: PyTorch's NCHW pooling kernel on the CPU is scalar, branches on every comparison and
    records indices even without gradients, so on activations without structure it takes a large share of an
    evaluation pass; its channels-last one is vectorised over channels (benchmarks/README.md, "The chain's
    evaluation on one core"). A maximum does not depend on the order its inputs are read in: the values are
    the same bit for bit. Elsewhere (training, other devices, vmap) it pools as nn.MaxPool2d does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _EVALUATION_POOLING.get() and x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous():
            return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()
        return super().forward(x)


class ConvEncoder(nn.Module):
    """conv3x3(32)-ReLU-maxpool2-dropout -> conv(64)-ReLU-dropout -> conv(128)-ReLU-maxpool2-dropout
    -> flatten -> FC256 -> BN (no BN with ``batch_norm=False``: the CT/FM blocks).  (B, C, H, W) -> (B, 256)."""

    def __init__(self, image_shape: tuple[int, int, int], dropout: float, batch_norm: bool = True) -> None:
        super().__init__()
        c, h, w = image_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), MaxPool(2), nn.Dropout(dropout),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Dropout(dropout),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), MaxPool(2), nn.Dropout(dropout),
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


# An image path: (image_shape, dropout, batch_norm) -> a module (B, C, H, W) -> (B, 256).
ImageEncoder = Callable[[tuple[int, int, int], float, bool], nn.Module]


class DTBlock(nn.Module):
    """One NoProp-DT block u_hat_t(z_{t-1}, x): returns class logits (B, m).

    The block's denoised estimate is ``softmax(logits) @ W_embed``, formed by the objective and the chain,
    because W_embed is shared state that the block does not own. ``encoder`` builds the image path (Fig. 6's
    :class:`ConvEncoder` by default; core.resnet's for the ``resnet`` block); the label path and the fusion
    are Fig. 6's. spec: a :class:`BlockSpec` (or a ModelSpec, which has the same fields).
    """

    def __init__(self, spec: BlockSpec | ModelSpec, encoder: ImageEncoder = ConvEncoder) -> None:
        super().__init__()
        self.spec = spec
        self.image_path = encoder(spec.image_shape, spec.dropout, True)
        # Prototype labels live in image space: same kind of image path (own weights) as the image.
        self.label_path: nn.Module = (
            encoder(spec.image_shape, spec.dropout, True) if spec.image_like_label else LabelEncoder(spec.embed_dim)
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
    """Fig. 6's block t (1..T) with initial weights that depend only on (seed, t): every process builds the same.
    (:func:`build_shard` builds ``spec.block``'s; for fig6 the two are the same.)"""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(shard_init_seed(seed, t, get_method(spec.method).time_conditioned))
        return DTBlock(spec)


class BlockError(ConfigError):
    """model.block cannot be used: its factory does not import, raises, or builds something that breaks the block
    contract. The message is one line that names the block and the problem (a ConfigError: the entry points
    print it and exit with code 2)."""


def block_factory(spec: ModelSpec) -> Callable[[BlockSpec], nn.Module]:
    """The factory ``spec.block`` stands for: the function the Python API was given, else the registered block
    or the import path (BlockError naming the module and why when it cannot be imported)."""
    if spec.block_factory is not None:
        return spec.block_factory
    from ..registry import ImportTargetError

    try:
        factory = BLOCKS.resolve(spec.block)
    except ImportTargetError as e:
        hint = ("; a function given to noprop_dist.train(block=...) from a script is not importable later: pass it "
                "again, load_chain(run_dir, block=fn)") if spec.block.startswith("__main__:") else ""
        raise BlockError(f"model.block={spec.block}: {e}{hint}") from None
    if not callable(factory):
        raise BlockError(f"model.block={spec.block}: names a {type(factory).__name__}, not a factory function "
                         "(BlockSpec) -> nn.Module")
    return factory


def make_shard(spec: ModelSpec, k: int) -> nn.Module:
    """Shard k's network (1..num_shards) from ``spec.block``'s factory, with whatever initial weights the global
    RNG gives (the chain loads trained weights into it). BlockError when the factory returns no nn.Module."""
    factory = block_factory(spec)
    net = factory(spec.block_spec(k))
    if not isinstance(net, nn.Module):
        raise BlockError(f"model.block={spec.block}: the factory returned a {type(net).__name__}, not a "
                         "torch.nn.Module")
    return net


def prefers_channels_last(net: nn.Module) -> bool:
    """Whether a network convolves its inputs: oneDNN's and cuDNN's convolutions run faster on NHWC (channels
    last) activations, so its weights and images are kept so; a network without convolutions gets images as
    they come (a ``view`` of a channels-last tensor would fail in it)."""
    return any(isinstance(m, nn.Conv2d) for m in net.modules())


def build_shard(spec: ModelSpec, k: int, seed: int) -> nn.Module:
    """Shard k's network with initial weights that depend only on (seed, k): every process builds the same."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(shard_init_seed(seed, k, get_method(spec.method).time_conditioned))
        return make_shard(spec, k)

"""The ModelSpec a config asks for on a dataset, the check of its block, and the initial label prototypes."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..core import ModelSpec, prototype_embedding
from ..core.block_check import check_block
from ..data import ImageDataset, normalize
from ..registry import get_method


def model_spec(cfg: Config, image_shape: tuple[int, int, int], num_classes: int,
               block: Callable[..., nn.Module] | None = None) -> ModelSpec:
    """The ModelSpec a config asks for on a dataset of this shape (its chain samples with eval.sampler), with as
    many shards as the method counts (registry.Method.shards_key: T blocks, K time-shards, else one network).
    block: the factory itself, when the Python API was given one (cfg.model.block then records its path)."""
    m = cfg.model
    c, h, w = image_shape
    embed_dim = {"one_hot": num_classes, "learned": m.embedding_dim, "prototype": c * h * w}[m.embedding]
    return ModelSpec(
        image_shape=tuple(image_shape), num_classes=num_classes,
        num_shards=get_method(m.method).num_shards(m) or 1, embedding=m.embedding,
        embed_dim=embed_dim, dropout=m.dropout, class_prob=m.class_prob, radial_sigma=m.radial_sigma,
        eta=m.eta, abar_max=m.abar_max, method=m.method, inference_steps=m.inference_steps,
        sampler=cfg.eval.sampler, ensemble_draws=cfg.eval.ensemble_draws,
        shard_partition=m.shard_partition, shard_overlap=m.shard_overlap, ct_loss_weight=m.ct_loss_weight,
        image_batch_norm=m.image_batch_norm, ct_readout=m.ct_readout, fm_target=m.fm_target,
        block=m.block, block_factory=block,
    )


def checked_spec(cfg: Config, dataset: ImageDataset, block: Callable[..., nn.Module] | None = None) -> ModelSpec:
    """:func:`model_spec` for ``dataset``, after its block has been built and run on two of the dataset's training
    images (core.block_check: BlockError, one line, when it breaks the block contract)."""
    spec = model_spec(cfg, dataset.image_shape, dataset.num_classes, block)
    two = torch.from_numpy(np.ascontiguousarray(dataset.train_x[:2]))
    check_block(spec, normalize(two, dataset.mean, dataset.std), cfg.train.seed)
    return spec


def initial_prototypes(spec: ModelSpec, dataset: ImageDataset, seed: int) -> torch.Tensor | None:
    """(m, C*H*W) prototype initialisation for the prototype embedding, else None."""
    if spec.embedding != "prototype":
        return None
    images = normalize(torch.from_numpy(np.ascontiguousarray(dataset.train_x)), dataset.mean, dataset.std)
    return prototype_embedding(images, torch.from_numpy(dataset.train_y), spec.num_classes, seed=seed)

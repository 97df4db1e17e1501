"""The ModelSpec a config asks for on a dataset, and the initial label prototypes it needs."""
from __future__ import annotations

import numpy as np
import torch

from ..config import Config
from ..core import ModelSpec, prototype_embedding
from ..data import ImageDataset, normalize


def model_spec(cfg: Config, image_shape: tuple[int, int, int], num_classes: int) -> ModelSpec:
    """The ModelSpec a config asks for on a dataset of this shape (its chain samples with eval.sampler)."""
    m = cfg.model
    c, h, w = image_shape
    embed_dim = {"one_hot": num_classes, "learned": m.embedding_dim, "prototype": c * h * w}[m.embedding]
    return ModelSpec(
        image_shape=tuple(image_shape), num_classes=num_classes,
        num_shards=m.num_blocks if m.method == "noprop_dt" else m.num_shards, embedding=m.embedding,
        embed_dim=embed_dim, dropout=m.dropout, class_prob=m.class_prob, radial_sigma=m.radial_sigma,
        eta=m.eta, abar_max=m.abar_max, method=m.method, inference_steps=m.inference_steps,
        sampler=cfg.eval.sampler, ensemble_draws=cfg.eval.ensemble_draws,
        shard_partition=m.shard_partition, shard_overlap=m.shard_overlap, ct_loss_weight=m.ct_loss_weight,
        image_batch_norm=m.image_batch_norm, ct_readout=m.ct_readout, fm_target=m.fm_target,
    )


def initial_prototypes(spec: ModelSpec, dataset: ImageDataset, seed: int) -> torch.Tensor | None:
    """(m, C*H*W) prototype initialisation for the prototype embedding, else None."""
    if spec.embedding != "prototype":
        return None
    images = normalize(torch.from_numpy(np.ascontiguousarray(dataset.train_x)), dataset.mean, dataset.std)
    return prototype_embedding(images, torch.from_numpy(dataset.train_y), spec.num_classes, seed=seed)

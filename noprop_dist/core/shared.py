"""Shared state of NoProp: the label embedding W_embed (m x d) and the classifier head theta_out, plus
(NoProp-CT only) the learnable noise schedule.

Every block's loss touches it, so in the distributed run it lives on the parameter server, and each worker
trains against a replica of it (``training.shared_state``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import get_method
from .blocks import ModelSpec
from .schedules import LearnedSchedule
from .seeds import shared_init_seed


class SharedState(nn.Module):
    """W_embed (m, d) and the head f_out: Linear(d -> m); for noprop_ct also ``schedule`` (LearnedSchedule).

    one_hot: W_embed = I, fixed (a buffer, no gradient). learned / prototype: a parameter.
    The schedule is built last, so embed and head get the same initial values for every method (and DT / FM
    keep exactly the parameter names of older checkpoints).
    """

    def __init__(self, spec: ModelSpec, prototype_init: torch.Tensor | None = None) -> None:
        super().__init__()
        m, d = spec.num_classes, spec.embed_dim
        if spec.embedding == "one_hot":
            if d != m:
                raise ValueError(f"one_hot embedding needs d == m, got d={d}, m={m}")
            self.register_buffer("embed", torch.eye(m))
        elif spec.embedding == "learned":
            # Scaled so that ||u_y|| ~ 1, the same scale as one-hot rows.
            self.embed = nn.Parameter(torch.randn(m, d) / d**0.5)
        elif spec.embedding == "prototype":
            if prototype_init is None:  # a replica whose values arrive by load_state_dict
                prototype_init = torch.zeros(m, d)
            if tuple(prototype_init.shape) != (m, d):
                raise ValueError(f"prototype_init must be ({m}, {d}), got {tuple(prototype_init.shape)}")
            self.embed = nn.Parameter(prototype_init.clone().float())
        else:
            raise ValueError(f"unknown embedding {spec.embedding!r}")
        self.head = nn.Linear(d, m)
        if get_method(spec.method).learned_schedule:
            # Every shard's loss reaches it; it is shared like W_embed.
            self.schedule = LearnedSchedule()


def build_shared(spec: ModelSpec, seed: int, prototype_init: torch.Tensor | None = None) -> SharedState:
    """Shared state whose initial values depend only on the seed (and the data, for prototypes)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(shared_init_seed(seed))
        return SharedState(spec, prototype_init)


def prototype_embedding(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, max_per_class: int = 1000, seed: int = 0
) -> torch.Tensor:
    """Per class, the image with the smallest median distance to the other images of its class.

    images: (N, C, H, W) float (already normalised), labels: (N,) -> (m, C*H*W).
    At most ``max_per_class`` images per class (a fixed random subset) enter the median, which keeps
    the pairwise distances at m * max_per_class^2 instead of N^2.
    """
    gen = torch.Generator().manual_seed(seed)
    flat = images.reshape(images.shape[0], -1).float()
    protos = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() == 0:
            raise ValueError(f"class {c} has no training images; cannot build its prototype")
        if idx.numel() > max_per_class:
            idx = idx[torch.randperm(idx.numel(), generator=gen)[:max_per_class]]
        members = flat[idx]
        if members.shape[0] == 1:
            protos.append(members[0])
            continue
        # Sorted rows start with each image's zero distance to itself: drop it, keep the others'.
        others = torch.cdist(members, members).sort(dim=1).values[:, 1:]
        protos.append(members[int(others.median(dim=1).values.argmin())])
    return torch.stack(protos)

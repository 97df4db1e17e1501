"""The in-process reference run: every shard and the shared-state server in one process, no Ray."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import Config, worker_threads
from ..core import default_device
from ..data import ImageDataset
from .loop import ShardGroup
from .shared_state import LocalClient, SharedStateServer
from .spec import initial_prototypes, model_spec


def train_in_process(
    cfg: Config, dataset: ImageDataset,
    on_epoch: Callable[[int, ShardGroup, SharedStateServer], None] | None = None,
    device: torch.device | str | None = None, block: Callable[..., nn.Module] | None = None,
) -> tuple[dict[int, dict], dict, ShardGroup]:
    """The reference run: every block and the shared-state server in this process, no Ray.

    Runs exactly the code a single Ray worker runs (same ShardGroup, same protocol and server logic, same
    seeds), on ``device`` (None: the GPU when there is one). block: the block factory, when the run's was given
    to the Python API as a function (else cfg.model.block's).
    Returns (block states, server state, the group with its stats).
    """
    torch.set_num_threads(worker_threads(cfg.cluster))
    spec = model_spec(cfg, dataset.image_shape, dataset.num_classes, block)
    server = SharedStateServer(spec, cfg.train.seed, initial_prototypes(spec, dataset, cfg.train.seed),
                               sources=["w0"], mode=cfg.train.sync_mode)
    group = ShardGroup(
        spec, list(range(1, spec.num_shards + 1)), cfg.train, dataset.train_x, dataset.train_y,
        dataset.mean, dataset.std, LocalClient(server, "w0"),
        device=default_device() if device is None else torch.device(device),
    )
    for epoch in range(cfg.train.passes):
        group.train_epoch(epoch)
        if on_epoch is not None:  # e.g. time the epoch or evaluate the chain as it stands
            on_epoch(epoch, group, server)
    return group.state_dicts(), server.state_dict(), group

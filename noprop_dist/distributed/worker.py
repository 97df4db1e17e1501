"""The worker actor: trains its shard group; talks to the parameter server through :class:`RayClient`."""
from __future__ import annotations

import os
import time

import numpy as np
import ray
import torch

from ..config import TrainConfig
from ..core import ModelSpec
from ..shared_server import TensorDict
from ..training import ShardGroup, peak_rss_mb


class RayClient:
    """Parameter-server access from a worker.

    sync: a push returns once the server applied it (the worker never runs ahead of its own updates);
    async: a push is sent and not waited for (Ray keeps the calls of one caller in order).
    Pulls always wait: the replica must be a real version of the server's state.
    """

    def __init__(self, server: "ray.actor.ActorHandle", mode: str) -> None:
        self.server, self.mode = server, mode
        self.pending: list[ray.ObjectRef] = []
        self.push_seconds = 0.0
        self.pull_seconds = 0.0

    def push(self, grads: TensorDict) -> None:
        t0 = time.perf_counter()
        ref = self.server.push.remote(grads)
        if self.mode == "sync":
            ray.get(ref)
        else:
            self.pending.append(ref)
            if len(self.pending) >= 64:  # bound the refs we hold; surfaces server errors too
                ready, self.pending = ray.wait(self.pending, num_returns=len(self.pending) - 16, timeout=None)
                ray.get(ready)
        self.push_seconds += time.perf_counter() - t0

    def pull(self) -> tuple[int, TensorDict]:
        t0 = time.perf_counter()
        out = ray.get(self.server.pull.remote())
        self.pull_seconds += time.perf_counter() - t0
        return out

    def flush(self) -> None:
        ray.get(self.pending)
        self.pending = []


# max_concurrency=2: `progress` answers while `train_epoch` runs (it only reads counters).
@ray.remote(max_concurrency=2)
class Worker:
    def __init__(
        self, rank: int, spec: ModelSpec, block_ids: list[int], train: TrainConfig, threads: int, device: str,
        train_x: np.ndarray, train_y: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
        server: "ray.actor.ActorHandle", states: dict[int, dict] | None,
    ) -> None:
        # Its share of the cores: two 1-thread processes beat one 2-thread process on 2 cores.
        torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.rank = rank
        self.client = RayClient(server, train.sync_mode)
        # train_x arrives as a zero-copy, read-only view of the object store: batches are gathered from it.
        self.group = ShardGroup(spec, block_ids, train, train_x, train_y, mean, std, self.client, torch.device(device))
        if states:
            self.group.load_state_dicts(states)
        self.device = device
        self.epoch_seconds = 0.0

    def train_epoch(self, epoch: int) -> dict:
        t0 = time.perf_counter()
        stats = self.group.train_epoch(epoch)
        self.client.flush()
        self.epoch_seconds += time.perf_counter() - t0
        return self.report() | {"blocks": stats}

    def report(self) -> dict:
        return {
            "rank": self.rank, "pid": os.getpid(), "device": self.device, "peak_rss_mb": peak_rss_mb(),
            "push_seconds": self.client.push_seconds, "pull_seconds": self.client.pull_seconds,
            "epoch_seconds": self.epoch_seconds, "zero_copy_data": not self.group.train_x.flags.writeable,
        }

    def progress(self) -> dict[int, dict]:
        return {t: st.as_dict() for t, st in self.group.stats.items()}

    def state_dicts(self) -> dict[int, dict]:
        return self.group.state_dicts()

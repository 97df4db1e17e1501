"""Data-parallel backprop / adjoint baselines on Ray Train (``TorchTrainer``, DDP), cluster.num_workers > 1.

Each of the N workers builds the same model (same seed), wrapped by ``ray.train.torch.prepare_model`` in
DistributedDataParallel, and takes its 1/N slice of every epoch's shuffled order (``runner.rank_batches``;
train.batch_size is the global batch), so an epoch sees the data once across the workers and DDP averages
the gradients. Rank 0 evaluates, logs and writes the run directory's checkpoint after each epoch, the same
files the single-process path writes (so either can resume the other); every rank reports to Ray Train once
per epoch (``ray.train.report`` is a barrier). Ray Train's own storage (``RunConfig.storage_path``) is
``<run.dir>/ray_train``: it holds Ray's run state only, no model checkpoints. The run directory must therefore be
on storage every node can reach (as Ray Train requires of storage_path on a multi-node cluster).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import ray
import torch

from ..baselines.learner import build_learner
from ..baselines.runner import LEARNER_SHARD, Log, empty_progress, train_epochs
from ..config import ClusterConfig, Config, config_from_dict, worker_threads
from ..data import ImageDataset
from ..registry import get_method
from ..storage.checkpoints import Resume
from ..storage.run_dir import RunDir
from ..training import model_spec
from .cluster import connect, disconnect, ship_block


def connect_for_train(c: ClusterConfig) -> bool:
    """``cluster.connect`` as Ray Train needs it; True when a local cluster was started here.

    A local cluster gets the dashboard: Ray Train's placement-group cleaner reads the controller's liveness
    from the state API and, on a cluster without one, removes the workers' placement group about 100 s into
    the run, which ends any longer training.
    """
    return connect(c.num_workers * c.cpus_per_worker, dashboard=True, allow_unauthenticated=c.allow_unauthenticated)


def fit(cfg: Config, dataset: ImageDataset, rundir: RunDir, resume: Resume | None, log: Log = print,
        block: Callable | None = None) -> Any:
    """Train epochs ``resume.epochs_done .. train.epochs - 1`` on cfg.cluster.num_workers Ray Train workers.
    block: the block factory the Python API was given (it travels to the workers as the NoProp workers' does).

    Joins the running Ray cluster or starts a local one on loopback (``cluster.connect``, token auth as Ray sets
    it); a cluster started here is shut down at the end. Returns Ray Train's ``Result``.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    c = cfg.cluster
    run_dir = os.path.abspath(rundir.path)  # workers do not share the driver's working directory
    started = connect_for_train(c)
    # backprop trains model.block's blocks; the factory travels to the workers as the NoProp workers' does
    factory = (ship_block(model_spec(cfg, dataset.image_shape, dataset.num_classes, block)).block_factory
               if get_method(cfg.model.method).takes_block else None)
    try:
        resources = {"CPU": c.cpus_per_worker} | ({"GPU": c.gpus_per_worker} if c.gpus_per_worker > 0 else {})
        start = None
        if resume is not None:
            start = {"epochs_done": resume.epochs_done, "train_seconds": resume.train_seconds,
                     "learner": resume.block_states[LEARNER_SHARD]["learner"], "progress": resume.shared_state}
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"cfg": cfg.to_dict(), "run_dir": run_dir, "data": ray.put(dataset),
                               "start": ray.put(start), "block": factory},
            scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.gpus_per_worker > 0,
                                         resources_per_worker=resources),
            run_config=RunConfig(name="ray_train", storage_path=os.path.join(run_dir, "ray_train")),
        )
        log(f"[{cfg.model.method}] Ray Train: {c.num_workers} DDP workers, {resources} each")
        return trainer.fit()
    finally:
        disconnect(started)


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop: one DDP replica, its slice of each epoch."""
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(config["cfg"])
    torch.set_num_threads(worker_threads(cfg.cluster))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    dataset: ImageDataset = ray.get(config["data"])
    start = ray.get(config["start"])
    device = ray.train.torch.get_device()
    learner = build_learner(cfg, dataset, device, wrap=ray.train.torch.prepare_model, block=config["block"])
    if start is not None:
        learner.load_state_dict(start["learner"])

    def all_reduce(values: list[float], op: str) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
        torch.distributed.all_reduce(t, op=reduce_op)
        return (t / world if op == "mean" else t).tolist()

    train_epochs(
        cfg, dataset, learner, RunDir(config["run_dir"]), start["epochs_done"] if start else 0,
        start["train_seconds"] if start else 0.0, start["progress"] if start else empty_progress(),
        log=lambda s: print(s, flush=True), rank=rank, world=world, all_reduce=all_reduce, report=ray.train.report,
    )

"""``run_baseline``: train (or resume, or re-evaluate) a baseline run, write ``<run.dir>/summary.json``.

The run directory has the NoProp driver's layout (``storage.run_dir.RunDir``): config snapshot with the
config-conflict check, a manifest and checksummed checkpoints per epoch. A baseline is stored as the single
"block" :data:`LEARNER_SHARD` (``{"learner": model + optimizer state dicts}``) and its progress (curve, peak
memory) in the slot the NoProp run uses for the parameter server; every file is torch.save of plain tensors /
numbers / strings, loaded with ``weights_only=True``.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from ..config import Config, ConfigError, worker_threads
from ..core.seeds import baseline_noise_seed, epoch_order_seed, global_rng_seed
from ..data import ImageDataset, dataset_for
from ..observability.progress import duration
from ..registry import METHODS, get_method
from ..storage.run_dir import RunDir
from ..storage.summary import run_summary, write_summary
from ..training import checked_spec, lr_schedule_factor, peak_rss_mb
from .learner import Learner, accuracy, build_learner

# A line every half minute: a long epoch (minutes on a full dataset) shows it moves; a short one stays quiet.
PROGRESS_EVERY_S = 30.0

Log = Callable[[str], None]
# Every baseline is checkpointed as one shard, its learner, in the slot of NoProp's shard 1.
LEARNER_SHARD = 1


def check_baseline(cfg: Config) -> None:
    """Config errors specific to the baselines (ConfigError naming the key)."""
    method = get_method(cfg.model.method)
    if method.noprop:
        raise ConfigError(f"model.method: {method.name!r} is not a baseline; "
                          f"allowed: {', '.join(name for name, m in METHODS.items() if not m.noprop)}")
    if not method.bf16 and cfg.train.precision == "bf16":
        raise ConfigError(f"train.precision: model.method={method.name} trains in fp32 only, got 'bf16' (auto gives "
                          "fp32 for it)")
    if not method.data_parallel and cfg.cluster.num_workers != 1:
        raise ConfigError(f"cluster.num_workers: must be 1 for model.method={method.name} (its layer-local updates "
                          f"are not data-parallel here), got {cfg.cluster.num_workers}")


def local_device(cfg: Config) -> torch.device:
    """cuda when asked for (cluster.device=cuda, or auto with gpus_per_worker > 0 and a GPU here), else cpu."""
    return torch.device("cuda" if cfg.cluster.wants_gpus and torch.cuda.is_available() else "cpu")


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, kind): torch.cuda.max_memory_allocated on a GPU ("gpu"), else this process's peak RSS ("rss")."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "gpu"
    return peak_rss_mb(), "rss"


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's shuffled sample order, a function of (seed, epoch) only: every rank draws the same one
    (the NoProp shard groups use the same seeding)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_order_seed(seed, epoch)))


def rank_batches(order: torch.Tensor, batch_size: int, rank: int, world: int) -> list[torch.Tensor]:
    """Rank ``rank``'s mini-batches of an epoch: its contiguous 1/world slice of ``order`` (equal lengths, so
    every rank takes the same number of steps, as DDP's all-reduce needs), in batches of
    ``batch_size // world`` (train.batch_size is the global batch). A trailing batch of one is dropped:
    BatchNorm cannot train on it."""
    per_rank = order.numel() // world
    mine = order[rank * per_rank : (rank + 1) * per_rank]
    bs = max(2, batch_size // world)
    return [mine[s : s + bs] for s in range(0, mine.numel(), bs) if min(bs, mine.numel() - s) > 1]


def replica_fingerprint(module: torch.nn.Module) -> list[float]:
    """(sum, sum of squares) over every parameter, in float64. DDP replicas that apply the same averaged
    gradients hold bit-identical weights, so their fingerprints are equal; any difference means they
    drifted apart (a gradient that was not all-reduced)."""
    # Tensor by tensor, not one concatenated float64 copy of the model: that copy (160 MB for the 20 M
    # parameters of the 28x28 chain) would land in the peak memory the run reports as its Table 2 figure.
    total = squares = 0.0
    for p in module.parameters():
        v = p.detach().double()
        total += float(v.sum())
        squares += float(v.square().sum())
    return [total, squares]


def empty_progress() -> dict[str, Any]:
    return {"curve": [], "peak_memory_mb": 0.0, "peak_memory_kind": "rss", "nonfinite_steps": 0,
            "last_epoch_loss": float("nan")}


def train_epochs(
    cfg: Config, dataset: ImageDataset, learner: Learner, rundir: RunDir, start_epoch: int, train_seconds: float,
    progress: dict[str, Any], log: Log = print, rank: int = 0, world: int = 1,
    all_reduce: Callable[[list[float], str], list[float]] | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Epochs ``start_epoch .. train.passes - 1`` of one process (rank of world). Rank 0 evaluates, logs and
    checkpoints; every rank calls ``report`` once per epoch (Ray Train's report is a barrier). Within an
    epoch rank 0 logs its step, loss, rate and ETA every PROGRESS_EVERY_S seconds.

    all_reduce(values, op) with op "mean" or "max" combines per-rank numbers (None: a single process).
    """
    t, every = cfg.train, getattr(cfg.eval, "every_epochs", 1)
    n = len(dataset.train_y)
    for epoch in range(start_epoch, t.passes):
        # Dropout and the noise (z_0, DTP's corruption) are seeded by (seed, epoch, rank): a resumed run repeats.
        torch.manual_seed(global_rng_seed(t.seed, epoch, rank))
        gen = torch.Generator().manual_seed(baseline_noise_seed(t.seed, epoch, rank))
        t0 = time.perf_counter()
        losses = []
        full = rank_batches(epoch_order(n, t.seed, epoch), t.batch_size, rank, world)
        batches = full[: t.batches_in(epoch, len(full))]  # a partial last epoch is cut short, on every rank alike
        shown = t0
        for step, idx in enumerate(batches, 1):
            learner.set_lr_factor(lr_schedule_factor(t, epoch + (step - 1) / len(full)))
            ids = idx.numpy()
            losses.append(learner.train_step(torch.from_numpy(dataset.train_x[ids]),
                                             torch.from_numpy(dataset.train_y[ids]), gen))
            now = time.perf_counter()
            if rank == 0 and now - shown >= PROGRESS_EVERY_S and step < len(batches):
                shown, spent = now, now - t0
                log(f"[{cfg.model.method}] epoch {epoch + 1}/{t.passes} step {step}/{len(batches)} | "
                    f"loss {np.mean(losses[-20:]):.4f} | {step * len(idx) * world / spent:.0f} samples/s | "
                    f"ETA {duration((len(batches) - step) * spent / step)}")
        epoch_s = time.perf_counter() - t0
        mem, kind = peak_memory(learner.device)
        values = [float(np.mean(losses)) if losses else float("nan"), epoch_s, mem, float(learner.nonfinite_steps)]
        if all_reduce is not None:
            loss, epoch_s = all_reduce(values[:2], "mean")  # DDP ranks run in lockstep: the mean epoch time
            mem, nonfinite = all_reduce(values[2:], "max")
            fp = replica_fingerprint(learner.module)
            top = all_reduce(fp + [-v for v in fp], "max")  # max and -min of each value over the ranks
            spread = max(top[i] + top[i + len(fp)] for i in range(len(fp)))
            if rank == 0:
                progress["replica_divergence"] = max(progress.get("replica_divergence") or 0.0, spread)
        else:
            loss, epoch_s, mem, nonfinite = values
        train_seconds += epoch_s
        done, last = epoch + 1, epoch + 1 == t.passes
        metrics = {"epoch": done, "loss": loss, "train_seconds": train_seconds}
        if rank == 0:
            progress.update(peak_memory_mb=max(progress["peak_memory_mb"], mem), peak_memory_kind=kind,
                            nonfinite_steps=int(nonfinite), last_epoch_loss=loss, precision=learner.precision)
            line = f"epoch {done}/{t.passes} | loss {loss:.4f} | {epoch_s:.1f}s training ({train_seconds:.1f}s in all)"
            if (every and done % every == 0) or last:
                split, x, y = dataset.eval_split()  # val when the run has a validation split, else test
                acc = accuracy(learner, x, y, cfg.eval.batch_size, cfg.eval.seed)
                # epochs trained: the budget itself after a partial last epoch (train.epochs = 0.5: 0.5)
                progress["curve"].append({"epoch": min(done, t.epochs), "train_seconds": train_seconds,
                                          f"{split}_accuracy": acc})
                metrics[f"{split}_accuracy"] = acc
                line += f" | {split} accuracy {acc:.4f}"
            if done % cfg.run.checkpoint_every == 0 or last:
                rundir.checkpoints.save_epoch(done, {LEARNER_SHARD: {"learner": learner.state_dict()}}, progress,
                                              train_seconds)
            log(f"[{cfg.model.method}] {line}")
        if report is not None:
            report(metrics)


DataParallel = Callable[[Config, ImageDataset, RunDir, Any, Log, Any], Any]


def run_baseline(cfg: Config, log: Log = print, data_parallel: DataParallel | None = None,
                 dataset: ImageDataset | None = None, block: Callable | None = None,
                 on_epoch: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Train (or resume) the baseline ``cfg.model.method`` names, evaluate it, write ``<run.dir>/summary.json``.

    cluster.num_workers = 1 trains in this process; more run data-parallel through ``data_parallel(cfg, dataset,
    rundir, resume, log, block)``, which trains the remaining epochs into ``rundir`` (``distributed.ray_train.fit``:
    DDP under Ray Train; this package does not import Ray, so the caller passes it). A run whose checkpoints
    already hold train.epochs epochs is re-evaluated, not retrained. Returns the summary (see ``summary.json``).
    dataset, block: the arrays and the block factory the Python API was given (see distributed.driver).
    on_epoch: called with each epoch's figures ({"epoch", "loss", "train_seconds", and the val or test accuracy
    when measured}): after each epoch in this process; for a data-parallel run, once training is done, for each
    epoch of its curve (the epochs run in Ray Train's workers).
    """
    check_baseline(cfg)
    if cfg.cluster.num_workers > 1 and data_parallel is None:
        raise ConfigError(f"cluster.num_workers: {cfg.cluster.num_workers} workers need a data-parallel trainer "
                          "(noprop_dist.train and python -m noprop_dist.run pass Ray Train's)")
    dataset = dataset_for(cfg, dataset, log)
    if get_method(cfg.model.method).takes_block:  # backprop trains model.block's blocks
        checked_spec(cfg, dataset, block)
    rundir = RunDir(cfg.run.dir)
    rundir.check(cfg)  # refuses (a driver already on run.dir included) before the lock creates anything
    with rundir.lock.hold(f"a {cfg.model.method} baseline run"):
        return _run_locked(cfg, dataset, rundir, log, data_parallel, block, on_epoch)


def _run_locked(cfg: Config, dataset: ImageDataset, rundir: RunDir, log: Log, data_parallel: DataParallel | None,
                block: Callable | None, on_epoch: Callable[[dict[str, Any]], Any] | None) -> dict[str, Any]:
    rundir.prepare(cfg)
    device = local_device(cfg)
    torch.set_num_threads(worker_threads(cfg.cluster))
    learner = build_learner(cfg, dataset, device, block=block)
    resume = rundir.checkpoints.load_resume(LEARNER_SHARD, warn=log)
    done = resume.epochs_done if resume else 0
    workers = cfg.cluster.num_workers
    log(f"{cfg.model.method} on {dataset.name}: {len(dataset.train_y)} train / {len(dataset.test_y)} test images "
        f"{dataset.image_shape}; {workers} worker{'' if workers == 1 else 's'}; run dir {rundir.path}")
    if resume and done >= cfg.train.passes:
        log(f"run already finished ({done} epochs); not retraining, re-evaluating its checkpoint")
    else:
        if resume:
            log(f"resuming from epoch {done} (checkpoints in {rundir.checkpoints.dir})")
        if cfg.cluster.num_workers == 1:
            if resume:
                learner.load_state_dict(resume.block_states[LEARNER_SHARD]["learner"])
            progress = resume.shared_state if resume else empty_progress()
            train_epochs(cfg, dataset, learner, rundir, done, resume.train_seconds if resume else 0.0, progress, log,
                         report=on_epoch)
        else:
            data_parallel(cfg, dataset, rundir, resume, log, block)
            if on_epoch is not None:
                for point in rundir.checkpoints.load_resume(LEARNER_SHARD, warn=log).shared_state["curve"]:
                    if point["epoch"] > done:
                        on_epoch(dict(point))
        resume = rundir.checkpoints.load_resume(LEARNER_SHARD, warn=log)
    learner.load_state_dict(resume.block_states[LEARNER_SHARD]["learner"])
    summary = _summary(cfg, dataset, learner, resume.shared_state, resume.train_seconds, rundir)
    write_summary(rundir.path, summary)
    log(f"[{cfg.model.method}] test accuracy {summary['test_accuracy']:.4f}, train accuracy "
        f"{summary['train_accuracy']:.4f}, {summary['train_seconds']:.1f}s training; summary in "
        f"{rundir.file('summary.json')}")
    return summary


def _summary(cfg: Config, dataset: ImageDataset, learner: Learner, progress: dict[str, Any], train_seconds: float,
             rundir: RunDir) -> dict[str, Any]:
    """The keys every run's summary has (:func:`storage.summary.run_summary`), plus the baseline's details."""
    test_acc = accuracy(learner, dataset.test_x, dataset.test_y, cfg.eval.batch_size, cfg.eval.seed)
    val_acc = (None if dataset.val_x is None else
               accuracy(learner, dataset.val_x, dataset.val_y, cfg.eval.batch_size, cfg.eval.seed))
    tx, ty = dataset.train_accuracy_subset()
    train_acc = accuracy(learner, tx, ty, cfg.eval.batch_size, cfg.eval.seed)
    m, method = cfg.model, get_method(cfg.model.method)
    shards = method.num_shards(m)  # backprop's T blocks; None: one network
    common = run_summary(
        cfg, test_accuracy=test_acc, train_accuracy=train_acc, train_accuracy_examples=len(ty),
        train_seconds=train_seconds, curve=progress["curve"], peak_memory_mb=float(progress["peak_memory_mb"]),
        peak_memory_kind=progress["peak_memory_kind"], num_shards=shards, run_dir=rundir.path)
    return {
        **common,
        "block": m.block,
        "data": dataset.summary(),
        "val_accuracy": val_acc,
        "final_loss": float(progress["last_epoch_loss"]),
        "nonfinite_steps": int(progress["nonfinite_steps"]),
        # train.precision as rank 0's training steps ran it ("fp32" or "bf16"), not as this process would
        "precision": progress.get("precision", learner.precision),
        # DDP only: the largest spread of the replicas' weight fingerprints over the epochs; 0.0 when in sync
        "replica_divergence": progress.get("replica_divergence"),
        "num_blocks": shards,
        "inference_steps": method.steps(m.inference_steps),
    }

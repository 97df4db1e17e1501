"""The Ray driver: data into the object store once, one placement group, a parameter server, W workers,
epoch by epoch with checkpoints, then the assembled chain evaluated and saved."""
from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Callable

import ray

from ..config import Config, ConfigError
from ..core import ModelSpec
from ..data import ImageDataset, dataset_for
from ..observability.metrics import run_id as metrics_run_id
from ..observability.progress import ProgressDisplay
from ..observability.run_log import MetricsLog, write_report
from ..storage.run_dir import RunDir, atomic_write_json
from ..storage.summary import (
    SummaryError,
    describe_model,
    read_summary,
    run_summary,
    write_summary,
)
from ..training import (
    checked_spec,
    evaluate_states,
    final_evaluation,
    peak_rss_mb,
    split_accuracy,
)
from .cluster import connect, ship_block
from .supervisor import Supervisor, split_reports

# The chain's accuracy on the evaluation split (val when the run has one, else test) against cumulative training
# time, one point per evaluation: {"epoch", "train_seconds", "val_accuracy" | "test_accuracy"}.
CURVE_FILE = "curve.json"


def _check_resources(cfg: Config) -> None:
    """Refuse, before placing anything, a run that asks for more GPUs than the cluster has."""
    c = cfg.cluster
    need_gpus = c.num_workers * c.gpus_per_worker
    have_gpus = ray.cluster_resources().get("GPU", 0.0)
    if need_gpus > have_gpus + 1e-9:
        raise ConfigError(
            f"cluster.gpus_per_worker: {c.num_workers} workers x {c.gpus_per_worker:g} GPU = {need_gpus:g} GPUs, "
            f"the cluster has {have_gpus:g}"
        )


def _train_on_ray(cfg: Config, spec: ModelSpec, dataset: ImageDataset, rundir: RunDir, resume: Any,
                  display: ProgressDisplay, mlog: MetricsLog, run_label: str | None,
                  curve: list[dict]) -> tuple[dict[int, dict], dict, list[dict], float, list[dict]]:
    """Train the remaining epochs; returns (block states, server state, worker reports, train seconds,
    restart events). ``curve`` gets a point on the evaluation split (val, else test) every
    ``eval.every_epochs`` (not the last epoch: the caller measures that one).

    run_label: the `run` label of the metrics the actors export, None when they export none.
    """
    sup = Supervisor(cfg, spec, dataset, rundir, resume, display, run_label)
    train_seconds = resume.train_seconds if resume else 0.0
    start_epoch = resume.epochs_done if resume else 0
    reports: list[dict] = []
    epoch_seconds: list[float] = []
    try:
        for epoch in range(start_epoch, cfg.train.passes):
            t0 = time.perf_counter()
            reports = sup.run_epoch(epoch, mlog)
            epoch_seconds.append(time.perf_counter() - t0)
            train_seconds += epoch_seconds[-1]
            done = epoch + 1
            blocks, by_rank = split_reports(reports)
            display.update(blocks, sup.owner, force=True)
            mlog.record(blocks, by_rank, sup.owner, event="epoch")
            every = cfg.eval.every_epochs
            last = done == cfg.train.passes
            evaluate_now = every > 0 and done % every == 0 and not last
            if done % cfg.run.checkpoint_every == 0 or last or evaluate_now:
                states, shared_state, replicas = sup.states(epoch, mlog)
            if done % cfg.run.checkpoint_every == 0 or last:
                rundir.save_epoch(done, states, shared_state, train_seconds, replicas)
                display.message(f"epoch {done}/{cfg.train.passes} done in {epoch_seconds[-1]:.1f}s; "
                                f"checkpoint saved to {rundir.ckpt_dir}")
            if evaluate_now:  # on the driver, outside train_seconds
                split = dataset.eval_split()[0]
                _, acc = evaluate_states(spec, dataset, states, shared_state, cfg.eval.batch_size, cfg.eval.seed, split)
                curve.append({"epoch": done, "train_seconds": train_seconds, f"{split}_accuracy": acc})
                mlog.accuracy(done, acc, train_seconds, split)
                atomic_write_json(rundir.file(CURVE_FILE), curve)
                display.message(f"epoch {done}: {split} accuracy of the chain as it stands {acc:.4f}")
        for r in reports:
            r["epoch_wall_seconds"] = epoch_seconds
        return states, shared_state, reports, train_seconds, sup.events
    finally:
        sup.close()


def _connect_checked(cfg: Config) -> bool:
    """Join or start Ray and refuse a run the cluster cannot hold; returns whether this call started Ray."""
    started = connect(cfg.cluster.num_workers * cfg.cluster.cpus_per_worker, dashboard=cfg.metrics.enabled,
                      allow_unauthenticated=cfg.cluster.allow_unauthenticated)
    try:
        _check_resources(cfg)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    return started


def _read_curve(rundir: RunDir, epochs_done: int) -> list[dict]:
    """The accuracy curve measured so far, up to the epoch the run resumes from."""
    try:
        with open(rundir.file(CURVE_FILE), encoding="utf-8") as f:
            return [p for p in json.load(f) if p["epoch"] <= epochs_done]
    except (OSError, ValueError, TypeError, KeyError):
        return []


def run_training(cfg: Config, log: Callable[[str], None] = print, dataset: ImageDataset | None = None,
                 block: Callable | None = None) -> dict[str, Any]:
    """Train (or resume) the run ``cfg`` describes on Ray, evaluate the assembled chain, write the summary.

    dataset: the arrays the Python API was given (cfg.data.name is then "arrays"), else cfg.data's loader runs.
    block: the block factory the Python API was given (cfg.model.block records its import path).
    The dataset is loaded and the block built and run on two of its images (training.checked_spec) before anything
    is written or Ray starts. One driver per run.dir: a second one is refused (ConfigError naming the holder)
    while this one runs.
    """
    dataset = dataset_for(cfg, dataset, log)
    spec = ship_block(checked_spec(cfg, dataset, block))
    rundir = RunDir(cfg.run.dir)
    with contextlib.ExitStack() as held:  # the lock, once taken, is held until the summary is written
        return _run(cfg, spec, dataset, rundir, log,
                    lambda: held.enter_context(rundir.lock("a noprop_dist training run")))


def _run(cfg: Config, spec: ModelSpec, dataset: ImageDataset, rundir: RunDir, log: Callable[[str], None],
         take_lock: Callable[[], None]) -> dict[str, Any]:
    # Everything that can refuse the run does so before anything is written to run.dir (a driver already
    # running on it included).
    cleared = rundir.check(cfg)
    manifest = None if cleared else rundir.read_manifest()
    started, connected = False, False
    if manifest is None or manifest["epochs_done"] < cfg.train.passes:
        started, connected = _connect_checked(cfg), True
    try:
        take_lock()
        rundir.prepare(cfg)
        resume = rundir.load_resume(spec.num_shards)
        display = ProgressDisplay(cfg.train.passes, interval=cfg.train.log_every_seconds)
        run_label = metrics_run_id(cfg)
        mlog = MetricsLog(rundir.path, run_label, cfg.metrics.write_every_seconds, warn=log,
                          tensorboard=cfg.metrics.tensorboard)
        val = f" / {len(dataset.val_y)} val" if dataset.val_y is not None else ""
        log(f"{dataset.name}: {len(dataset.train_y)} train{val} / {len(dataset.test_y)} test images "
            f"{dataset.image_shape}, {dataset.num_classes} classes; {describe_model(spec.method, spec.num_shards)} "
            f"on {cfg.cluster.num_workers} workers, {spec.block} blocks; run dir {rundir.path}")
        reports: list[dict] = []
        events: list[dict] = []
        curve = _read_curve(rundir, resume.epochs_done if resume else 0)
        if resume and resume.epochs_done >= cfg.train.passes:
            log(f"run already finished ({resume.epochs_done} epochs); not retraining, re-evaluating its checkpoints")
            states, shared_state, train_seconds = resume.block_states, resume.shared_state, resume.train_seconds
        else:
            if resume:
                log(f"resuming from epoch {resume.epochs_done} (checkpoints in {rundir.ckpt_dir})")
            if not connected:  # the last epoch's checkpoint was unusable: there is training to do after all
                started, connected = _connect_checked(cfg), True
            if cfg.metrics.enabled:
                log(f"metrics: exported through Ray's metrics port with the label run=\"{run_label}\"")
            states, shared_state, reports, train_seconds, events = _train_on_ray(
                cfg, spec, dataset, rundir, resume, display, mlog, run_label if cfg.metrics.enabled else None, curve)
    finally:
        if started:
            ray.shutdown()
    if reports:
        # The training figures exist only in this process until summary.json holds them: written now, before
        # the evaluation, a driver killed from here on leaves them for the re-evaluation to keep.
        write_summary(rundir.path, _summary(
            cfg, spec, dataset, None, None, train_seconds, reports, shared_state, rundir, curve, events)
            | {"run_id": run_label, "status": "evaluating"})
    chain, evaluation = final_evaluation(spec, dataset, states, shared_state, cfg.eval.batch_size, cfg.eval.seed)
    accuracy = evaluation["test_accuracy"]
    split, _, _ = dataset.eval_split()
    # The test set is scored once, here; with a validation split the curve's last point is the final chain on it.
    val_accuracy = (split_accuracy(chain, dataset, "val", cfg.eval.batch_size, cfg.eval.seed)
                    if split == "val" else None)
    if not curve or curve[-1]["epoch"] < cfg.train.epochs:
        last = accuracy if val_accuracy is None else val_accuracy
        curve.append({"epoch": cfg.train.epochs, "train_seconds": train_seconds, f"{split}_accuracy": last})
        atomic_write_json(rundir.file(CURVE_FILE), curve)
        mlog.accuracy(cfg.train.epochs, last, train_seconds, split)
    mlog.close()
    train_accuracy = split_accuracy(chain, dataset, "train", cfg.eval.batch_size, cfg.eval.seed)
    chain.save(rundir.file("chain.pt"), extra={
        "dataset": cfg.data.name, "data_root": cfg.data.root, "test_limit": cfg.data.test_limit,
        "data_path": cfg.data.path, "image_size": cfg.data.image_size,
        "class_names": list(dataset.class_names) if dataset.class_names else None,
        "mean": list(dataset.mean), "std": list(dataset.std), "test_accuracy": accuracy,
        "eval_seed": cfg.eval.seed, "eval_batch_size": cfg.eval.batch_size,
    })
    summary = _summary(cfg, spec, dataset, accuracy, train_accuracy, train_seconds, reports, shared_state, rundir,
                       curve, events) | {"run_id": run_label, "status": "done", "val_accuracy": val_accuracy} | evaluation
    write_summary(rundir.path, summary)
    write_report(rundir.path, summary, run_label)
    return summary


def _summary(cfg: Config, spec: Any, dataset: ImageDataset, accuracy: float | None, train_accuracy: float | None,
             train_seconds: float, reports: list[dict], shared_state: dict, rundir: RunDir, curve: list[dict],
             events: list[dict]) -> dict[str, Any]:
    old: dict[str, Any] = {}
    if not reports:  # a finished run re-evaluated: keep the figures measured while it trained
        with contextlib.suppress(SummaryError):
            old = read_summary(rundir.path)
    blocks = [
        {"block": int(t), "worker": r["rank"], "samples_per_second": b["samples_per_second"],
         "final_loss": b["loss"], "last_epoch_mean_loss": b["last_epoch_mean_loss"], "steps": b["total_steps"],
         "compute_seconds": b["compute_seconds"], "sync_seconds": b["sync_seconds"],
         "nonfinite_events": b["nonfinite_events"], "stopped": b["stopped"], "restarts": r.get("restarts", 0)}
        for r in reports for t, b in r["blocks"].items()
    ]
    blocks.sort(key=lambda b: b["block"])
    step_s = sum(b["compute_seconds"] + b["sync_seconds"] for b in blocks)
    sync_s = sum(b["sync_seconds"] for b in blocks)
    gpu = [r["peak_gpu_mb"] for r in reports if r.get("peak_gpu_mb") is not None]
    if reports:
        memory = (max(gpu), "gpu") if gpu else (max(r["peak_rss_mb"] for r in reports), "rss")
    else:
        memory = (old.get("peak_memory_mb"), old.get("peak_memory_kind"))
    common = run_summary(
        cfg, test_accuracy=accuracy, train_accuracy=train_accuracy,
        train_accuracy_examples=len(dataset.train_accuracy_indices()), train_seconds=train_seconds,
        curve=curve, peak_memory_mb=memory[0], peak_memory_kind=memory[1], num_shards=spec.num_shards,
        run_dir=rundir.path)
    return {
        **common,
        "block": spec.block,
        "data": dataset.summary(),
        "num_blocks": cfg.model.num_blocks,
        "restarts": events if reports else old.get("restarts", []),
        "sync_mode": cfg.train.sync_mode,
        "shared_state_version": int(shared_state["version"]),
        "blocks": blocks or old.get("blocks", []),
        "sync_fraction_of_step_time": (sync_s / step_s) if step_s else old.get("sync_fraction_of_step_time"),
        # Wall time of each epoch trained in this invocation; the first includes starting the actors.
        "epoch_seconds": reports[0]["epoch_wall_seconds"] if reports else old.get("epoch_seconds", []),
        "workers": [
            {k: r[k] for k in ("rank", "pid", "device", "precision", "peak_rss_mb", "peak_gpu_mb", "exchanges", "exchange_seconds",
                               "push_seconds", "pull_seconds", "embedding_version_lag", "max_embedding_version_lag",
                               "max_stale_exchanges", "polls", "epoch_seconds", "zero_copy_data", "data_on_device",
                               "restarts", "server_resyncs")}
            for r in reports
        ] or old.get("workers", []),
        "driver_peak_rss_mb": peak_rss_mb(),
        "chain": rundir.file("chain.pt"),
    }

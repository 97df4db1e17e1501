"""The Ray driver: data into the object store once, one placement group, a parameter server, W workers,
epoch by epoch with checkpoints, then the assembled chain evaluated and saved."""
from __future__ import annotations

import json
import time
from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..checkpoint import RunDir, atomic_write_json
from ..config import Config, ConfigError, worker_threads
from ..data import ImageDataset, load_dataset
from ..metrics import run_id as metrics_run_id
from ..progress import ProgressDisplay
from ..report import MetricsLog, write_report
from ..training import assign_blocks, evaluate_states, initial_prototypes, model_spec, peak_rss_mb
from .cluster import connect
from .param_server import ParameterServer
from .worker import Worker

PLACEMENT_TIMEOUT_S = 120


def _check_resources(cfg: Config) -> None:
    """Refuse, before placing anything, a run that asks for more GPUs than the cluster has."""
    c = cfg.cluster
    need_gpus = c.num_workers * c.gpus_per_worker
    have_gpus = ray.cluster_resources().get("GPU", 0.0)
    if need_gpus > have_gpus + 1e-9:
        raise ConfigError(
            f"cluster.gpus_per_worker: {c.num_workers} workers x {c.gpus_per_worker} GPU = {need_gpus:g} GPUs, "
            f"the cluster has {have_gpus:g}"
        )


def _bundle(cfg: Config) -> dict[str, float]:
    bundle = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.gpus_per_worker > 0:
        bundle["GPU"] = cfg.cluster.gpus_per_worker
    return bundle


def _split(reports: list[dict]) -> tuple[dict[int, dict], dict[int, dict]]:
    """Workers' reports (``Worker.progress`` / ``train_epoch``) -> (block -> counters, rank -> report)."""
    return {t: b for r in reports for t, b in r["blocks"].items()}, {r["rank"]: r for r in reports}


def _train_on_ray(cfg: Config, dataset: ImageDataset, rundir: RunDir, resume: Any, display: ProgressDisplay,
                  mlog: MetricsLog, run_label: str | None) -> tuple[dict[int, dict], dict, list[dict], float]:
    """Train the remaining epochs; returns (block states, server state, worker reports, train seconds).

    run_label: the `run` label of the metrics the actors export, None when they export none.
    """
    spec = model_spec(cfg, dataset.image_shape, dataset.num_classes)
    c = cfg.cluster
    groups = assign_blocks(spec.num_blocks, c.num_workers)
    owner = {t: w for w, g in enumerate(groups) for t in g}
    # Once into the object store; every worker maps the same bytes read-only (no per-task copy).
    x_ref, y_ref = ray.put(dataset.train_x), ray.put(dataset.train_y)
    server = ParameterServer.remote(
        spec, cfg.train.lr, cfg.train.weight_decay, cfg.train.seed,
        None if resume else initial_prototypes(spec, dataset, cfg.train.seed),
        resume.shared_state if resume else None, run_id=run_label,
    )
    pg = placement_group([_bundle(cfg)] * c.num_workers, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(
            f"placement group of {c.num_workers} x {_bundle(cfg)} not placed within {PLACEMENT_TIMEOUT_S}s; "
            f"cluster resources: {ray.cluster_resources()}"
        )
    workers = [
        Worker.options(
            num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=w),
        ).remote(
            w, spec, groups[w], cfg.train, worker_threads(c), c.device, x_ref, y_ref, dataset.mean, dataset.std,
            server, {t: resume.block_states[t] for t in groups[w]} if resume else None, run_id=run_label,
        )
        for w in range(c.num_workers)
    ]
    train_seconds = resume.train_seconds if resume else 0.0
    start_epoch = resume.epochs_done if resume else 0
    reports: list[dict] = []
    epoch_seconds: list[float] = []
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            t0 = time.perf_counter()
            pending = [w.train_epoch.remote(epoch) for w in workers]
            remaining = list(pending)
            while remaining:
                _, remaining = ray.wait(remaining, num_returns=len(remaining), timeout=1.0)
                blocks, by_rank = _split(ray.get([w.progress.remote() for w in workers]))
                display.update(blocks, owner)
                mlog.record(blocks, by_rank, owner)
            reports = ray.get(pending)
            epoch_seconds.append(time.perf_counter() - t0)
            train_seconds += epoch_seconds[-1]
            done = epoch + 1
            blocks, by_rank = _split(reports)
            display.update(blocks, owner, force=True)
            mlog.record(blocks, by_rank, owner, event="epoch")
            if done % cfg.run.checkpoint_every == 0 or done == cfg.train.epochs:
                states = {t: s for part in ray.get([w.state_dicts.remote() for w in workers]) for t, s in part.items()}
                shared_state = ray.get(server.state_dict.remote())
                rundir.save_epoch(done, states, shared_state, train_seconds)
                display.message(f"epoch {done}/{cfg.train.epochs} done in {time.perf_counter() - t0:.1f}s; "
                                f"checkpoint saved to {rundir.ckpt_dir}")
        for r in reports:
            r["epoch_wall_seconds"] = epoch_seconds
        return states, shared_state, reports, train_seconds
    finally:
        for w in workers:
            ray.kill(w)
        ray.kill(server)
        remove_placement_group(pg)


def run_training(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume) the run ``cfg`` describes on Ray, evaluate the assembled chain, write the summary."""
    dataset = load_dataset(cfg.data.name, cfg.data.root, cfg.data.download, cfg.data.train_limit, cfg.data.test_limit)
    spec = model_spec(cfg, dataset.image_shape, dataset.num_classes)
    rundir = RunDir(cfg.run.dir)
    rundir.prepare(cfg)
    resume = rundir.load_resume(spec.num_blocks)
    display = ProgressDisplay(cfg.train.epochs, interval=cfg.train.log_every_seconds)
    run_label = metrics_run_id(cfg)
    mlog = MetricsLog(rundir.path, run_label, cfg.metrics.write_every_seconds)
    log(f"{cfg.data.name}: {len(dataset.train_y)} train / {len(dataset.test_y)} test images {dataset.image_shape}; "
        f"T={spec.num_blocks} blocks on {cfg.cluster.num_workers} workers; run dir {rundir.path}")
    reports: list[dict] = []
    if resume and resume.epochs_done >= cfg.train.epochs:
        log(f"run already finished ({resume.epochs_done} epochs); not retraining, re-evaluating its checkpoints")
        states, shared_state, train_seconds = resume.block_states, resume.shared_state, resume.train_seconds
    else:
        if resume:
            log(f"resuming from epoch {resume.epochs_done} (checkpoints in {rundir.ckpt_dir})")
        started = connect(cfg.cluster.num_workers * cfg.cluster.cpus_per_worker, metrics=cfg.metrics.enabled)
        if cfg.metrics.enabled:
            log(f"metrics: exported through Ray's metrics port with the label run=\"{run_label}\"")
        try:
            _check_resources(cfg)
            states, shared_state, reports, train_seconds = _train_on_ray(
                cfg, dataset, rundir, resume, display, mlog, run_label if cfg.metrics.enabled else None)
        finally:
            if started:
                ray.shutdown()
    chain, accuracy = evaluate_states(spec, dataset, states, shared_state, cfg.eval.batch_size, cfg.eval.seed)
    chain.save(rundir.file("chain.pt"), extra={
        "dataset": cfg.data.name, "data_root": cfg.data.root, "test_limit": cfg.data.test_limit,
        "mean": list(dataset.mean), "std": list(dataset.std), "test_accuracy": accuracy,
        "eval_seed": cfg.eval.seed, "eval_batch_size": cfg.eval.batch_size,
    })
    summary = _summary(cfg, accuracy, train_seconds, reports, shared_state, rundir) | {"run_id": run_label}
    atomic_write_json(rundir.file("summary.json"), summary)
    write_report(rundir.path, summary, run_label)
    return summary


def _summary(cfg: Config, accuracy: float, train_seconds: float, reports: list[dict], shared_state: dict,
             rundir: RunDir) -> dict[str, Any]:
    old = {}
    if not reports:  # a finished run re-evaluated: keep the figures measured while it trained
        try:
            with open(rundir.file("summary.json"), encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
    blocks = [
        {"block": int(t), "worker": r["rank"], "samples_per_second": b["samples_per_second"],
         "final_loss": b["loss"], "last_epoch_mean_loss": b["last_epoch_mean_loss"], "steps": b["total_steps"],
         "compute_seconds": b["compute_seconds"], "sync_seconds": b["sync_seconds"],
         "nonfinite_events": b["nonfinite_events"], "stopped": b["stopped"]}
        for r in reports for t, b in r["blocks"].items()
    ]
    blocks.sort(key=lambda b: b["block"])
    step_s = sum(b["compute_seconds"] + b["sync_seconds"] for b in blocks)
    sync_s = sum(b["sync_seconds"] for b in blocks)
    return {
        "test_accuracy": accuracy,
        "train_seconds": train_seconds,
        "num_workers": cfg.cluster.num_workers,
        "epochs": cfg.train.epochs,
        "dataset": cfg.data.name,
        "embedding": cfg.model.embedding,
        "num_blocks": cfg.model.num_blocks,
        "sync_mode": cfg.train.sync_mode,
        "shared_state_version": int(shared_state["version"]),
        "blocks": blocks or old.get("blocks", []),
        "sync_fraction_of_step_time": (sync_s / step_s) if step_s else old.get("sync_fraction_of_step_time"),
        # Wall time of each epoch trained in this invocation; the first includes starting the actors.
        "epoch_seconds": reports[0]["epoch_wall_seconds"] if reports else old.get("epoch_seconds", []),
        "workers": [
            {k: r[k] for k in ("rank", "pid", "device", "peak_rss_mb", "push_seconds", "pull_seconds",
                               "embedding_version_lag", "epoch_seconds", "zero_copy_data")}
            for r in reports
        ] or old.get("workers", []),
        "driver_peak_rss_mb": peak_rss_mb(),
        "run_dir": rundir.path,
        "chain": rundir.file("chain.pt"),
    }

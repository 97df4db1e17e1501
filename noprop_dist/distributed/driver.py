"""The Ray driver: data into the object store once, one placement group, a parameter server, W workers,
epoch by epoch with checkpoints, then the assembled chain evaluated and saved."""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import ray
import torch
from ray.util.placement_group import PlacementGroup, remove_placement_group

from ..config import Config, ConfigError
from ..core import ModelSpec, load_chain_file
from ..data import ImageDataset, dataset_for
from ..observability.metrics import run_id as metrics_run_id
from ..observability.progress import ProgressDisplay
from ..observability.run_log import MetricsLog, write_report
from ..storage.atomic import atomic_write_json
from ..storage.run_dir import RunDir
from ..storage.summary import (
    SummaryError,
    describe_model,
    read_summary,
    run_summary,
    write_summary,
)
from ..core.scoring import StageCounts
from ..training import assemble_chain, checked_spec, peak_rss_mb
from ..training.evaluation import EvalJob, final_jobs, final_report, score_locally
from ..training.selection import (
    CHAIN_FILE,
    LAST_CHAIN_FILE,
    Best,
    keep_if_best,
    read_best,
    should_stop,
)
from .cluster import connect, disconnect, ship_block
from .evaluator import ClusterEvaluator, PendingEvaluation
from .faults import driver_save_hook
from .supervisor import Observers, Supervisor, place_workers
from .worker import WorkerReport, shard_counters

# The chain's accuracy on the evaluation split (val when the run has one, else test) against cumulative training
# time, one point per evaluation: {"epoch", "train_seconds", "val_accuracy" | "test_accuracy"}.
CURVE_FILE = "curve.json"


def _check_resources(cfg: Config, have_gpus: float | None) -> None:
    """Refuse, before placing anything, a run that asks a local cluster (this process starts it: nothing adds
    nodes to it) for more GPUs than it has (``have_gpus``; None: not known). A joined cluster may be autoscaled:
    :func:`place_workers` waits."""
    c = cfg.cluster
    need_gpus = c.num_workers * c.gpus_per_worker
    if have_gpus is not None and need_gpus > have_gpus + 1e-9:
        raise ConfigError(
            f"cluster.gpus_per_worker: {c.num_workers} workers x {c.gpus_per_worker:g} GPU = {need_gpus:g} GPUs, "
            f"the cluster has {have_gpus:g}"
        )


@dataclass
class Final:
    """The end of a run: the chain it keeps, the best validation epoch, the last epoch's validation accuracy
    (both None without a validation split), and the figures of training.evaluation.final_report."""

    chain: torch.nn.Module
    best: Best | None
    last_val: float | None
    evaluation: dict[str, Any]


# Scores a chain on evaluation jobs: (chain, jobs) -> counts per job (the workers', or this process's).
Scorer = Callable[[torch.nn.Module, list[EvalJob]], dict[EvalJob, StageCounts]]


@dataclass
class Trained:
    """What the epochs trained in this invocation leave: the last states, the workers' last reports (empty when
    none were trained), the training seconds of the whole run, restart events, the best validation epoch so far,
    whether the run stopped early (its epoch, the best, the patience), and the wall seconds of each epoch trained
    here and between them (summary.json's epoch_seconds, epoch_boundary_seconds)."""

    states: dict[int, dict]
    shared_state: dict
    reports: list[WorkerReport]
    train_seconds: float
    events: list[dict]
    best: Best | None
    early_stop: dict | None = None
    final: Final | None = None  # the end-of-run evaluation, when the workers made it before they went
    epoch_seconds: list[float] = field(default_factory=list)
    # per epoch k > 1: the first worker's start of k minus the last worker's end of k - 1 (their wall clocks)
    boundary_seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class EpochFigures:
    """What ``noprop_dist.train(on_epoch=fn)`` gets after each epoch, as :meth:`as_dict`: the epoch (1-based)
    and the budget, the training seconds so far, each shard's mean loss over the epoch, the accuracy on the
    evaluation split when it was measured (``val_accuracy`` or ``test_accuracy``, else absent), the best
    validation epoch so far and whether the run stops early here."""

    epoch: int | float
    epochs: int | float  # train.epochs
    train_seconds: float
    losses: dict[int, float]  # shard -> its mean loss over the epoch
    best: Best | None
    split: str  # the evaluation split: val, else test
    accuracy: float | None = None  # on ``split``; None: not measured
    stopping_early: bool = False

    @classmethod
    def of(cls, cfg: Config, done: int | float, train_seconds: float, reports: list[WorkerReport], split: str,
           best: Best | None, accuracy: float | None = None) -> EpochFigures:
        losses = {int(t): b["last_epoch_mean_loss"] for t, b in sorted(shard_counters(reports).items())}
        return cls(done, cfg.train.epochs, train_seconds, losses, best, split, accuracy)

    def as_dict(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "epoch": self.epoch, "epochs": self.epochs, "train_seconds": self.train_seconds, "losses": self.losses,
            "best_epoch": self.best.epoch if self.best else None,
            "best_val_accuracy": self.best.val_accuracy if self.best else None,
            "stopping_early": self.stopping_early,
        }
        if self.accuracy is not None:
            info[f"{self.split}_accuracy"] = self.accuracy
        return info


OnEpoch = Callable[[dict[str, Any]], Any]


def _train_on_ray(cfg: Config, spec: ModelSpec, dataset: ImageDataset, rundir: RunDir, resume: Any,
                  display: ProgressDisplay, mlog: MetricsLog, run_label: str | None, curve: list[dict],
                  on_epoch: OnEpoch | None, finish: Callable[[Trained, Scorer], Final],
                  pg: PlacementGroup | None = None) -> Trained:
    """Train the remaining epochs, then ``finish`` (:func:`_final_evaluation`) scores the chain the run keeps on
    the workers before they go.

    ``curve`` gets a point on the evaluation split (val, else test) every ``eval.every_epochs`` (not the last
    epoch: the final evaluation measures that one). That evaluation runs on the workers while they train the
    next epoch, and so does the checkpoint's writing: the workers wait only for their states to be gathered.
    Its figures land after that next epoch: the curve, a new best epoch's chain.pt on a validation split
    (training.selection) and ``on_epoch`` (:class:`EpochFigures`, each epoch once, in order). With
    train.early_stop_patience the decision to go on needs the figures: the workers then wait for them. An
    evaluation still in flight when training ends runs beside the final one (on a validation split it lands
    first: it may change which chain the run keeps).

    run_label: the `run` label of the metrics the actors export, None when they export none.
    """

    def show(reports: list[WorkerReport], event: str = "poll") -> None:
        """The workers' reports to the progress lines and metrics.jsonl; event "epoch": an epoch ended."""
        blocks, owner = shard_counters(reports), {t: r.rank for r in reports for t in r.blocks}
        display.update(blocks, owner, force=event == "epoch")
        mlog.record(blocks, {r.rank: r.as_dict() for r in reports}, owner, event=event)

    sup = Supervisor(cfg, spec, dataset, rundir, resume, Observers(display.message, show), run_label, pg)
    train_seconds = resume.train_seconds if resume else 0.0
    start_epoch = resume.epochs_done if resume else 0
    split = dataset.eval_split()[0]
    evaluator = ClusterEvaluator(dataset, sorted({split, "test", "train"}), cfg.eval.batch_size, cfg.eval.seed,
                                 display.message)
    best = read_best(rundir.path) if split == "val" else None
    reports: list[WorkerReport] = []
    epoch_seconds: list[float] = []
    boundaries: list[float] = []  # per epoch k > 1: first worker's start of k minus the last worker's end of k - 1
    last_end: float | None = None
    early_stop = None
    # The evaluation in flight: its epoch, the training seconds then, the epoch's figures for on_epoch (None:
    # reported already) and the calls.
    pending: tuple[int, float, EpochFigures | None, PendingEvaluation] | None = None
    wait_for_figures = cfg.train.early_stop_patience > 0
    done = start_epoch  # epochs trained so far

    def evaluation_due(done: int) -> bool:
        every = cfg.eval.every_epochs
        return every > 0 and done % every == 0 and done != cfg.train.passes

    # on_epoch's figures not reported yet: those of epochs after one whose evaluation is in flight wait for it,
    # so that every epoch is reported once and in order.
    waiting: list[EpochFigures] = []

    def land(wait: bool = True) -> None:
        """Record the evaluation in flight (curve point, best chain, message) and queue its epoch's figures for
        on_epoch (:func:`report`). ``wait=False``: only if it is done already."""
        nonlocal pending, best
        if pending is None or not (wait or pending[3].done()):
            return
        done, seconds, info, evaluation = pending
        pending = None
        acc = evaluator.result(evaluation)[EvalJob(split)].accuracy()
        if split == "val":
            best = keep_if_best(evaluation.chain, done, acc, best, rundir.path, _chain_extra(cfg, dataset))
        curve.append({"epoch": done, "train_seconds": seconds, f"{split}_accuracy": acc})
        mlog.accuracy(done, acc, seconds, split)
        atomic_write_json(rundir.file(CURVE_FILE), curve)
        display.message(f"epoch {done}: {split} accuracy of the chain as it stands {acc:.4f}"
                        + (f" (best: epoch {best.epoch}, {best.val_accuracy:.4f})" if best else ""))
        if info is not None:
            waiting.append(replace(info, accuracy=acc, best=best))

    def report(info: EpochFigures | None = None) -> None:
        """Give on_epoch ``info`` (an epoch's figures) and what waited, in epoch order, up to the epoch whose
        evaluation is in flight."""
        if info is not None:
            waiting.append(info)
        waiting.sort(key=lambda i: i.epoch)
        hold = pending[0] if pending is not None and pending[2] is not None else None
        while waiting and on_epoch is not None and (hold is None or waiting[0].epoch < hold):
            on_epoch(waiting.pop(0).as_dict())

    try:
        if resume and evaluation_due(start_epoch) and (not curve or curve[-1]["epoch"] < start_epoch):
            # The driver stopped after that epoch's checkpoint, before its evaluation landed: measured now (its
            # figures were reported, or not, by the driver that stopped: not again).
            chain = assemble_chain(spec, resume.block_states, resume.shared_state)
            evaluation = evaluator.start(sup.workers, chain, [EvalJob(split)], start_epoch)
            pending = (start_epoch, train_seconds, None, evaluation)
            land()
        for epoch in range(start_epoch, cfg.train.passes):
            t0 = time.perf_counter()
            reports = sup.run_epoch(epoch)
            epoch_seconds.append(time.perf_counter() - t0)
            if last_end is not None:  # the time between epochs: gathering states, starting evaluations and saves
                boundaries.append(min(r.epoch_started for r in reports) - last_end)
            last_end = max(r.epoch_ended for r in reports)
            train_seconds += epoch_seconds[-1]
            done = epoch + 1
            show(reports, event="epoch")
            # The previous evaluation, scored on the workers while they trained this epoch; one that is not done
            # yet (it takes longer than an epoch: CT's 1,000 steps on a CPU) is left running, and this epoch is
            # not evaluated: the workers never wait for an evaluation.
            land(wait=wait_for_figures)
            report()
            last = done == cfg.train.passes
            evaluate_now = evaluation_due(done) and pending is None
            if evaluation_due(done) and pending is not None:
                display.message(f"epoch {done}: not evaluated, the evaluation of epoch {pending[0]} is still running "
                                "on the workers (an evaluation takes longer than an epoch here; eval.every_epochs "
                                "spaces them)")
            checkpoint_now = done % cfg.run.checkpoint_every == 0 or last
            if checkpoint_now or evaluate_now:
                gathered = sup.states(epoch)
            info: EpochFigures | None = EpochFigures.of(cfg, done, train_seconds, reports, split, best)
            if evaluate_now:
                chain = assemble_chain(spec, gathered.shards, gathered.shared)
                pending = (done, train_seconds, info, evaluator.start(sup.workers, chain, [EvalJob(split)], done))
                info = None  # reported when its figures land (at once when the workers wait for them)
                if wait_for_figures:
                    land()
            if should_stop(best, done, cfg.train.early_stop_patience) and not last:
                early_stop = {"epoch": done, "best_epoch": best.epoch, "patience": cfg.train.early_stop_patience}
                checkpoint_now = True
            if checkpoint_now:
                rundir.checkpoints.save_epoch_in_background(done, gathered.shards, gathered.shared, train_seconds,
                                                            gathered.replicas,
                                                            before_manifest=driver_save_hook(sup.faults, done))
                display.message(f"epoch {done}/{cfg.train.passes} done in {epoch_seconds[-1]:.1f}s; "
                                f"checkpoint being written to {rundir.checkpoints.dir}")
            if early_stop:  # this epoch's figures: landed just now (the workers waited for them), or not measured
                if info is not None:
                    info = replace(info, stopping_early=True)
                else:
                    waiting[-1] = replace(waiting[-1], stopping_early=True)
            if not last:  # the last epoch's figures come after the final evaluation
                report(info)
            if early_stop:
                display.message(f"stopping early after epoch {done}: the validation accuracy has not risen since "
                                f"epoch {best.epoch} (train.early_stop_patience={cfg.train.early_stop_patience})")
                break
        if split == "val":  # its figures may make its chain the best, which the final evaluation decides on
            land()
            report()

        def score_final(chain: torch.nn.Module, jobs: list[EvalJob]) -> dict[EvalJob, StageCounts]:
            # The final jobs go to the workers before an evaluation still in flight is waited for (one that
            # outlasted the epochs after it: CT's 1,000 steps on a CPU), so that the two run side by side, the
            # final one where the training ran, instead of one after the other.
            final = evaluator.start(sup.workers, chain, jobs, done)
            display.message("scoring the trained chain on the workers: " + "; ".join(
                f"{evaluator.sizes[job.split]} {job.split} images, {chain.sampler_name(job.sampler)}"
                + (" stage by stage" if job.stages else "") for job in jobs))
            land()
            report()
            return evaluator.result(final)

        trained = Trained(gathered.shards, gathered.shared, reports, train_seconds, sup.events, best, early_stop,
                          epoch_seconds=epoch_seconds, boundary_seconds=boundaries)
        trained.final = finish(trained, score_final)
        return trained
    finally:
        try:
            rundir.checkpoints.wait_for_saves()  # a checkpoint in writing is finished, whatever ended the run
        finally:
            sup.close()


def _chain_extra(cfg: Config, dataset: ImageDataset) -> dict[str, Any]:
    """What a chain file records besides the networks: where its data comes from (so that evaluate can load the
    test set again), the class names, the normalisation statistics and the evaluation's seed and batch size."""
    return {
        "dataset": cfg.data.name, "data_root": cfg.data.root, "test_limit": cfg.data.test_limit,
        "data_path": cfg.data.path, "image_size": cfg.data.image_size,
        "class_names": list(dataset.class_names) if dataset.class_names else None,
        "mean": list(dataset.mean), "std": list(dataset.std),
        "eval_seed": cfg.eval.seed, "eval_batch_size": cfg.eval.batch_size,
    }


def _connect_checked(cfg: Config, log: Callable[[str], None]) -> tuple[bool, PlacementGroup]:
    """Join or start Ray and place the workers' bundles (on a joined cluster, waiting for an autoscaler up to
    cluster.placement_timeout_s), refusing a run the cluster cannot hold before anything is written. Returns
    (whether this call started Ray, the placement group)."""
    started = connect(cfg.cluster.num_workers * cfg.cluster.cpus_per_worker, dashboard=cfg.metrics.enabled,
                      allow_unauthenticated=cfg.cluster.allow_unauthenticated,
                      before_local_start=lambda gpus: _check_resources(cfg, gpus))
    try:
        if started:
            _check_resources(cfg, ray.cluster_resources().get("GPU", 0.0))
        return started, place_workers(cfg, log)
    except BaseException:
        disconnect(started)
        raise


def _read_curve(rundir: RunDir, epochs_done: int) -> list[dict]:
    """The accuracy curve measured so far, up to the epoch the run resumes from."""
    try:
        with open(rundir.file(CURVE_FILE), encoding="utf-8") as f:
            return [p for p in json.load(f) if p["epoch"] <= epochs_done]
    except (OSError, ValueError, TypeError, KeyError):
        return []


def run_training(cfg: Config, log: Callable[[str], None] = print, dataset: ImageDataset | None = None,
                 block: Callable | None = None, on_epoch: OnEpoch | None = None) -> dict[str, Any]:
    """Train (or resume) the run ``cfg`` describes on Ray, evaluate the assembled chain, write the summary.

    dataset: the arrays the Python API was given (cfg.data.name is then "arrays"), else cfg.data's loader runs.
    block: the block factory the Python API was given (cfg.model.block records its import path).
    on_epoch: called after every epoch with its figures (:class:`EpochFigures`); what it raises ends the run,
    which resumes from that epoch's checkpoint.
    The dataset is loaded and the block built and run on two of its images (training.checked_spec) before anything
    is written or Ray starts. One driver per run.dir: a second one is refused (ConfigError naming the holder)
    while this one runs.
    """
    dataset = dataset_for(cfg, dataset, log)
    spec = ship_block(checked_spec(cfg, dataset, block))
    if cfg.train.early_stop_patience and dataset.val_y is None:
        raise ConfigError("train.early_stop_patience: stops on the validation accuracy, and this run has no "
                          "validation split: set data.val_fraction, or use a dataset with its own")
    rundir = RunDir(cfg.run.dir)
    with contextlib.ExitStack() as held:  # the lock, once taken, is held until the summary is written
        return _run(cfg, spec, dataset, rundir, log,
                    lambda: held.enter_context(rundir.lock.hold("a noprop_dist training run")), on_epoch)


def _stopped_early(rundir: RunDir) -> dict | None:
    """The early stop a finished run recorded in its summary.json, if any."""
    with contextlib.suppress(SummaryError):
        return read_summary(rundir.path).get("early_stop")
    return None


def _run(cfg: Config, spec: ModelSpec, dataset: ImageDataset, rundir: RunDir, log: Callable[[str], None],
         take_lock: Callable[[], None], on_epoch: OnEpoch | None) -> dict[str, Any]:
    # Everything that can refuse the run does so before anything is written to run.dir (a driver already
    # running on it included).
    cleared = rundir.check(cfg)
    manifest = None if cleared else rundir.checkpoints.read_manifest()
    stopped = None if cleared else _stopped_early(rundir)

    def finished(epochs_done: int) -> bool:
        """The budget is trained, or the run stopped early there under this patience (another one trains on)."""
        return epochs_done >= cfg.train.passes or (
            stopped is not None and stopped["epoch"] == epochs_done
            and stopped["patience"] == cfg.train.early_stop_patience)

    started, connected, pg = False, False, None
    if manifest is None or not finished(manifest["epochs_done"]):
        (started, pg), connected = _connect_checked(cfg, log), True
    split = dataset.eval_split()[0]
    run_label = metrics_run_id(cfg)

    def finish(trained: Trained, scorer: Scorer) -> Final:
        if trained.reports:
            # The training figures exist only in this process until summary.json holds them: written now, before
            # the evaluation, a driver killed from here on leaves them for the re-evaluation to keep.
            write_summary(rundir.path, _summary(cfg, spec, dataset, None, None, trained, rundir, curve)
                          | {"run_id": run_label, "status": "evaluating"})
        return _final_evaluation(cfg, spec, dataset, rundir, trained, scorer)

    try:
        take_lock()
        rundir.prepare(cfg)
        resume = rundir.checkpoints.load_resume(spec.num_shards)
        display = ProgressDisplay(cfg.train.passes, interval=cfg.train.log_every_seconds)
        mlog = MetricsLog(rundir.path, run_label, cfg.metrics.write_every_seconds, warn=log,
                          tensorboard=cfg.metrics.tensorboard, epochs_done=resume.epochs_done if resume else 0)
        val = f" / {len(dataset.val_y)} val" if dataset.val_y is not None else ""
        log(f"{dataset.name}: {len(dataset.train_y)} train{val} / {len(dataset.test_y)} test images "
            f"{dataset.image_shape}, {dataset.num_classes} classes; {describe_model(spec.method, spec.num_shards)} "
            f"on {cfg.cluster.num_workers} workers, {spec.block} blocks; run dir {rundir.path}")
        curve = _read_curve(rundir, resume.epochs_done if resume else 0)
        if resume and finished(resume.epochs_done):
            log(f"run already finished ({resume.epochs_done} epochs); not retraining, re-evaluating its checkpoints")
            trained = Trained(resume.block_states, resume.shared_state, [], resume.train_seconds, [],
                              read_best(rundir.path) if split == "val" else None, stopped)
        else:
            if resume:
                log(f"resuming from epoch {resume.epochs_done} (checkpoints in {rundir.checkpoints.dir})")
            if not connected:  # the last epoch's checkpoint was unusable: there is training to do after all
                (started, pg), connected = _connect_checked(cfg, log), True
            if cfg.metrics.enabled:
                log(f"metrics: exported through Ray's metrics port with the label run=\"{run_label}\"")
            trained = _train_on_ray(cfg, spec, dataset, rundir, resume, display, mlog,
                                    run_label if cfg.metrics.enabled else None, curve, on_epoch, finish, pg)
    finally:
        if pg is not None:  # placed, and the run ended before its supervisor took it over
            with contextlib.suppress(Exception):
                remove_placement_group(pg)
        disconnect(started)
    final = trained.final or finish(trained, lambda chain, jobs: score_locally(
        chain, dataset, jobs, cfg.eval.batch_size, cfg.eval.seed))
    chain, best, last_val, evaluation = final.chain, final.best, final.last_val, dict(final.evaluation)
    epochs = _epochs_trained(cfg, trained)
    accuracy, train_accuracy = evaluation["test_accuracy"], evaluation.pop("train_accuracy")
    if not curve or curve[-1]["epoch"] < epochs:
        point = accuracy if last_val is None else last_val  # the test set is scored once, here, with no val split
        curve.append({"epoch": epochs, "train_seconds": trained.train_seconds, f"{split}_accuracy": point})
        atomic_write_json(rundir.file(CURVE_FILE), curve)
        mlog.accuracy(epochs, point, trained.train_seconds, split)
    mlog.close()
    if on_epoch is not None and trained.reports and not trained.early_stop:
        on_epoch(EpochFigures.of(cfg, epochs, trained.train_seconds, trained.reports, split, best,
                                 accuracy if last_val is None else last_val).as_dict())
    chosen = {"best_epoch": best.epoch, "val_accuracy": best.val_accuracy} if best else {}
    chain.save(rundir.file(CHAIN_FILE), extra=_chain_extra(cfg, dataset) | {"test_accuracy": accuracy} | chosen)
    summary = _summary(cfg, spec, dataset, accuracy, train_accuracy, trained, rundir, curve) | {
        "run_id": run_label, "status": "done", "epochs_trained": epochs,
        "val_accuracy": best.val_accuracy if best else None, "best_epoch": best.epoch if best else None,
        "last_epoch_val_accuracy": last_val,
        "last_chain": rundir.file(LAST_CHAIN_FILE) if os.path.exists(rundir.file(LAST_CHAIN_FILE)) else None,
        "early_stop": trained.early_stop} | evaluation
    write_summary(rundir.path, summary)
    write_report(rundir.path, summary, run_label)
    return summary


def _epochs_trained(cfg: Config, trained: Trained) -> int | float:
    """The epochs the run's chain has trained: the budget, or where it stopped early."""
    return trained.early_stop["epoch"] if trained.early_stop else cfg.train.epochs


def _final_evaluation(cfg: Config, spec: ModelSpec, dataset: ImageDataset, rundir: RunDir, trained: Trained,
                      scorer: Scorer) -> Final:
    """The chain the run keeps as chain.pt (training.selection) and its end-of-run figures
    (training.evaluation.final_jobs: one pass over the test set for the run's sampler and its stages, the training
    subset, the paper's sampler only with eval.paper_sampler), scored by ``scorer`` (the workers, or this
    process for a finished run re-evaluated).

    Without a validation split the chain kept is the last epoch's; with one the best validation epoch's, the
    last epoch's then saved beside it as chain_last.pt unless it is the best."""
    epochs = _epochs_trained(cfg, trained)
    chain = last = assemble_chain(spec, trained.states, trained.shared_state)
    best, last_val = None, None
    if dataset.eval_split()[0] == "val":
        last_val = scorer(last, [EvalJob("val")])[EvalJob("val")].accuracy()
        best = trained.best
        if best is None or best.epoch == epochs or best.improved_by(last_val):
            with contextlib.suppress(FileNotFoundError):
                os.remove(rundir.file(LAST_CHAIN_FILE))  # from an earlier invocation whose last epoch was not the best
            best = Best(epochs, last_val)
        else:
            chain, _ = load_chain_file(rundir.file(CHAIN_FILE), block=spec.block_factory)
            last.save(rundir.file(LAST_CHAIN_FILE), extra=_chain_extra(cfg, dataset) | {"epoch": epochs,
                                                                                      "val_accuracy": last_val})
    counts = scorer(chain, final_jobs(chain, cfg.eval.paper_sampler, cfg.eval.train_accuracy))
    return Final(chain, best, last_val, final_report(chain, counts))


def _summary(cfg: Config, spec: Any, dataset: ImageDataset, accuracy: float | None, train_accuracy: float | None,
             trained: Trained, rundir: RunDir, curve: list[dict]) -> dict[str, Any]:
    reports, events, train_seconds = trained.reports, trained.events, trained.train_seconds
    old: dict[str, Any] = {}
    if not reports:  # a finished run re-evaluated: keep the figures measured while it trained
        with contextlib.suppress(SummaryError):
            old = read_summary(rundir.path)
    blocks = [
        {"block": int(t), "worker": r.rank, "samples_per_second": b["samples_per_second"],
         "final_loss": b["loss"], "last_epoch_mean_loss": b["last_epoch_mean_loss"], "steps": b["total_steps"],
         "compute_seconds": b["compute_seconds"], "sync_seconds": b["sync_seconds"],
         "nonfinite_events": b["nonfinite_events"], "stopped": b["stopped"], "restarts": r.restarts}
        for r in reports for t, b in r.blocks.items()
    ]
    blocks.sort(key=lambda b: b["block"])
    step_s = sum(b["compute_seconds"] + b["sync_seconds"] for b in blocks)
    sync_s = sum(b["sync_seconds"] for b in blocks)
    gpu = [r.peak_gpu_mb for r in reports if r.peak_gpu_mb is not None]
    if reports:
        memory = (max(gpu), "gpu") if gpu else (max(r.peak_rss_mb for r in reports), "rss")
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
        "shared_state_version": int(trained.shared_state["version"]),
        "blocks": blocks or old.get("blocks", []),
        "sync_fraction_of_step_time": (sync_s / step_s) if step_s else old.get("sync_fraction_of_step_time"),
        # Wall time of each epoch trained in this invocation; the first includes starting the actors.
        "epoch_seconds": trained.epoch_seconds if reports else old.get("epoch_seconds", []),
        # Between consecutive epochs of this invocation: from the last worker ending epoch k to the first starting
        # epoch k + 1 (the workers' wall clocks), the time the driver keeps them waiting.
        "epoch_boundary_seconds": trained.boundary_seconds if reports else old.get("epoch_boundary_seconds", []),
        "workers": [r.as_dict() for r in reports] or old.get("workers", []),
        "driver_peak_rss_mb": peak_rss_mb(),
        "chain": rundir.file(CHAIN_FILE),
    }

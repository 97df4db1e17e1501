"""The Ray driver: data into the object store once, one placement group, a parameter server, W workers,
epoch by epoch with checkpoints, then the assembled chain evaluated and saved."""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from ..checkpoint import Resume, RunDir, atomic_write_json
from ..config import Config, ConfigError, worker_threads
from ..data import ImageDataset, load_dataset
from ..metrics import run_id as metrics_run_id
from ..progress import ProgressDisplay
from ..report import MetricsLog, write_report
from ..training import (
    assign_blocks, evaluate_states, final_evaluation, initial_prototypes, model_spec, peak_rss_mb, replica_key,
    train_subset_accuracy,
)
from .cluster import connect
from .faults import faults_from_env
from .param_server import ParameterServer
from .supervisor import RestartBudget, TrainingFailed
from .worker import Worker

# The automatic cluster.hang_timeout_s never goes below this: starting an actor, importing torch and the first
# steps of a restarted worker take tens of seconds on a loaded machine.
HANG_FLOOR_S = 120.0
CURVE_FILE = "curve.json"  # test accuracy against cumulative training time, one point per evaluation


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


def _bundle(cfg: Config) -> dict[str, float]:
    bundle = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.gpus_per_worker > 0:
        bundle["GPU"] = cfg.cluster.gpus_per_worker
    return bundle


def _split(reports: list[dict]) -> tuple[dict[int, dict], dict[int, dict]]:
    """Workers' reports (``Worker.progress`` / ``train_epoch``) -> (block -> counters, rank -> report)."""
    return {t: b for r in reports for t, b in r["blocks"].items()}, {r["rank"]: r for r in reports}


class _Supervisor:
    """The run's actors: one placement group, the parameter server, W workers; restarts dead workers.

    A worker whose process dies is re-created in its own bundle; its shards reload their last checkpoint
    and redo the epochs since, while the other workers go on (they wait only at the epoch barrier). The
    parameter server is restarted by Ray (``max_restarts``) and restores its last checkpoint itself;
    the supervisor notices the new incarnation (its pid) to count it and report it.
    """

    def __init__(self, cfg: Config, spec: Any, dataset: ImageDataset, rundir: RunDir, resume: Any,
                 display: ProgressDisplay, run_label: str | None) -> None:
        self.cfg, self.spec, self.rundir, self.display, self.run_label = cfg, spec, rundir, display, run_label
        c = cfg.cluster
        self.groups = assign_blocks(spec.num_blocks, c.num_workers)
        self.owner = {t: w for w, g in enumerate(self.groups) for t in g}
        self.budget = RestartBudget(c.max_restarts_per_worker, c.max_restarts)
        self.events: list[dict] = []  # one per restart, for the summary
        self.faults = faults_from_env()
        self.dataset = dataset
        # Once into the object store; every worker maps the same bytes read-only (no per-task copy).
        self.x_ref, self.y_ref = ray.put(dataset.train_x), ray.put(dataset.train_y)
        self.pg = placement_group([_bundle(cfg)] * c.num_workers, strategy="PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=c.placement_timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            raise RuntimeError(
                f"placement group of {c.num_workers} x {_bundle(cfg)} not placed within {c.placement_timeout_s:g}s "
                "(cluster.placement_timeout_s); "
                f"cluster resources: {ray.cluster_resources()}"
            )
        # On the driver's node: a restarted server reads the last checkpoint from run.dir, which only the
        # driver's filesystem is sure to have.
        self.server = ParameterServer.options(
            max_restarts=c.max_restarts, max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
        ).remote(
            spec, cfg.train.seed, None if resume else initial_prototypes(spec, dataset, cfg.train.seed),
            resume.shared_state if resume else None, [f"w{w}" for w in range(c.num_workers)], cfg.train.sync_mode,
            run_id=run_label, run_dir=os.path.abspath(rundir.path),
        )
        self.server_pid = ray.get(self.server.identity.remote())["pid"]
        if resume and any(replica_key(g) not in resume.replica_states for g in self.groups):
            display.message("the checkpoint holds no shared-state replica for this layout of blocks on workers "
                            f"({', '.join(replica_key(g) for g in self.groups)}): their optimizers start afresh")
        self.workers = [self._worker(w, resume, 0) for w in range(c.num_workers)]
        self.last_progress: dict[int, dict] = {}
        # Hang detection: per worker (its pid, its steps so far, when that count was first seen); the longest
        # gap between two steps of one process seen in the run; when the server last answered.
        self.advanced: dict[int, tuple[int | None, int | None, float]] = {}
        self.slowest_gap = 0.0
        self.server_seen, self.server_answers = time.monotonic(), True  # its last answer; whether the last call got one
        self.answered: dict[int, bool] = {}  # whether the worker's last progress call was answered
        self.unplaced_since: dict[int, float] = {}  # worker -> since when its bundle has had no node

    def hang_timeout(self) -> float:
        """Seconds without a step after which a training worker counts as hung (cluster.hang_timeout_s)."""
        fixed = self.cfg.cluster.hang_timeout_s
        return fixed if fixed > 0 else max(HANG_FLOOR_S, 10 * self.slowest_gap)

    def _worker(self, w: int, resume: Resume | None, restarts: int, first: bool | None = None
                ) -> "ray.actor.ActorHandle":
        """Worker w, with its blocks' and its replica's states from ``resume`` (None: a fresh start).
        first: whether this is its first incarnation, the only one injected faults fire in (default: no
        restarts yet)."""
        first = restarts == 0 if first is None else first
        c, group = self.cfg.cluster, self.groups[w]
        states = {t: resume.block_states[t] for t in group} if resume else None
        replica = resume.replica_states.get(replica_key(group)) if resume else None
        return Worker.options(
            num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=w),
        ).remote(
            w, self.spec, group, self.cfg.train, worker_threads(c), c.device, self.x_ref, self.y_ref,
            self.dataset.mean, self.dataset.std, self.server, states, replica, run_id=self.run_label,
            restarts=restarts, faults=[f for f in self.faults if f.worker == w] if first else None,
        )

    def _blocks(self, w: int) -> str:
        g = self.groups[w]
        return f"block {g[0]}" if len(g) == 1 else f"blocks {g[0]}-{g[-1]}"

    def _restart(self, w: int, epoch: int, why: str, kind: str = "died") -> "ray.ObjectRef":
        """Worker w died (or hung) during ``epoch`` (0-based): a new one in its bundle, from the last checkpoint,
        redoing the epochs since. ``why``: what happened, for the message; ``kind``: died | hung."""
        what = f"worker {w} ({self._blocks(w)}) {why}"
        n = self.budget.worker_restart(w, what)
        ray.kill(self.workers[w])  # already gone, or hung: makes sure its bundle is free
        resume = self.rundir.load_resume(self.spec.num_blocks, warn=self.display.message)
        from_epoch = resume.epochs_done if resume else 0
        self.workers[w] = self._worker(w, resume, n)
        self.advanced[w] = (None, None, time.monotonic())
        self.events.append({"kind": "worker", "cause": kind, "worker": w, "blocks": self.groups[w],
                            "epoch": epoch + 1, "restart": n, "resumed_from_epoch": from_epoch, "time": time.time()})
        self.display.message(
            f"{what}; restarted ({n}/{self.cfg.cluster.max_restarts_per_worker}), its blocks redo "
            f"epoch{'s' if epoch > from_epoch else ''} {from_epoch + 1}{f'-{epoch + 1}' if epoch > from_epoch else ''} "
            f"from {'the checkpoint of epoch ' + str(from_epoch) if resume else 'their initial weights'}; "
            f"the other workers go on"
        )
        return self.workers[w].train_epochs.remote(list(range(from_epoch, epoch + 1)))

    def _watch_placement(self, epoch: int) -> set[int]:
        """The workers whose bundle has no node (theirs was lost; Ray is looking for room): they cannot step, so
        they are not hung. Fails the run with one line once one has waited cluster.placement_timeout_s."""
        table = placement_group_table(self.pg)
        unplaced = {int(b) for b, node in table.get("bundles_to_node_id", {}).items() if not node}
        now, limit = time.monotonic(), self.cfg.cluster.placement_timeout_s
        for w in set(self.unplaced_since) - unplaced:  # placed again: its hang clock starts now
            del self.unplaced_since[w]
            self.advanced[w] = (None, None, now)
        for w in sorted(unplaced):
            waited = now - self.unplaced_since.setdefault(w, now)
            if waited > limit:
                bundle, left = _bundle(self.cfg), ray.cluster_resources()
                fit = min(int(left.get(k, 0) // v) for k, v in bundle.items())
                have = ", ".join(f"{left.get(k, 0):g} {k}" for k in bundle)
                fewer = (f"resume with cluster.num_workers={fit} (run.dir keeps the checkpoint of the last epoch "
                         "done)" if fit else "no worker fits")
                raise TrainingFailed(
                    f"worker {w} ({self._blocks(w)}) lost its node in epoch {epoch + 1} and Ray found no room for "
                    f"its bundle {bundle} within {limit:g}s (cluster.placement_timeout_s): the cluster has {have} "
                    f"left, {len(self.groups)} workers need {len(self.groups)} x {bundle}; add a node, or {fewer}")
        return unplaced

    def _check_hangs(self, pending: dict[int, Any], epoch: int, unplaced: set[int] = frozenset()) -> None:
        """Restart the pending workers that have made no step for :meth:`hang_timeout` seconds.

        In sync mode one hung worker soon stalls the others (they wait for its pushes), but those still
        answer progress calls: only the silent ones are restarted. Nothing is restarted while the server is
        silent: the workers wait for it, and it is the one to restart (:meth:`_watch_server`).
        """
        now = time.monotonic()
        if not self.server_answers:
            return
        stalled = []
        for w in set(pending) - unplaced:
            report = self.last_progress.get(w)
            pid = report["pid"] if report else None
            steps = sum(b["total_steps"] for b in report["blocks"].values()) if report else None
            seen_pid, seen_steps, since = self.advanced.get(w, (None, None, now))
            if (pid, steps) != (seen_pid, seen_steps):
                if pid == seen_pid and seen_steps is not None:  # a step of the same process: a gap measured
                    self.slowest_gap = max(self.slowest_gap, now - since)
                self.advanced[w] = (pid, steps, now)
            elif now - since > self.hang_timeout():
                stalled.append((w, now - since))
        silent = [(w, gap) for w, gap in stalled if not self.answered.get(w, False)]
        limit = self.cfg.cluster.hang_timeout_s
        rule = f"cluster.hang_timeout_s={limit:g}" if limit > 0 else \
            f"automatic hang timeout {self.hang_timeout():.0f}s; cluster.hang_timeout_s sets it"
        # Stalled workers that still answer wait for a silent or a slow one; they are restarted only when
        # every worker is stalled and answering (a deadlock the silent ones do not explain).
        hung = silent or (stalled if len(stalled) == len(pending) else [])
        for w, gap in hung:
            pending[w] = self._restart(w, epoch, f"made no step for {gap:.0f}s in epoch {epoch + 1} ({rule})", "hung")

    def _watch_server(self) -> None:
        """Notice a restarted parameter server (new pid); fail when it is gone for good."""
        try:
            ident = ray.get(self.server.identity.remote(), timeout=2.0)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
            self.server_answers = False
            silent = time.monotonic() - self.server_seen
            if silent > self.hang_timeout():  # hung (stopped, deadlocked): kill it and let Ray restart it
                self.display.message(f"parameter server did not answer for {silent:.0f}s; killed, Ray restarts it")
                ray.kill(self.server, no_restart=False)
                self.server_seen = time.monotonic()  # give the new incarnation the same time to come up
            return  # restarting, or busy: look again next time
        except ray.exceptions.RayActorError as e:
            raise TrainingFailed(f"parameter server died and was not restarted "
                                 f"(cluster.max_restarts={self.cfg.cluster.max_restarts}): {e}") from None
        self.server_seen, self.server_answers = time.monotonic(), True
        if ident["pid"] != self.server_pid:
            self.server_pid = ident["pid"]
            what = ("parameter server restarted; it restored "
                    + (f"the checkpoint of epoch {ident['restored_from']}" if ident["restored_from"] is not None
                       else "its initial state (no checkpoint yet)") + f", version {ident['start_version']}")
            n = self.budget.server_restart(what)
            self.events.append({"kind": "server", "restart": n, "restored_from_epoch": ident["restored_from"],
                                "version": ident["start_version"], "time": time.time()})
            self.display.message(what + "; workers re-sync with it")

    def _poll(self, pending: dict[int, Any]) -> list[dict]:
        """Progress of every worker; a dead one keeps its last report (its train call tells the rest)."""
        refs = {w: self.workers[w].progress.remote() for w in pending}
        for w, ref in refs.items():
            try:
                self.last_progress[w] = ray.get(ref, timeout=5.0)
                self.answered[w] = True
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                self.answered[w] = False
        return list(self.last_progress.values())

    def run_epoch(self, epoch: int, mlog: MetricsLog) -> list[dict]:
        """Every worker trains ``epoch``; dead workers are restarted until the limits. Returns the reports."""
        now = time.monotonic()
        self.advanced = {w: (None, None, now) for w in range(len(self.workers))}
        return self._drive({w: h.train_epoch.remote(epoch) for w, h in enumerate(self.workers)}, epoch, mlog)

    def _drive(self, pending: dict[int, Any], epoch: int, mlog: MetricsLog) -> list[dict]:
        """Wait for the workers' train calls of ``epoch`` in ``pending`` (worker -> ref), restarting dead and hung
        ones; returns their reports in worker order."""
        results: dict[int, dict] = {}
        while pending:
            ray.wait(list(pending.values()), num_returns=len(pending), timeout=1.0)
            for w, ref in list(pending.items()):
                ready, _ = ray.wait([ref], timeout=0)
                if not ready:
                    continue
                del pending[w]
                try:
                    results[w] = self.last_progress[w] = ray.get(ref)
                # Its process died; or its node did, taking the report it had stored there (object lost).
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
                    pending[w] = self._restart(w, epoch, f"died in epoch {epoch + 1} ({type(e).__name__})")
                except ray.exceptions.RayTaskError as e:
                    first = str(e.cause if e.cause is not None else e).strip().splitlines()[-1]
                    raise TrainingFailed(f"worker {w} ({self._blocks(w)}) failed in epoch {epoch + 1}: {first}") from None
            self._watch_server()
            unplaced = self._watch_placement(epoch)
            blocks, by_rank = _split(self._poll(pending))
            self._check_hangs(pending, epoch, unplaced)
            self.display.update(blocks, self.owner)
            mlog.record(blocks, by_rank, self.owner)
        return [results[w] for w in sorted(results)]

    def states(self, epoch: int, mlog: MetricsLog) -> tuple[dict[int, dict], dict, dict[str, dict]]:
        """(block states, server state, replica states by group key) at the end of ``epoch`` (0-based).

        A worker that dies after its epoch ended, before its states are gathered, is restarted like one that
        died in the epoch: it redoes the epochs since the last checkpoint, then the gather is done again. A
        parameter server that dies then has lost the epoch's updates (it restores the last checkpoint), so
        every worker redoes the epoch from that checkpoint.
        """
        while True:
            parts, replicas = {}, {}
            for w, h in enumerate(self.workers):
                try:
                    parts[w] = ray.get(h.state_dicts.remote(epoch))
                    key, replica = ray.get(h.replica_state.remote())
                    replicas[key] = replica
                except ray.exceptions.RayActorError as e:
                    ref = self._restart(w, epoch, f"died at the end of epoch {epoch + 1}, before its checkpoint "
                                                  f"({type(e).__name__})")
                    self._drive({w: ref}, epoch, mlog)
                    break
            else:
                try:
                    server = ray.get(self.server.state_dict.remote())
                except ray.exceptions.RayActorError:
                    self._redo_epoch(epoch, mlog)
                    continue
                blocks = {t: s for part in parts.values() for t, s in part.items()}
                return blocks, server, replicas

    def _redo_epoch(self, epoch: int, mlog: MetricsLog) -> None:
        """The server died after the workers finished ``epoch``: once Ray has restarted it (from the last
        checkpoint), every worker starts again from that checkpoint and redoes the epochs since. The server's
        restart counts against cluster.max_restarts; the workers' do not (nothing was wrong with them)."""
        limit = self.cfg.cluster.placement_timeout_s
        deadline = time.monotonic() + limit
        while True:
            self._watch_server()
            try:
                ray.get(self.server.identity.remote(), timeout=2.0)
                break
            except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
                if time.monotonic() > deadline:
                    raise TrainingFailed(f"parameter server did not come back within {limit:g}s "
                                         f"(cluster.placement_timeout_s) after dying at the end of epoch "
                                         f"{epoch + 1}") from None
                time.sleep(0.5)
        self._watch_server()  # counts the restart (a new pid)
        resume = self.rundir.load_resume(self.spec.num_blocks, warn=self.display.message)
        from_epoch = resume.epochs_done if resume else 0
        self.display.message(f"parameter server died at the end of epoch {epoch + 1}; every worker redoes "
                             f"epoch{'s' if epoch > from_epoch else ''} {from_epoch + 1}"
                             f"{f'-{epoch + 1}' if epoch > from_epoch else ''} from its last checkpoint")
        pending = {}
        for w, h in enumerate(self.workers):
            ray.kill(h)
            self.workers[w] = self._worker(w, resume, self.budget.by_worker.get(w, 0), first=False)
            pending[w] = self.workers[w].train_epochs.remote(list(range(from_epoch, epoch + 1)))
        now = time.monotonic()
        self.advanced = {w: (None, None, now) for w in pending}
        self._drive(pending, epoch, mlog)

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)
        ray.kill(self.server, no_restart=True)
        remove_placement_group(self.pg)


def _train_on_ray(cfg: Config, dataset: ImageDataset, rundir: RunDir, resume: Any, display: ProgressDisplay,
                  mlog: MetricsLog, run_label: str | None, curve: list[dict]) -> tuple[dict[int, dict], dict, list[dict], float, list[dict]]:
    """Train the remaining epochs; returns (block states, server state, worker reports, train seconds,
    restart events). ``curve`` gets a test-accuracy point every ``eval.every_epochs`` (not the last epoch:
    the caller measures that one).

    run_label: the `run` label of the metrics the actors export, None when they export none.
    """
    spec = model_spec(cfg, dataset.image_shape, dataset.num_classes)
    sup = _Supervisor(cfg, spec, dataset, rundir, resume, display, run_label)
    train_seconds = resume.train_seconds if resume else 0.0
    start_epoch = resume.epochs_done if resume else 0
    reports: list[dict] = []
    epoch_seconds: list[float] = []
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            t0 = time.perf_counter()
            reports = sup.run_epoch(epoch, mlog)
            epoch_seconds.append(time.perf_counter() - t0)
            train_seconds += epoch_seconds[-1]
            done = epoch + 1
            blocks, by_rank = _split(reports)
            display.update(blocks, sup.owner, force=True)
            mlog.record(blocks, by_rank, sup.owner, event="epoch")
            every = cfg.eval.every_epochs
            evaluate_now = every > 0 and done % every == 0 and done < cfg.train.epochs
            if done % cfg.run.checkpoint_every == 0 or done == cfg.train.epochs or evaluate_now:
                states, shared_state, replicas = sup.states(epoch, mlog)
            if done % cfg.run.checkpoint_every == 0 or done == cfg.train.epochs:
                rundir.save_epoch(done, states, shared_state, train_seconds, replicas)
                display.message(f"epoch {done}/{cfg.train.epochs} done in {epoch_seconds[-1]:.1f}s; "
                                f"checkpoint saved to {rundir.ckpt_dir}")
            if evaluate_now:  # on the driver, outside train_seconds
                _, acc = evaluate_states(spec, dataset, states, shared_state, cfg.eval.batch_size, cfg.eval.seed)
                curve.append({"epoch": done, "train_seconds": train_seconds, "test_accuracy": acc})
                atomic_write_json(rundir.file(CURVE_FILE), curve)
                display.message(f"epoch {done}: test accuracy of the chain as it stands {acc:.4f}")
        for r in reports:
            r["epoch_wall_seconds"] = epoch_seconds
        return states, shared_state, reports, train_seconds, sup.events
    finally:
        sup.close()


def _connect_checked(cfg: Config) -> bool:
    """Join or start Ray and refuse a run the cluster cannot hold; returns whether this call started Ray."""
    started = connect(cfg.cluster.num_workers * cfg.cluster.cpus_per_worker, metrics=cfg.metrics.enabled,
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


def run_training(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume) the run ``cfg`` describes on Ray, evaluate the assembled chain, write the summary.

    One driver per run.dir: a second one is refused (ConfigError naming the holder) while this one runs.
    """
    dataset = load_dataset(cfg.data.name, cfg.data.root, cfg.data.download, cfg.data.train_limit, cfg.data.test_limit)
    rundir = RunDir(cfg.run.dir)
    with contextlib.ExitStack() as held:  # the lock, once taken, is held until the summary is written
        return _run(cfg, dataset, rundir, log, lambda: held.enter_context(rundir.lock("a noprop_dist training run")))


def _run(cfg: Config, dataset: ImageDataset, rundir: RunDir, log: Callable[[str], None],
         take_lock: Callable[[], None]) -> dict[str, Any]:
    spec = model_spec(cfg, dataset.image_shape, dataset.num_classes)
    # Everything that can refuse the run does so before anything is written to run.dir (a driver already
    # running on it included).
    cleared = rundir.check(cfg)
    manifest = None if cleared else rundir.read_manifest()
    started, connected = False, False
    if manifest is None or manifest["epochs_done"] < cfg.train.epochs:
        started, connected = _connect_checked(cfg), True
    try:
        take_lock()
        rundir.prepare(cfg)
        resume = rundir.load_resume(spec.num_blocks)
        display = ProgressDisplay(cfg.train.epochs, interval=cfg.train.log_every_seconds)
        run_label = metrics_run_id(cfg)
        mlog = MetricsLog(rundir.path, run_label, cfg.metrics.write_every_seconds, warn=log)
        log(f"{cfg.data.name}: {len(dataset.train_y)} train / {len(dataset.test_y)} test images {dataset.image_shape}; "
            f"{_shards(spec)} on {cfg.cluster.num_workers} workers; run dir {rundir.path}")
        reports: list[dict] = []
        events: list[dict] = []
        curve = _read_curve(rundir, resume.epochs_done if resume else 0)
        if resume and resume.epochs_done >= cfg.train.epochs:
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
                cfg, dataset, rundir, resume, display, mlog, run_label if cfg.metrics.enabled else None, curve)
    finally:
        if started:
            ray.shutdown()
    if reports:
        # The training figures exist only in this process until summary.json holds them: written now, before
        # the evaluation, a driver killed from here on leaves them for the re-evaluation to keep.
        atomic_write_json(rundir.file("summary.json"), _summary(
            cfg, spec, None, None, train_seconds, reports, shared_state, rundir, curve, events)
            | {"run_id": run_label, "status": "evaluating"})
    chain, evaluation = final_evaluation(spec, dataset, states, shared_state, cfg.eval.batch_size, cfg.eval.seed)
    accuracy = evaluation["test_accuracy"]
    if not curve or curve[-1]["epoch"] < cfg.train.epochs:
        curve.append({"epoch": cfg.train.epochs, "train_seconds": train_seconds, "test_accuracy": accuracy})
        atomic_write_json(rundir.file(CURVE_FILE), curve)
    train_accuracy = train_subset_accuracy(chain, dataset, cfg.eval.batch_size, cfg.eval.seed)
    chain.save(rundir.file("chain.pt"), extra={
        "dataset": cfg.data.name, "data_root": cfg.data.root, "test_limit": cfg.data.test_limit,
        "mean": list(dataset.mean), "std": list(dataset.std), "test_accuracy": accuracy,
        "eval_seed": cfg.eval.seed, "eval_batch_size": cfg.eval.batch_size,
    })
    summary = _summary(cfg, spec, accuracy, train_accuracy, train_seconds, reports, shared_state, rundir, curve,
                       events) | {"run_id": run_label, "status": "done"} | evaluation
    atomic_write_json(rundir.file("summary.json"), summary)
    write_report(rundir.path, summary, run_label)
    return summary


def _shards(spec: Any) -> str:
    if spec.method == "noprop_dt":
        return f"T={spec.num_blocks} blocks"
    return f"{spec.method}, K={spec.num_blocks} time-shard{'s' if spec.num_blocks > 1 else ''}"


def _summary(cfg: Config, spec: Any, accuracy: float | None, train_accuracy: float | None, train_seconds: float,
             reports: list[dict], shared_state: dict, rundir: RunDir, curve: list[dict],
             events: list[dict]) -> dict[str, Any]:
    old = {}
    if not reports:  # a finished run re-evaluated: keep the figures measured while it trained
        try:
            with open(rundir.file("summary.json"), encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        old = old if isinstance(old, dict) else {}
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
    return {
        "method": cfg.model.method,
        "test_accuracy": accuracy,
        "train_accuracy": train_accuracy,
        "train_seconds": train_seconds,
        "num_workers": cfg.cluster.num_workers,
        "epochs": cfg.train.epochs,
        "seed": cfg.train.seed,
        "dataset": cfg.data.name,
        "embedding": cfg.model.embedding,
        "num_blocks": cfg.model.num_blocks,
        "num_shards": spec.num_blocks,
        "curve": curve,
        # Peak training memory per worker process (GPU memory on a GPU, else resident set size).
        "peak_memory_mb": memory[0],
        "peak_memory_kind": memory[1],
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
        "run_dir": rundir.path,
        "chain": rundir.file("chain.pt"),
    }

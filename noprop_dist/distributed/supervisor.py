"""The supervisor of a run's actors: one placement group, the parameter server and W workers; it restarts
dead and hung workers, notices a restarted server, and fails the run with one line when it cannot go on."""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from ..config import Config, worker_threads
from ..data import ImageDataset
from ..observability.progress import ProgressDisplay
from ..observability.run_log import MetricsLog
from ..storage.run_dir import Resume, RunDir
from ..training import assign_blocks, initial_prototypes, replica_key
from .faults import faults_from_env
from .param_server import ParameterServer
from .restart_policy import RestartBudget, TrainingFailed
from .worker import Worker

# The automatic cluster.hang_timeout_s never goes below this: starting an actor, importing torch and the first
# steps of a restarted worker take tens of seconds on a loaded machine.
HANG_FLOOR_S = 120.0


def worker_bundle(cfg: Config) -> dict[str, float]:
    bundle = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.gpus_per_worker > 0:
        bundle["GPU"] = cfg.cluster.gpus_per_worker
    return bundle


def place_workers(cfg: Config, log: Callable[[str], None] | None = None) -> PlacementGroup:
    """The placement group of the run's workers (one bundle each), once the cluster has placed it.

    Waits up to cluster.placement_timeout_s: a cluster whose worker group scales from zero (KubeRay
    ``minReplicas: 0``) gets its nodes from the autoscaler only once this demand is pending. ``log`` is told
    when the wait is not immediate. A cluster that does not place it in time ends the run here with one line
    naming the timeout and what the cluster has, as a fault it could not absorb does."""
    c = cfg.cluster
    pg = placement_group([worker_bundle(cfg)] * c.num_workers, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=min(2.0, c.placement_timeout_s))
    if not ready and c.placement_timeout_s > 2.0:
        if log is not None:
            have = ray.cluster_resources()
            log(f"waiting up to {c.placement_timeout_s:g}s (cluster.placement_timeout_s) for the cluster to place "
                f"{c.num_workers} workers x {worker_bundle(cfg)}: it has "
                f"{', '.join(f'{have.get(k, 0):g} {k}' for k in worker_bundle(cfg))} now; an autoscaler adds "
                "nodes for this request")
        ready, _ = ray.wait([pg.ready()], timeout=c.placement_timeout_s - 2.0)
    if not ready:
        remove_placement_group(pg)
        have = ray.cluster_resources()
        raise TrainingFailed(
            f"{c.num_workers} workers x {worker_bundle(cfg)} were not placed within {c.placement_timeout_s:g}s "
            f"(cluster.placement_timeout_s): the cluster has "
            f"{', '.join(f'{have.get(k, 0):g} {k}' for k in worker_bundle(cfg))}; ask for fewer "
            "(cluster.num_workers, cluster.cpus_per_worker, cluster.gpus_per_worker), add nodes, or give an "
            "autoscaler more time (cluster.placement_timeout_s)")
    return pg


def split_reports(reports: list[dict]) -> tuple[dict[int, dict], dict[int, dict]]:
    """Workers' reports (``Worker.progress`` / ``train_epoch``) -> (block -> counters, rank -> report)."""
    return {t: b for r in reports for t, b in r["blocks"].items()}, {r["rank"]: r for r in reports}


class Supervisor:
    """The run's actors: one placement group, the parameter server, W workers; restarts dead workers.

    A worker whose process dies is re-created in its own bundle; its shards reload their last checkpoint
    and redo the epochs since, while the other workers go on (they wait only at the epoch barrier). The
    parameter server is restarted by Ray (``max_restarts``) and restores its last checkpoint itself;
    the supervisor notices the new incarnation (its pid) to count it and report it.
    """

    def __init__(self, cfg: Config, spec: Any, dataset: ImageDataset, rundir: RunDir, resume: Any,
                 display: ProgressDisplay, run_label: str | None, pg: PlacementGroup | None = None) -> None:
        """pg: the workers' placement group, placed already (:func:`place_workers`); None: placed here."""
        self.cfg, self.spec, self.rundir, self.display, self.run_label = cfg, spec, rundir, display, run_label
        c = cfg.cluster
        self.groups = assign_blocks(spec.num_shards, c.num_workers)
        self.owner = {t: w for w, g in enumerate(self.groups) for t in g}
        self.budget = RestartBudget(c.max_restarts_per_worker, c.max_restarts)
        self.events: list[dict] = []  # one per restart, for the summary
        self.faults = faults_from_env()
        self.dataset = dataset
        # Once into the object store; every worker maps the same bytes read-only (no per-task copy).
        self.x_ref, self.y_ref = ray.put(dataset.train_x), ray.put(dataset.train_y)
        self.pg = pg if pg is not None else place_workers(cfg)
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
        resume = self.rundir.load_resume(self.spec.num_shards, warn=self.display.message)
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
                bundle, left = worker_bundle(self.cfg), ray.cluster_resources()
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
            blocks, by_rank = split_reports(self._poll(pending))
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
            # Asked of every worker at once: the gather takes the slowest worker's time, not the sum.
            refs = [(h.state_dicts.remote(epoch), h.replica_state.remote()) for h in self.workers]
            for w, (blocks_ref, replica_ref) in enumerate(refs):
                try:
                    parts[w] = ray.get(blocks_ref)
                    key, replica = ray.get(replica_ref)
                    replicas[key] = replica
                except ray.exceptions.RayActorError as e:
                    ref = self._restart(w, epoch, f"died at the end of epoch {epoch + 1}, before its checkpoint "
                                                  f"({type(e).__name__})")
                    self._drive({w: ref}, epoch, mlog)
                    break
            else:
                try:  # asked last: a server that died while the workers' states came has lost the epoch
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
        resume = self.rundir.load_resume(self.spec.num_shards, warn=self.display.message)
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

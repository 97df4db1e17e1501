"""The supervisor of a run's actors: one placement group, the parameter server and W workers. The mechanism
apart from the policy: it gathers what it sees into a status, asks ``restart_policy.decide`` what to do (restart
dead and hung workers, kill a hung server, count a restarted one, fail the run with one line, or wait) and does
it."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
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
from ..storage.checkpoints import Resume
from ..storage.run_dir import RunDir
from ..training import assign_shards, initial_prototypes, replica_key
from .faults import faults_from_env
from .param_server import ParameterServer
from .reaper import kill_ray_process
from .restart_policy import (
    Clocks,
    Decision,
    KillServer,
    Limits,
    Restart,
    RestartBudget,
    RunStatus,
    ServerStatus,
    TrainingFailed,
    WorkerStatus,
    decide,
)
from .wire import state_from_wire
from .worker import Worker, WorkerReport, WorkerSpec


# ray.kill asks the actor's process to exit and SIGKILLs it only when that request times out. A process that can
# answer neither (seen: a SIGSTOPped worker on a loaded machine) was left stopped, holding its bundle: the worker
# that replaced it was never placed, and the run failed on the restart limit. So the supervisor also kills a hung
# actor's process on its node.
_kill_on_node = ray.remote(num_cpus=0, max_retries=0)(kill_ray_process)


def kill_on_node(pid: int, node_id: str) -> str | None:
    """SIGKILL process ``pid`` of node ``node_id`` if it is still a Ray worker's (:func:`reaper.kill_ray_process`,
    run there as a task: seconds). Returns None once done, or why it could not be (the error's type)."""
    ref = _kill_on_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(pid)
    try:
        ray.get(ref, timeout=60)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
        return type(e).__name__
    return None


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


@dataclass(frozen=True)
class GatheredState:
    """What a run holds at the end of an epoch, gathered for a checkpoint and an evaluation (all on the CPU)."""

    shards: dict[int, dict]  # shard id -> its network's and optimizer's state dicts (Worker.state_dicts)
    shared: dict  # the parameter server's state: the shared state and its version
    replicas: dict[str, dict]  # shard-group key -> its replica's optimizer state (Worker.replica_state)


@dataclass(frozen=True)
class Observers:
    """Where the supervisor's news goes; it knows nothing of how progress is shown or logged."""

    message: Callable[[str], None]  # a line for the run's log: restarts, waits, checkpoints it falls back from
    progress: Callable[[list[WorkerReport]], None]  # every worker's last report, each second while an epoch trains


class Supervisor:
    """The run's actors: one placement group, the parameter server, W workers; restarts dead and hung workers
    as :func:`decide` says.

    A worker whose process dies is re-created in its own bundle; its shards reload their last checkpoint
    and redo the epochs since, while the other workers go on (they wait only at the epoch barrier). The
    parameter server is restarted by Ray (``max_restarts``) and restores its last checkpoint itself;
    the supervisor notices the new incarnation (its pid) to count it and report it.
    """

    def __init__(self, cfg: Config, spec: Any, dataset: ImageDataset, rundir: RunDir, resume: Any,
                 observers: Observers, run_label: str | None, pg: PlacementGroup | None = None) -> None:
        """pg: the workers' placement group, placed already (:func:`place_workers`); None: placed here."""
        self.cfg, self.spec, self.rundir, self.observers, self.run_label = cfg, spec, rundir, observers, run_label
        c = cfg.cluster
        self.groups = assign_shards(spec.num_shards, c.num_workers)
        self.budget = RestartBudget(c.max_restarts_per_worker, c.max_restarts)
        self.limits = Limits(c.hang_timeout_s, c.placement_timeout_s, worker_bundle(cfg), len(self.groups))
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
        if resume and any(replica_key(g) not in resume.replica_states for g in self.groups):
            observers.message("the checkpoint holds no shared-state replica for this layout of blocks on workers "
                              f"({', '.join(replica_key(g) for g in self.groups)}): their optimizers start afresh")
        # The workers' processes start while the server's does: each imports torch, seconds of a run's start.
        self.workers = [self._worker(w, resume, 0) for w in range(c.num_workers)]
        self.server_pid = ray.get(self.server.identity.remote())["pid"]
        self.last_progress: dict[int, WorkerReport] = {}
        self.answered: dict[int, bool] = {}  # whether the worker's last progress call was answered
        self.up: set[int] = set()  # the workers whose current process has answered a progress or train call
        self.clocks = Clocks(time.monotonic())

    def _worker(self, w: int, resume: Resume | None, restarts: int, first: bool | None = None
                ) -> "ray.actor.ActorHandle":
        """Worker w, with its blocks' and its replica's states from ``resume`` (None: a fresh start).
        first: whether this is its first incarnation, the only one injected faults fire in (default: no
        restarts yet)."""
        first = restarts == 0 if first is None else first
        c, group = self.cfg.cluster, self.groups[w]
        states = {t: resume.block_states[t] for t in group} if resume else None
        replica = resume.replica_states.get(replica_key(group)) if resume else None
        worker_spec = WorkerSpec(
            w, self.spec, group, self.cfg.train, worker_threads(c), c.device, self.dataset.mean, self.dataset.std,
            self.server, states, replica, run_id=self.run_label, restarts=restarts,
            faults=[f for f in self.faults if f.worker == w] if first else None, paced=c.wants_gpus,
        )
        return Worker.options(
            num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=w),
        ).remote(worker_spec, self.x_ref, self.y_ref)

    def _restart(self, action: Restart, epoch: int) -> "ray.ObjectRef":
        """Worker ``action.rank`` died (or hung) during ``epoch`` (0-based): a new one in its bundle, from the last
        checkpoint, redoing the epochs since. Returns its train call."""
        w, n, what = action.rank, action.count, action.what
        ray.kill(self.workers[w])  # already gone, or hung: makes sure its bundle is free
        if action.cause == "hung" and w in self.up:  # its last report is its current process's
            node = placement_group_table(self.pg).get("bundles_to_node_id", {}).get(w)
            self._kill_process(self.last_progress[w].pid, node, f"worker {w}")
        resume = self.rundir.checkpoints.load_resume(self.spec.num_shards, warn=self.observers.message)
        from_epoch = resume.epochs_done if resume else 0
        self.workers[w] = self._worker(w, resume, n)
        self.up.discard(w)
        self.clocks.started(w, time.monotonic())
        self.events.append({"kind": "worker", "cause": action.cause, "worker": w, "blocks": self.groups[w],
                            "epoch": epoch + 1, "restart": n, "resumed_from_epoch": from_epoch, "time": time.time()})
        self.observers.message(
            f"{what}; restarted ({n}/{self.cfg.cluster.max_restarts_per_worker}), its blocks redo "
            f"epoch{'s' if epoch > from_epoch else ''} {from_epoch + 1}{f'-{epoch + 1}' if epoch > from_epoch else ''} "
            f"from {'the checkpoint of epoch ' + str(from_epoch) if resume else 'their initial weights'}; "
            f"the other workers go on"
        )
        return self.workers[w].train_epochs.remote(list(range(from_epoch, epoch + 1)))

    def _kill_process(self, pid: int, node_id: str | None, what: str) -> None:
        """Make sure process ``pid`` of node ``node_id``, a hung actor that ray.kill was asked to stop, is gone
        (:func:`kill_on_node`); says so when that could not be done."""
        if node_id and (why := kill_on_node(pid, node_id)):
            self.observers.message(f"{what}: could not make sure its hung process (pid {pid}) is gone ({why}); "
                                   "Ray's own kill is all that is left")

    def _unplaced(self) -> dict[int, float]:
        """The workers whose bundle has no node (theirs was lost; Ray is looking for room) -> for how long."""
        table = placement_group_table(self.pg)
        ranks = {int(b) for b, node in table.get("bundles_to_node_id", {}).items() if not node}
        return self.clocks.unplaced(ranks, time.monotonic())

    def _server_status(self) -> ServerStatus:
        """Ask the server who it is: whether it answers, and whether a new incarnation (pid) does."""
        try:
            ident = ray.get(self.server.identity.remote(), timeout=2.0)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
            return ServerStatus(answered=False, silent_s=self.clocks.server_silent(time.monotonic()))
        except ray.exceptions.RayActorError as e:  # after the above: ActorUnavailableError is one
            return ServerStatus(answered=False, gone=str(e))
        self.clocks.server_answered(time.monotonic())
        restarted, self.server_pid = ident["pid"] != self.server_pid, ident["pid"]
        return ServerStatus(restarted=restarted, restored_from=ident["restored_from"],
                            start_version=ident["start_version"])

    def _carry_out(self, decision: Decision, epoch: int, pending: dict[int, Any]) -> None:
        """Do what :func:`decide` said about ``epoch`` (0-based): restart workers (their train calls go into
        ``pending``), kill a hung server, count a restarted one; then fail the run if it said so."""
        self.budget = decision.budget
        for action in decision.actions:
            if isinstance(action, Restart):
                pending[action.rank] = self._restart(action, epoch)
            elif isinstance(action, KillServer):
                self.observers.message(action.message)
                ray.kill(self.server, no_restart=False)
                self._kill_process(self.server_pid, ray.get_runtime_context().get_node_id(), "the parameter server")
                self.clocks.server_answered(time.monotonic())  # give the new incarnation the same time to come up
            else:
                self.events.append({"kind": "server", "restart": action.count, "restored_from_epoch":
                                    action.restored_from, "version": action.version, "time": time.time()})
                self.observers.message(action.message)
        if decision.fail is not None:
            raise TrainingFailed(decision.fail)

    def _poll(self, pending: dict[int, Any]) -> None:
        """Progress of every pending worker; a dead one keeps its last report (its train call tells the rest)."""
        refs = {w: self.workers[w].progress.remote() for w in pending}
        for w, ref in refs.items():
            try:
                self.last_progress[w] = ray.get(ref, timeout=5.0)
                self.answered[w] = True
                self.up.add(w)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                self.answered[w] = False

    def run_epoch(self, epoch: int) -> list[WorkerReport]:
        """Every worker trains ``epoch``; dead workers are restarted until the limits. Returns the reports."""
        now = time.monotonic()
        for w in range(len(self.workers)):
            self.clocks.started(w, now)
        return self._drive({w: h.train_epoch.remote(epoch) for w, h in enumerate(self.workers)}, epoch)

    def _drive(self, pending: dict[int, Any], epoch: int) -> list[WorkerReport]:
        """Wait for the workers' train calls of ``epoch`` in ``pending`` (worker -> ref), doing what
        :func:`decide` says about them; returns their reports in worker order."""
        results: dict[int, WorkerReport] = {}
        while pending:
            ray.wait(list(pending.values()), num_returns=len(pending), timeout=1.0)
            ended: dict[int, tuple[str, str]] = {}  # worker -> (died | failed, the error)
            for w, ref in list(pending.items()):
                ready, _ = ray.wait([ref], timeout=0)
                if not ready:
                    continue
                try:
                    results[w] = self.last_progress[w] = ray.get(ref)
                    # Up, with its pid known: a worker can finish an epoch before any progress call reaches it,
                    # and one that hangs in the next must not be taken for a process still starting.
                    self.up.add(w)
                    del pending[w]
                # Its process died; or its node did, taking the report it had stored there (object lost).
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
                    ended[w] = ("died", type(e).__name__)
                except ray.exceptions.RayTaskError as e:
                    ended[w] = ("failed", str(e.cause if e.cause is not None else e).strip().splitlines()[-1])
            server = self._server_status()
            unplaced = self._unplaced()
            self._poll(pending)
            now, workers = time.monotonic(), []
            for w, group in enumerate(self.groups):
                call, error = ended.get(w, ("running" if w in pending else "done", ""))
                idle = 0.0
                # A silent server stalls every worker: their clocks wait for it to answer again.
                if call == "running" and w not in unplaced and server.answered:
                    report = self.last_progress.get(w)
                    idle = self.clocks.stepped(w, report.pid if report else None,
                                               report.total_steps if report else None, now)
                workers.append(WorkerStatus(w, tuple(group), call, error, idle, self.answered.get(w, False),
                                            unplaced.get(w), starting=w not in self.up))
            status = RunStatus(epoch, tuple(workers), server, self.clocks.slowest_gap_s,
                               resources=ray.cluster_resources() if unplaced else {})
            self._carry_out(decide(status, self.budget, self.limits), epoch, pending)
            self.observers.progress(list(self.last_progress.values()))
        return [results[w] for w in sorted(results)]

    def states(self, epoch: int) -> GatheredState:
        """The shards', the server's and the replicas' states at the end of ``epoch`` (0-based).

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
                    parts[w] = state_from_wire(ray.get(blocks_ref))
                    key, replica = ray.get(replica_ref)
                    replicas[key] = replica
                except ray.exceptions.RayActorError as e:
                    died = WorkerStatus(w, tuple(self.groups[w]), "died", type(e).__name__)
                    pending: dict[int, Any] = {}
                    status = RunStatus(epoch, (died,), slowest_gap_s=self.clocks.slowest_gap_s, gathering=True)
                    self._carry_out(decide(status, self.budget, self.limits), epoch, pending)
                    self._drive(pending, epoch)
                    break
            else:
                try:  # asked last: a server that died while the workers' states came has lost the epoch
                    server = ray.get(self.server.state_dict.remote())
                except ray.exceptions.RayActorError:
                    self._redo_epoch(epoch)
                    continue
                shards = {t: s for part in parts.values() for t, s in part.items()}
                return GatheredState(shards, server, replicas)

    def _redo_epoch(self, epoch: int) -> None:
        """The server died after the workers finished ``epoch``: once Ray has restarted it (from the last
        checkpoint), every worker starts again from that checkpoint and redoes the epochs since. The server's
        restart counts against cluster.max_restarts; the workers' do not (nothing was wrong with them)."""
        since = time.monotonic()
        while True:  # until it answers (a new incarnation: its restart is counted)
            server = self._server_status()
            status = RunStatus(epoch, (), server, self.clocks.slowest_gap_s, gathering=True,
                               server_wait_s=time.monotonic() - since)
            self._carry_out(decide(status, self.budget, self.limits), epoch, {})
            if server.answered:
                break
            time.sleep(0.5)
        resume = self.rundir.checkpoints.load_resume(self.spec.num_shards, warn=self.observers.message)
        from_epoch = resume.epochs_done if resume else 0
        self.observers.message(f"parameter server died at the end of epoch {epoch + 1}; every worker redoes "
                               f"epoch{'s' if epoch > from_epoch else ''} {from_epoch + 1}"
                               f"{f'-{epoch + 1}' if epoch > from_epoch else ''} from its last checkpoint")
        pending = {}
        for w, h in enumerate(self.workers):
            ray.kill(h)
            self.workers[w] = self._worker(w, resume, self.budget.by_worker.get(w, 0), first=False)
            self.up.discard(w)
            pending[w] = self.workers[w].train_epochs.remote(list(range(from_epoch, epoch + 1)))
        now = time.monotonic()
        for w in pending:
            self.clocks.started(w, now)
        self._drive(pending, epoch)

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)
        ray.kill(self.server, no_restart=True)
        remove_placement_group(self.pg)

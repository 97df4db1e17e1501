"""The run's restart policy, apart from the Ray mechanism that carries it out (``distributed.supervisor``).

The supervisor gathers what it sees into a :class:`RunStatus` (which workers' calls died or failed, which
have made no step for how long, which bundles have no node, whether the parameter server answers) and asks
:func:`decide`, which says what to do: restart some workers, kill a hung server, count a restarted one, fail
the run with one line, or wait (nothing). :class:`RestartBudget` counts the restarts against
cluster.max_restarts_per_worker and cluster.max_restarts; :class:`Clocks` keeps the times the status needs.

No Ray import: the CLI imports :class:`TrainingFailed` from here (it stays fast on bad input), and the policy
is tested without a cluster (tests/test_restart_policy.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Mapping

# The automatic cluster.hang_timeout_s never goes below this: starting an actor, importing torch and the first
# steps of a restarted worker take tens of seconds on a loaded machine.
HANG_FLOOR_S = 120.0


class TrainingFailed(RuntimeError):
    """The run cannot go on (restart limits passed, parameter server gone); the message says why."""


@dataclass(frozen=True)
class RestartBudget:
    """Restarts so far, against ``cluster.max_restarts_per_worker`` and ``cluster.max_restarts``.

    A worker's restart counts once for the worker (i.e. for each of its shards) and once for the run;
    a parameter-server restart counts for the run. A value: each restart gives a new budget.
    """

    per_worker: int
    per_run: int
    by_worker: Mapping[int, int] = field(default_factory=dict)
    server: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_worker.values()) + self.server

    def worker_restarted(self, rank: int) -> RestartBudget:
        return replace(self, by_worker={**self.by_worker, rank: self.by_worker.get(rank, 0) + 1})

    def server_restarted(self) -> RestartBudget:
        return replace(self, server=self.server + 1)

    def passed(self, what: str, rank: int | None = None) -> str | None:
        """The failure line when these counts pass a limit (worker ``rank``'s, or the run's), else None.
        ``what``: the restart that passed it and why."""
        n = self.by_worker.get(rank, 0) if rank is not None else 0
        if n > self.per_worker:
            return f"{what}; it has died {n} times, more than cluster.max_restarts_per_worker={self.per_worker}"
        if self.total > self.per_run:
            return f"{what}; that is restart {self.total} of the run, more than cluster.max_restarts={self.per_run}"
        return None


@dataclass(frozen=True)
class Limits:
    """The cluster settings :func:`decide` applies, besides the restart limits of :class:`RestartBudget`."""

    hang_timeout_s: float  # cluster.hang_timeout_s; 0: automatic (:func:`hang_timeout`)
    placement_timeout_s: float  # cluster.placement_timeout_s
    bundle: Mapping[str, float]  # one worker's placement-group bundle, e.g. {"CPU": 1.0}
    workers: int  # cluster.num_workers


def hang_timeout(limits: Limits, slowest_gap_s: float) -> float:
    """Seconds without a step after which a training worker counts as hung: cluster.hang_timeout_s, or when it
    is 0, 10 times the longest gap between two steps of one process seen in the run, at least HANG_FLOOR_S."""
    fixed = limits.hang_timeout_s
    return fixed if fixed > 0 else max(HANG_FLOOR_S, 10 * slowest_gap_s)


def shard_names(shards: tuple[int, ...] | list[int]) -> str:
    """A worker's shards as the messages name them: "block 3", "blocks 3-4"."""
    return f"block {shards[0]}" if len(shards) == 1 else f"blocks {shards[0]}-{shards[-1]}"


@dataclass(frozen=True)
class WorkerStatus:
    """A worker as the supervisor sees it: its call (its epoch's training, or the gather of its states), its
    steps, its bundle."""

    rank: int
    shards: tuple[int, ...]
    # done: its call came back (it counts only for its bundle); died: its process (or node) did; failed: it raised
    call: Literal["running", "done", "died", "failed"] = "running"
    error: str = ""  # died: the exception's type; failed: the last line of its error
    idle_s: float = 0.0  # seconds since its count of steps last changed (:meth:`Clocks.stepped`)
    answered: bool = True  # whether its last progress call was answered
    unplaced_s: float | None = None  # seconds its bundle has been without a node; None: it has one
    # Its process (first, or restarted) has not answered a progress call yet: it is starting (an actor's start,
    # torch's import, the checkpoint's load), which a short cluster.hang_timeout_s must not count as a hang.
    starting: bool = False


@dataclass(frozen=True)
class ServerStatus:
    """The parameter server as its last identity call found it."""

    answered: bool = True
    silent_s: float = 0.0  # seconds since it last answered
    gone: str | None = None  # it died and Ray does not restart it: the error
    restarted: bool = False  # a new incarnation (pid) answered; it restored:
    restored_from: int | None = None  # the checkpoint of this many epochs, None: its initial state
    start_version: int = 0  # the version it started from


@dataclass(frozen=True)
class RunStatus:
    """What the supervisor sees in ``epoch`` (0-based)."""

    epoch: int
    workers: tuple[WorkerStatus, ...]  # in rank order
    server: ServerStatus = ServerStatus()
    slowest_gap_s: float = 0.0  # the longest gap between two steps of one process in the run
    gathering: bool = False  # the epoch ended: the states are being gathered for its checkpoint
    server_wait_s: float | None = None  # the server died at the gather: seconds waited for it to come back
    resources: Mapping[str, float] = field(default_factory=dict)  # what the cluster has left (a bundle lost)


@dataclass(frozen=True)
class Restart:
    """Kill worker ``rank`` (dead or hung) and create it again in its bundle, from the last checkpoint."""

    rank: int
    what: str  # the worker and what happened to it: "worker 1 (blocks 3-4) died in epoch 2 (ActorDiedError)"
    cause: Literal["died", "hung"]
    count: int  # its restarts, this one included


@dataclass(frozen=True)
class KillServer:
    """The server does not answer: kill it, Ray restarts it."""

    message: str


@dataclass(frozen=True)
class ServerRestarted:
    """A restarted server answered: counted; the message says what it restored."""

    message: str
    count: int
    restored_from: int | None
    version: int


Action = Restart | KillServer | ServerRestarted


@dataclass(frozen=True)
class Decision:
    """What to do, in order, then ``fail`` (the run ends with that line) unless it is None; and the restart
    counts once the actions are done. No action and no failure: wait."""

    actions: tuple[Action, ...]
    budget: RestartBudget
    fail: str | None = None

    @property
    def kind(self) -> Literal["restart", "fail", "wait"]:
        """restart: some workers are restarted (and the run goes on); fail; wait: nothing to restart."""
        if self.fail is not None:
            return "fail"
        return "restart" if any(isinstance(a, Restart) for a in self.actions) else "wait"


def decide(status: RunStatus, budget: RestartBudget, limits: Limits) -> Decision:
    """What the supervisor does about ``status``, given the restarts so far.

    In this order: a worker whose call died is restarted, one whose call raised fails the run; a server gone
    for good fails it, one silent for the hang timeout is killed (Ray restarts it), a restarted one is counted;
    a server that does not come back within cluster.placement_timeout_s after dying at the gather, or a bundle
    without a node for as long, fails the run; last, hung workers are restarted. Every restart counts against
    the budget, and one that passes a limit fails the run instead.

    Hangs: a worker whose process is still starting counts as hung only after HANG_FLOOR_S at least, whatever
    cluster.hang_timeout_s says; nothing counts as hung while the server is silent (the workers wait for it: it is the one to
    restart), nor while its bundle has no node. In sync mode one hung worker soon stalls the others (they wait
    for its pushes), but those still answer progress calls: only the silent ones are restarted, or every
    worker when all are stalled and answering (a deadlock the silent ones do not explain).
    """
    actions: list[Action] = []
    epoch = status.epoch + 1

    def stop(message: str) -> Decision:
        return Decision(tuple(actions), budget, message)

    def restart(w: WorkerStatus, why: str, cause: Literal["died", "hung"]) -> str | None:
        nonlocal budget
        what = f"worker {w.rank} ({shard_names(w.shards)}) {why}"
        after = budget.worker_restarted(w.rank)
        passed = after.passed(what, w.rank)
        if passed is None:
            budget = after
            actions.append(Restart(w.rank, what, cause, budget.by_worker[w.rank]))
        return passed

    for w in status.workers:
        if w.call == "died":
            why = (f"died at the end of epoch {epoch}, before its checkpoint ({w.error})" if status.gathering
                   else f"died in epoch {epoch} ({w.error})")
            passed = restart(w, why, "died")
            if passed:
                return stop(passed)
        elif w.call == "failed":
            return stop(f"worker {w.rank} ({shard_names(w.shards)}) failed in epoch {epoch}: {w.error}")

    server, timeout = status.server, hang_timeout(limits, status.slowest_gap_s)
    if server.gone is not None:
        return stop(f"parameter server died and was not restarted (cluster.max_restarts={budget.per_run}): "
                    f"{server.gone}")
    if not server.answered and server.silent_s > timeout:
        actions.append(KillServer(f"parameter server did not answer for {server.silent_s:.0f}s; killed, "
                                  "Ray restarts it"))
    if server.restarted:
        what = ("parameter server restarted; it restored "
                + (f"the checkpoint of epoch {server.restored_from}" if server.restored_from is not None
                   else "its initial state (no checkpoint yet)") + f", version {server.start_version}")
        after = budget.server_restarted()
        passed = after.passed(what)
        if passed:
            return stop(passed)
        budget = after
        actions.append(ServerRestarted(what + "; workers re-sync with it", budget.server, server.restored_from,
                                       server.start_version))
    limit = limits.placement_timeout_s
    if status.server_wait_s is not None and not server.answered and status.server_wait_s > limit:
        return stop(f"parameter server did not come back within {limit:g}s (cluster.placement_timeout_s) after "
                    f"dying at the end of epoch {epoch}")

    for w in status.workers:
        if w.unplaced_s is not None and w.unplaced_s > limit:
            bundle, left = limits.bundle, status.resources
            fit = min(int(left.get(k, 0) // v) for k, v in bundle.items())
            have = ", ".join(f"{left.get(k, 0):g} {k}" for k in bundle)
            fewer = (f"resume with cluster.num_workers={fit} (run.dir keeps the checkpoint of the last epoch "
                     "done)" if fit else "no worker fits")
            return stop(f"worker {w.rank} ({shard_names(w.shards)}) lost its node in epoch {epoch} and Ray found "
                        f"no room for its bundle {dict(bundle)} within {limit:g}s (cluster.placement_timeout_s): "
                        f"the cluster has {have} left, {limits.workers} workers need {limits.workers} x "
                        f"{dict(bundle)}; add a node, or {fewer}")

    if not server.answered:
        return Decision(tuple(actions), budget)
    pending = [w for w in status.workers if w.call != "done"]  # the dead ones restarted above train again
    stalled = [w for w in pending if w.call == "running" and w.unplaced_s is None
               and w.idle_s > (max(timeout, HANG_FLOOR_S) if w.starting else timeout)]
    silent = [w for w in stalled if not w.answered]
    hung = silent or (stalled if len(stalled) == len(pending) else [])
    rule = (f"cluster.hang_timeout_s={limits.hang_timeout_s:g}" if limits.hang_timeout_s > 0
            else f"automatic hang timeout {timeout:.0f}s; cluster.hang_timeout_s sets it")
    for w in hung:
        passed = restart(w, f"made no step for {w.idle_s:.0f}s in epoch {epoch} ({rule})", "hung")
        if passed:
            return stop(passed)
    return Decision(tuple(actions), budget)


class Clocks:
    """The times :class:`RunStatus` needs, from what the supervisor observes: per worker, its process and count
    of steps and since when that pair has not changed; the longest gap between two steps of one process; since
    when each bundle has been without a node; when the server last answered. Pure bookkeeping, ``now`` given
    (``time.monotonic()`` in the supervisor)."""

    def __init__(self, now: float) -> None:
        self.advanced: dict[int, tuple[int | None, int | None, float]] = {}  # rank -> (pid, steps, since)
        self.slowest_gap_s = 0.0
        self.unplaced_since: dict[int, float] = {}
        self.server_seen = now

    def started(self, rank: int, now: float) -> None:
        """Worker ``rank`` starts an epoch, or a new process of it does: its idle time counts from ``now``."""
        self.advanced[rank] = (None, None, now)

    def stepped(self, rank: int, pid: int | None, steps: int | None, now: float) -> float:
        """Worker ``rank``'s process and its steps so far (None, None: no report yet) -> its idle seconds."""
        seen_pid, seen_steps, since = self.advanced.get(rank, (None, None, now))
        if (pid, steps) != (seen_pid, seen_steps):
            if pid == seen_pid and seen_steps is not None:  # a step of the same process: a gap measured
                self.slowest_gap_s = max(self.slowest_gap_s, now - since)
            self.advanced[rank] = (pid, steps, now)
            return 0.0
        return now - since

    def unplaced(self, ranks: set[int], now: float) -> dict[int, float]:
        """The workers whose bundle has no node now -> seconds it has had none. One placed again starts its
        idle time now (it could not step meanwhile)."""
        for w in set(self.unplaced_since) - ranks:
            del self.unplaced_since[w]
            self.started(w, now)
        return {w: now - self.unplaced_since.setdefault(w, now) for w in sorted(ranks)}

    def server_answered(self, now: float) -> None:
        """The server answered, or a new incarnation of it was asked for: its silence counts from ``now``."""
        self.server_seen = now

    def server_silent(self, now: float) -> float:
        return now - self.server_seen

"""Restart policy of a run: how many times a worker (its shard group) and the run may be restarted."""
from __future__ import annotations

from dataclasses import dataclass, field


class TrainingFailed(RuntimeError):
    """The run cannot go on (restart limits passed, parameter server gone); the message says why."""


@dataclass
class RestartBudget:
    """Counts restarts against ``cluster.max_restarts_per_worker`` and ``cluster.max_restarts``.

    A worker's restart counts once for the worker (i.e. for each of its shards) and once for the run;
    a parameter-server restart counts for the run.
    """

    per_worker: int
    per_run: int
    by_worker: dict[int, int] = field(default_factory=dict)
    server: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_worker.values()) + self.server

    def worker_restart(self, rank: int, what: str) -> int:
        """Record a restart of worker ``rank`` (``what`` names it and why); returns its restart count.

        Raises TrainingFailed once a limit is passed, naming the limit and the reason.
        """
        n = self.by_worker.get(rank, 0) + 1
        self.by_worker[rank] = n
        if n > self.per_worker:
            raise TrainingFailed(f"{what}; it has died {n} times, more than "
                                 f"cluster.max_restarts_per_worker={self.per_worker}")
        self._check_run(what)
        return n

    def server_restart(self, what: str) -> int:
        self.server += 1
        self._check_run(what)
        return self.server

    def _check_run(self, what: str) -> None:
        if self.total > self.per_run:
            raise TrainingFailed(f"{what}; that is restart {self.total} of the run, more than "
                                 f"cluster.max_restarts={self.per_run}")

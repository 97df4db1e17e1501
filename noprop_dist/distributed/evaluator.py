"""Evaluation where the compute is: a chain is scored on the workers' devices (their GPUs, or their cores), in
parts, while they train the next epoch; the driver only adds up the counts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import ray
import torch

from ..core.scoring import StageCounts
from ..data import ImageDataset
from ..training.evaluation import EvalJob, job_parts, score, split_images

# (job, batch range) pairs one worker scores in one call.
Tasks = list[tuple[EvalJob, range]]


@dataclass
class PendingEvaluation:
    """An evaluation in flight: per worker call, its reference and its tasks; and what a failed call falls back
    on (the chain, scored in the driver)."""

    chain: torch.nn.Module
    jobs: list[EvalJob]
    calls: list[tuple["ray.ObjectRef", Tasks]] = field(default_factory=list)

    def done(self) -> bool:
        """Whether every call has answered: :meth:`ClusterEvaluator.result` would not wait."""
        refs = [ref for ref, _ in self.calls]
        return len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs)


class ClusterEvaluator:
    """Scores chains on the run's workers: the evaluation images go into the object store once; each evaluation
    splits its jobs into as many parts as there are workers (core.scoring.batch_parts: exact counts), one call per
    worker, which runs beside its training (Worker.evaluate)."""

    def __init__(self, dataset: ImageDataset, splits: list[str], batch_size: int, seed: int,
                 warn: Callable[[str], None]) -> None:
        self.dataset, self.batch_size, self.seed, self.warn = dataset, batch_size, seed, warn
        images = {s: split_images(dataset, s) for s in splits}
        self.sizes = {s: len(y) for s, (_, y) in images.items()}
        self.images = ray.put(images)

    def start(self, workers: list["ray.actor.ActorHandle"], chain: torch.nn.Module, jobs: list[EvalJob],
              epoch: int) -> PendingEvaluation:
        """Send ``jobs`` on ``chain`` (trained ``epoch`` epochs) to the workers and return at once."""
        per_worker: list[Tasks] = [[] for _ in workers]
        i = 0
        for job in jobs:
            for batches in job_parts(chain, job, self.sizes[job.split], self.batch_size, len(workers)):
                per_worker[i % len(workers)].append((job, batches))  # a job that does not split goes round
                i += 1
        # The chain itself travels (pickled modules, no constructor runs): building one on the worker would draw
        # its initial weights from the global RNG, which the worker's training uses (dropout) at that moment.
        shipped = ray.put(chain)
        pending = PendingEvaluation(chain, jobs)
        for worker, tasks in zip(workers, per_worker):
            if tasks:
                ref = worker.evaluate.remote(shipped, self.images, tasks, self.batch_size, self.seed, epoch)
                pending.calls.append((ref, tasks))
        return pending

    def result(self, pending: PendingEvaluation) -> dict[EvalJob, StageCounts]:
        """Wait for the counts and add them up per job. A call whose worker died (it is being restarted) is
        scored again here, in the driver: the figures never depend on where they were computed."""
        totals = {job: StageCounts() for job in pending.jobs}
        for ref, tasks in pending.calls:
            try:
                counts = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
                self.warn(f"a worker was lost while evaluating ({type(e).__name__}); its part is scored on the driver")
                counts = [score(pending.chain, split_images(self.dataset, job.split), job, batches, self.batch_size,
                                self.seed, self.dataset.mean, self.dataset.std) for job, batches in tasks]
            for (job, _), c in zip(tasks, counts, strict=True):
                totals[job] = totals[job] + c
        return totals

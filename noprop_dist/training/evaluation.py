"""The assembled chain from trained shard states, and its evaluation (test, along the chain, train subset)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core import ModelSpec, StageCounts, batch_parts, build_chain, count_stages
from ..core.samplers import Z0_ONLY_SAMPLERS
from ..data import ImageDataset, normalize
from ..registry import get_method


def assemble_chain(spec: ModelSpec, block_states: dict[int, dict], shared_state: dict) -> torch.nn.Module:
    """The inference chain from checkpointed shard states (shards 1..K) and the server's state."""
    return build_chain(
        spec, [block_states[t]["block"] for t in range(1, spec.num_shards + 1)], shared_state["shared"]
    )


def evaluate_states(
    spec: ModelSpec, dataset: ImageDataset, block_states: dict[int, dict], shared_state: dict,
    batch_size: int, seed: int, split: str = "test",
) -> tuple[torch.nn.Module, float]:
    """Assemble the chain from shard and shared states (shards 1..K) and measure its accuracy on ``split``."""
    chain = assemble_chain(spec, block_states, shared_state)
    return chain, split_accuracy(chain, dataset, split, batch_size, seed)


@dataclass(frozen=True)
class EvalJob:
    """One figure an evaluation measures: the chain's accuracy on ``split`` (test | val | train, the training
    images of :meth:`ImageDataset.train_accuracy_subset`) with ``sampler`` (None: the chain's own), with
    ``stages`` also along the chain (stage by stage) from the same pass."""

    split: str
    stages: bool = False
    sampler: str | None = None


def split_images(dataset: ImageDataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 images (N, C, H, W) and labels (N,) of ``split``; ValueError for a val split the dataset lacks."""
    if split == "train":
        return dataset.train_accuracy_subset()
    if split == "val" and dataset.val_x is None:
        raise ValueError(f"{dataset.name} has no validation split")
    x, y = {"test": (dataset.test_x, dataset.test_y), "val": (dataset.val_x, dataset.val_y)}[split]
    return np.ascontiguousarray(x), np.asarray(y)


def job_parts(chain: torch.nn.Module, job: EvalJob, num_images: int, batch_size: int, parts: int) -> list[range]:
    """The batch ranges ``job`` splits into for ``parts`` scorers: as many as asked for a sampler whose only
    noise is z_0 (its parts replay the earlier batches' z_0 and give exactly the counts of one pass), a single
    one for the others (their noise at every step makes a part depend on all the batches before it)."""
    splittable = chain.sampler_name(job.sampler) in Z0_ONLY_SAMPLERS
    return batch_parts(num_images, batch_size, parts if splittable else 1)


def score(chain: torch.nn.Module, images: tuple[np.ndarray, np.ndarray], job: EvalJob, batches: range | None,
          batch_size: int, seed: int, mean: tuple[float, ...], std: tuple[float, ...],
          device: torch.device | str | None = None) -> StageCounts:
    """The counts of ``job`` on ``batches`` (None: all) of ``images`` = (uint8 (N, C, H, W), labels (N,)), the
    chain on ``device`` (None: the GPU when there is one); batches of ``batch_size``, noise seeded by ``seed``."""
    with warnings.catch_warnings():  # a read-only view of the object store's copy; it is never written
        warnings.simplefilter("ignore", UserWarning)
        x, y = torch.from_numpy(images[0]), torch.from_numpy(np.asarray(images[1]))
    counts, _ = count_stages(chain, x, y, batch_size, seed,
                             lambda xb: normalize(xb, mean, std), device, job.stages, batches, sampler=job.sampler)
    return counts


def score_locally(chain: torch.nn.Module, dataset: ImageDataset, jobs: list[EvalJob], batch_size: int,
                  seed: int) -> dict[EvalJob, StageCounts]:
    """Every job in this process (a finished run re-evaluated without a cluster, the in-process runs)."""
    return {job: score(chain, split_images(dataset, job.split), job, None, batch_size, seed, dataset.mean,
                       dataset.std) for job in jobs}


def final_jobs(chain: torch.nn.Module, paper_sampler: bool = False, train_accuracy: bool = False) -> list[EvalJob]:
    """What the end of a run measures: the test set with the run's sampler, stage by stage from that one pass;
    when asked, the training subset's accuracy (``train_accuracy``, eval.train_accuracy) and the paper's
    sampler's own pass (``paper_sampler``, eval.paper_sampler; only when it differs from the run's)."""
    jobs = [EvalJob("test", stages=True)]
    if train_accuracy:
        jobs.append(EvalJob("train"))
    paper = get_method(chain.spec.method).paper_sampler
    if paper_sampler and paper != chain.sampler_name():
        jobs.append(EvalJob("test", sampler=paper))
    return jobs


def final_report(chain: torch.nn.Module, counts: dict[EvalJob, StageCounts]) -> dict[str, Any]:
    """The end-of-run figures from the counts of :func:`final_jobs`: {"test_accuracy", "train_accuracy" (None
    when not measured), "sampler", "paper_sampler", "test_accuracy_by_sampler": {name: accuracy},
    "stages": [{"block", "chain_accuracy", "own_accuracy"}]}. stage_average's stages are one mean run's: its
    last stage is mean's figure, reported at no cost."""
    sampler, paper = chain.sampler_name(), get_method(chain.spec.method).paper_sampler
    test = counts[EvalJob("test", stages=True)]
    stages = test.table()
    by_sampler = {sampler: test.accuracy()}
    if EvalJob("test", sampler=paper) in counts:
        by_sampler[paper] = counts[EvalJob("test", sampler=paper)].accuracy()
    if sampler == "stage_average":
        by_sampler["mean"] = stages[-1]["chain_accuracy"]
    train = counts.get(EvalJob("train"))
    return {
        "test_accuracy": test.accuracy(), "train_accuracy": train.accuracy() if train else None,
        "sampler": sampler, "paper_sampler": paper, "test_accuracy_by_sampler": by_sampler,
        "stages": [{"block": k} | s for k, s in enumerate(stages, start=1)],
    }


def final_evaluation(chain: torch.nn.Module, dataset: ImageDataset, batch_size: int, seed: int,
                     paper_sampler: bool = False, train_accuracy: bool = False) -> dict[str, Any]:
    """:func:`final_report` of :func:`final_jobs`, scored in this process."""
    jobs = final_jobs(chain, paper_sampler, train_accuracy)
    return final_report(chain, score_locally(chain, dataset, jobs, batch_size, seed))


def split_accuracy(chain: torch.nn.Module, dataset: ImageDataset, split: str, batch_size: int, seed: int) -> float:
    """Accuracy of the chain (its own sampler) on one split: "test", "val" (ValueError when the dataset has none)
    or "train", the training images of :meth:`ImageDataset.train_accuracy_subset`."""
    return score(chain, split_images(dataset, split), EvalJob(split), None, batch_size, seed, dataset.mean,
                 dataset.std).accuracy()

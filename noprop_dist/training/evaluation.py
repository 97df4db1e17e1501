"""The assembled chain from trained shard states, and its evaluation (test, along the chain, train subset)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..config import PAPER_SAMPLER
from ..core import ModelSpec, evaluate_chain, evaluate_stages
from ..core.variants import build_chain
from ..data import ImageDataset, normalize


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


def final_evaluation(chain: torch.nn.Module, dataset: ImageDataset, batch_size: int, seed: int) -> dict[str, Any]:
    """The end-of-run evaluation of an assembled chain on the test set: its accuracy with the run's sampler, the
    accuracy along the chain (stage by stage), and the paper's sampler beside it when the run's differs, so a
    Table 1 row compares like with like (and mean beside stage_average, which it refines). Returns
    {"test_accuracy", "sampler", "paper_sampler", "test_accuracy_by_sampler": {name: accuracy},
    "stages": [{"block", "chain_accuracy", "own_accuracy"}]}.
    """
    test_x, test_y = torch.from_numpy(np.ascontiguousarray(dataset.test_x)), torch.from_numpy(dataset.test_y)

    def norm(xb: torch.Tensor) -> torch.Tensor:
        return normalize(xb, dataset.mean, dataset.std)

    sampler, paper = chain.sampler_name(), PAPER_SAMPLER[chain.spec.method]
    acc, _, stages = evaluate_stages(chain, test_x, test_y, batch_size, seed, norm)
    by_sampler = {sampler: acc}
    if paper != sampler:
        by_sampler[paper], _ = evaluate_chain(chain, test_x, test_y, batch_size, seed, norm, sampler=paper)
    if sampler == "stage_average":  # its stages are one mean run's: the last one is mean's figure, at no cost
        by_sampler["mean"] = stages[-1]["chain_accuracy"]
    return {
        "test_accuracy": acc, "sampler": sampler, "paper_sampler": paper, "test_accuracy_by_sampler": by_sampler,
        "stages": [{"block": k} | s for k, s in enumerate(stages, start=1)],
    }


def split_accuracy(chain: torch.nn.Module, dataset: ImageDataset, split: str, batch_size: int, seed: int) -> float:
    """Accuracy of the chain (its own sampler) on one split: "test", "val" (ValueError when the dataset has none)
    or "train", the training images of :meth:`ImageDataset.train_accuracy_subset`."""
    if split == "train":
        x, y = dataset.train_accuracy_subset()
    elif split == "val" and dataset.val_x is None:
        raise ValueError(f"{dataset.name} has no validation split")
    else:
        x, y = {"test": (dataset.test_x, dataset.test_y), "val": (dataset.val_x, dataset.val_y)}[split]
    acc, _ = evaluate_chain(
        chain, torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y)), batch_size, seed,
        lambda xb: normalize(xb, dataset.mean, dataset.std),
    )
    return acc

"""Which chain a run keeps, and when it stops: with a validation split, ``chain.pt`` is the chain of the best
validation epoch (written whenever a new best is measured, so it survives a crash and a resume), the last
epoch's is kept beside it as ``chain_last.pt`` when it is not the best, and ``train.early_stop_patience`` ends a
run whose validation accuracy has not risen for that many epochs. Without a validation split ``chain.pt`` is the
last epoch's chain, as the test set must not choose it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..core.chain_file import read_chain_file

CHAIN_FILE = "chain.pt"
LAST_CHAIN_FILE = "chain_last.pt"


@dataclass(frozen=True)
class Best:
    """The best validation epoch so far: its epoch (a whole number, or the budget of a partial last epoch) and
    its validation accuracy."""

    epoch: int | float
    val_accuracy: float

    def improved_by(self, accuracy: float) -> bool:
        """Whether ``accuracy`` beats this one: strictly, so that the first epoch reaching the best is kept."""
        return accuracy > self.val_accuracy


def read_best(run_dir: str) -> Best | None:
    """The best epoch recorded in ``run_dir/chain.pt`` (its ``best_epoch`` and ``val_accuracy``), or None."""
    path = os.path.join(run_dir, CHAIN_FILE)
    if not os.path.exists(path):
        return None
    try:
        _, payload = read_chain_file(path)
    except ValueError:  # unreadable: as if no best were kept yet (the next evaluation writes one)
        return None
    extra = payload["extra"]
    if not isinstance(extra, dict) or extra.get("best_epoch") is None or extra.get("val_accuracy") is None:
        return None
    return Best(extra["best_epoch"], float(extra["val_accuracy"]))


def keep_if_best(chain: torch.nn.Module, epoch: int | float, val_accuracy: float, best: Best | None, run_dir: str,
                 extra: dict[str, Any]) -> Best:
    """Save ``chain`` as ``run_dir/chain.pt`` when ``val_accuracy`` beats ``best`` (or there is none yet); returns
    the best after it. ``extra``: what the chain file records besides (the run's data and evaluation settings)."""
    if best is not None and not best.improved_by(val_accuracy):
        return best
    chain.save(os.path.join(run_dir, CHAIN_FILE), extra=extra | {"best_epoch": epoch, "val_accuracy": val_accuracy})
    return Best(epoch, val_accuracy)


def should_stop(best: Best | None, epochs_done: int | float, patience: int) -> bool:
    """Early stopping: whether ``patience`` (> 0) epochs have passed since the best validation epoch."""
    return patience > 0 and best is not None and epochs_done - best.epoch >= patience

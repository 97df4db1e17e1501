"""``summary.json``: the record of a run that every method writes, NoProp (``distributed.driver``) and the
baselines (``baselines.runner``) alike, and that the CLI, the reproduction harness, the plots and the Python
API read. The keys every run has are :class:`RunSummary`'s, filled by :func:`run_summary`; each method adds
its own details next to them."""

from __future__ import annotations

import json
import os
from typing import Any, TypedDict

from ..config import Config
from ..registry import METHODS
from .atomic import atomic_write_json

SUMMARY_FILE = "summary.json"


class SummaryError(ValueError):
    """summary.json is missing or unreadable; the message names the file."""


class RunSummary(TypedDict):
    """The keys of every summary.json. Accuracies are fractions in [0, 1], None while not yet evaluated."""

    method: str                    # model.method
    dataset: str                   # data.name
    embedding: str                 # model.embedding ("none" for DTP, which has no label embedding)
    num_workers: int               # cluster.num_workers
    epochs: int | float            # train.epochs (a fraction when the budget ends part-way through an epoch)
    seed: int                      # train.seed
    test_accuracy: float | None    # on the whole (limited) test split
    train_accuracy: float | None   # on ImageDataset.train_accuracy_subset(), the same rule for every method
    train_accuracy_examples: int   # how many training images train_accuracy counts
    train_seconds: float           # wall time of training, without evaluation
    curve: list[dict[str, Any]]    # per epoch: {"epoch", "train_seconds", "test_accuracy"}
    peak_memory_mb: float | None   # peak training memory per worker process
    peak_memory_kind: str | None   # "gpu" (GPU memory allocated) or "rss" (resident set size)
    num_shards: int | None         # trained units: DT's T blocks, CT/FM's K time-shards, backprop's blocks
    run_dir: str


def run_summary(cfg: Config, *, test_accuracy: float | None, train_accuracy: float | None,
                train_accuracy_examples: int, train_seconds: float, curve: list[dict[str, Any]],
                peak_memory_mb: float | None, peak_memory_kind: str | None, num_shards: int | None,
                run_dir: str | os.PathLike) -> RunSummary:
    """The common keys of ``cfg``'s run (see :class:`RunSummary`)."""
    return RunSummary(
        method=cfg.model.method, dataset=cfg.data.name,
        embedding=cfg.model.embedding if METHODS[cfg.model.method].label_embedding else "none",
        num_workers=cfg.cluster.num_workers, epochs=cfg.train.epochs, seed=cfg.train.seed,
        test_accuracy=test_accuracy, train_accuracy=train_accuracy, train_accuracy_examples=train_accuracy_examples,
        train_seconds=train_seconds, curve=list(curve), peak_memory_mb=peak_memory_mb,
        peak_memory_kind=peak_memory_kind, num_shards=num_shards, run_dir=os.fspath(run_dir),
    )


def summary_path(run_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(run_dir), SUMMARY_FILE)


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``<run_dir>/summary.json``, or SummaryError naming the file and what is wrong with it."""
    path = summary_path(run_dir)
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except FileNotFoundError:
        raise SummaryError(f"no summary.json in {os.fspath(run_dir)}: has the run finished?") from None
    except OSError as e:
        raise SummaryError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        raise SummaryError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(summary, dict):
        raise SummaryError(f"{path}: not a JSON object")
    return summary


def write_summary(run_dir: str | os.PathLike, summary: dict[str, Any]) -> None:
    """Write ``<run_dir>/summary.json`` atomically: a crash leaves the old file or the new one, never half."""
    atomic_write_json(summary_path(run_dir), summary)


def describe_model(method: str, num_shards: int | None) -> str:
    """What a run trains, for one line of output: "noprop_dt, T=10 blocks", "noprop_ct, K=2 time-shards",
    "backprop, 10 blocks", "dtp" (registry.Method.shards_text)."""
    text = METHODS[method].shards_text
    if text is None or not num_shards:
        return method
    return f"{method}, {text.format(n=num_shards, s='s' if num_shards > 1 else '')}"

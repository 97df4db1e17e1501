"""The Python API: ``noprop_dist.train(config, dataset=..., block=..., **overrides)`` and
``noprop_dist.load_chain(run_dir)``.

``run_config`` is the one place that sends a config to its trainer: NoProp runs to the Ray driver, baselines to
their runner (in this process, or data-parallel under Ray Train). ``python -m noprop_dist.run`` calls it too.
Torch and Ray are imported only when a run starts, so ``import noprop_dist`` stays light.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .config import Config, ConfigError, load_config, resume_config
from .registry import get_method, target_of

if TYPE_CHECKING:
    from torch import nn

    from .core import BlockSpec
    from .data import ImageDataset
    from .evaluate import TrainedChain

BlockFactory = Callable[["BlockSpec"], "nn.Module"]


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns: the run's ``summary.json`` as a dict and its run directory."""

    summary: dict[str, Any]
    run_dir: str


def run_config(cfg: Config, log: Callable[[str], None] = print, dataset: ImageDataset | None = None,
               block: BlockFactory | None = None, on_epoch: Callable[[dict], Any] | None = None) -> dict[str, Any]:
    """Train (or resume, or re-evaluate) the run ``cfg`` describes; returns its summary. dataset / block /
    on_epoch: the arrays, the block factory and the per-epoch callback the Python API was given (see
    :func:`train`)."""
    if not get_method(cfg.model.method).noprop:
        from .baselines.runner import run_baseline

        data_parallel = None
        if cfg.cluster.num_workers > 1:
            from .distributed.ray_train import fit as data_parallel  # imports Ray Train
        return run_baseline(cfg, log, data_parallel, dataset, block, on_epoch)
    from .distributed.driver import run_training  # imports Ray

    return run_training(cfg, log, dataset, block, on_epoch)


def _dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"train": {"epochs": 3}, "cluster.num_workers": 2}`` -> ``{"train.epochs": 3, "cluster.num_workers": 2}``."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if "." in key:
            flat[key] = value
        elif isinstance(value, dict):
            flat.update({f"{key}.{name}": v for name, v in value.items()})
        else:
            raise ConfigError(f"{key}={value!r}: give a section as a mapping ({key}={{'name': value}}) or a dotted "
                              f"key ('{key}.name')")
    return flat


def train(config: str | os.PathLike | Config | None = None, *, preset: str | None = None,
          dataset: ImageDataset | None = None, block: BlockFactory | None = None,
          on_epoch: Callable[[dict], Any] | None = None, resume: str | os.PathLike | None = None,
          log: Callable[[str], None] = print, **overrides: Any) -> TrainResult:
    """Train the run a config describes, as ``python -m noprop_dist.run`` does, and return its summary.

    config: a packaged config's name (``"mnist"``), a YAML file, a :class:`Config`, or None (the quickstart).
    dataset: your own images, ``noprop_dist.ImageDataset.from_arrays(...)``, in place of the config's data
    (``data.name`` becomes ``arrays``; the config's limits and ``data.val_fraction`` still apply).
    block: your own block factory ``(BlockSpec) -> nn.Module`` in place of ``model.block`` (which records its
    import path); it reaches the Ray workers by value (docs/your_data_and_blocks.md).
    on_epoch: called once per epoch, in order, with a dict of its figures: ``epoch``, ``epochs`` (the budget),
    ``train_seconds``, ``losses`` (per shard), ``val_accuracy`` or ``test_accuracy`` when measured,
    ``best_epoch``, ``best_val_accuracy``, ``stopping_early``; for Ray Tune, Optuna or a notebook. An epoch whose
    chain is evaluated is reported when its figures land, after the next epoch (the workers score it while they
    train on; with ``train.early_stop_patience`` they wait and it comes at once). What it raises ends the run,
    which resumes from the last checkpoint: an Optuna pruning exception, for instance.
    resume: a run directory to continue, with its own config (its config.yaml; overrides still apply).
    overrides: sections as mappings (``train={"epochs": 3}``) or dotted keys (``**{"train.epochs": 3}``),
    applied after the file and the preset. A bad key or value raises ConfigError naming it; nothing is written.
    Every run without ``run.dir`` gets a new directory, ``runs/<config>/<date>-<time>``.
    """
    values = _dotted(overrides)
    if resume is not None and (config is not None or preset is not None):
        raise ConfigError(f"resume: continues the run in {resume} with its own config; give overrides, not "
                          "config or preset")
    if dataset is not None:
        from .data import ImageDataset

        if not isinstance(dataset, ImageDataset):
            raise ConfigError(f"dataset: expected a noprop_dist.ImageDataset (ImageDataset.from_arrays(...)), got a "
                              f"{type(dataset).__name__}")
        values = {"data.name": "arrays", "data.path": None, "data.image_size": None} | values
    if block is not None:
        if not callable(block):
            raise ConfigError(f"block: expected a factory function (BlockSpec) -> nn.Module, got a "
                              f"{type(block).__name__}")
        values = {"model.block": target_of(block)} | values
    if resume is not None:
        cfg = resume_config(resume, values=values)
    elif isinstance(config, Config):
        if preset is not None:
            raise ConfigError("preset: applies to a config file or name, not to a Config object")
        cfg = load_config(None, values=_dotted(config.to_dict()) | values)
    else:
        cfg = load_config(config, preset=preset, values=values)
    if dataset is None and cfg.data.name == "arrays":
        raise ConfigError("data.name: arrays needs the arrays: noprop_dist.train(config, dataset="
                          "ImageDataset.from_arrays(...))")
    summary = run_config(cfg, log, dataset, block, on_epoch)
    return TrainResult(summary=summary, run_dir=str(summary["run_dir"]))


def load_chain(run_dir: str | os.PathLike, **settings: Any) -> TrainedChain:
    """The chain a finished run saved, a torch module that predicts from raw images without Ray:
    ``load_chain(d).predict(uint8_images)`` -> classes (N,). settings: ``sampler``, ``steps``, ``draws``, ``block``
    (the factory, for a run whose block was a function of a script; see :func:`noprop_dist.evaluate.load_chain`)."""
    from .evaluate import load_chain as load

    return load(run_dir, **settings)

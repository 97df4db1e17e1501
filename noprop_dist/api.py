"""The Python API: ``noprop_dist.train(config, **overrides)`` and ``noprop_dist.load_chain(run_dir)``.

``run_config`` is the one place that sends a config to its trainer: NoProp runs to the Ray driver, baselines to
their runner (in this process, or data-parallel under Ray Train). ``python -m noprop_dist.run`` calls it too.
Torch and Ray are imported only when a run starts, so ``import noprop_dist`` stays light.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .config import BASELINE_METHODS, Config, ConfigError, load_config

if TYPE_CHECKING:
    from .evaluate import TrainedChain


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns: the run's ``summary.json`` as a dict and its run directory."""

    summary: dict[str, Any]
    run_dir: str


def run_config(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume, or re-evaluate) the run ``cfg`` describes; returns its summary."""
    if cfg.model.method in BASELINE_METHODS:
        from .baselines.runner import run_baseline

        data_parallel = None
        if cfg.cluster.num_workers > 1:
            from .distributed.ray_train import fit as data_parallel  # imports Ray Train
        return run_baseline(cfg, log, data_parallel)
    from .distributed.driver import run_training  # imports Ray

    return run_training(cfg, log)


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
          log: Callable[[str], None] = print, **overrides: Any) -> TrainResult:
    """Train the run a config describes, as ``python -m noprop_dist.run`` does, and return its summary.

    config: a packaged config's name (``"mnist"``), a YAML file, a :class:`Config`, or None (the quickstart).
    overrides: sections as mappings (``train={"epochs": 3}``) or dotted keys (``**{"train.epochs": 3}``),
    applied after the file and the preset. A bad key or value raises ConfigError naming it; nothing is written.
    """
    if isinstance(config, Config):
        if preset is not None:
            raise ConfigError("preset: applies to a config file or name, not to a Config object")
        cfg = load_config(None, values=_dotted(config.to_dict()) | _dotted(overrides))
    else:
        cfg = load_config(config, preset=preset, values=_dotted(overrides))
    summary = run_config(cfg, log)
    return TrainResult(summary=summary, run_dir=str(summary["run_dir"]))


def load_chain(run_dir: str | os.PathLike, **settings: Any) -> TrainedChain:
    """The chain a finished run saved, a torch module that predicts from raw images without Ray:
    ``load_chain(d).predict(uint8_images)`` -> classes (N,). settings: ``sampler``, ``steps``, ``draws``
    (see :func:`noprop_dist.evaluate.load_chain`)."""
    from .evaluate import load_chain as load

    return load(run_dir, **settings)

"""Helpers shared by the benchmark scripts: quiet Ray runs and result files."""
from __future__ import annotations

import json
import os
import platform
import time

import torch

from noprop_dist.config import Config


def machine() -> dict:
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def write_result(name: str, payload: dict) -> str:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload | {"machine": machine()}, f, indent=2)
    return path


def ray_run(cfg: Config) -> dict:
    """A run on a fresh local Ray cluster (started and stopped by the driver); returns summary.json."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from noprop_dist.distributed.driver import run_training

    return run_training(cfg, log=lambda s: None)

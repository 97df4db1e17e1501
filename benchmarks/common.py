"""Helpers shared by the benchmark scripts: quiet Ray runs and result files."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import torch

from noprop_dist.config import Config
from noprop_dist.core import build_shard, build_shared
from noprop_dist.core.seeds import block_noise_seed, epoch_order_seed
from noprop_dist.data import ImageDataset
from noprop_dist.registry import get_method
from noprop_dist.training import (
    TrainingData,
    initial_prototypes,
    model_spec,
    resolve_precision,
)


def machine() -> dict:
    """Where a result was measured. The CPU's vector units decide the step time several-fold (fp32 or native
    bf16: benchmarks/README.md), so its name and bf16 flags go with every figure; a GPU's name where one is."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return {"cpus": os.cpu_count(), "cpu": caps.get("cpu_name") or platform.processor(),
            "native_bf16": {k: bool(caps.get(k)) for k in ("avx512_bf16", "amx_bf16")},
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}


def user_command(cmd: list[str], cwd: str, pythonpath: str | None = None,
                 timeout: float = 3600) -> tuple[subprocess.CompletedProcess, float]:
    """Run a command as a user would, timed from outside: in ``cwd``, without this shell's RAY_ADDRESS (it
    starts its own cluster) or PYTHONPATH (it imports the installed package, or ``pythonpath``'s), output
    unbuffered and captured. Exits with the command's error output when it fails. Returns (it, wall seconds)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env | {"PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=timeout)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done, wall


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


def epoch_batches(cfg: Config, n: int, epoch: int) -> list[torch.Tensor]:
    """The index batches of an epoch of n images, as the shard loop draws them (same seed, same dropped
    singleton)."""
    gen = torch.Generator().manual_seed(epoch_order_seed(cfg.train.seed, epoch))
    order = torch.randperm(n, generator=gen)
    bs = cfg.train.batch_size
    return [order[s : s + bs] for s in range(0, n, bs) if min(bs, n - s) > 1]


def plain_loop(cfg: Config, data: ImageDataset, epochs: int, blocks: list[int] | None = None,
               device: torch.device = torch.device("cpu")) -> list[float]:
    """Epoch seconds of the blocks (default all) in a plain torch loop, the ceiling a framework is measured
    against: per mini-batch and block, the block loss plus the shared CE, backward, the block's and the
    shared-state AdamW steps (torch's fused AdamW, as the shard loop uses), under cfg.train.precision. No
    stats, no exchanges, no checks; batches gathered on the device like the shard loop's."""
    spec = model_spec(cfg, data.image_shape, data.num_classes)
    tr = cfg.train
    bf16 = resolve_precision(tr.precision, device) == "bf16"
    blocks = blocks or list(range(1, spec.num_shards + 1))
    nets = {t: build_shard(spec, t, tr.seed).to(device) for t in blocks}
    shared = build_shared(spec, tr.seed, initial_prototypes(spec, data, tr.seed)).to(device)
    opts = {t: torch.optim.AdamW(n.parameters(), lr=tr.lr, weight_decay=tr.weight_decay, fused=True)
            for t, n in nets.items()}
    shared_opt = torch.optim.AdamW(shared.parameters(), lr=tr.lr, weight_decay=tr.weight_decay, fused=True)
    gens = {t: torch.Generator(device=device).manual_seed(block_noise_seed(tr.seed, t)) for t in blocks}
    placed = TrainingData(data.train_x, data.train_y, data.mean, data.std, device)
    seconds = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for idx in epoch_batches(cfg, len(placed), epoch):
            x, y = placed.batch(idx.to(placed.where))
            for t, net in nets.items():
                net.train()
                opts[t].zero_grad(set_to_none=True)
                shared_opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    total, _ = get_method(spec.method).shard_loss(net, shared, spec, t, x, y, gens[t])
                total.backward()
                opts[t].step()
                shared_opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
    return seconds

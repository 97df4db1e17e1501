"""GPU check without Ray: per-block throughput of the shard loop against a plain torch loop, fp32 and bf16, and
the aggregate throughput of 1, 2 and 4 processes sharing the GPU (how fractional GPUs put a few blocks on
one device). Run by ``benchmarks/gpu_check.sh`` on a machine with a GPU; writes its figures to --out.

The shard loop is the code a Ray worker runs (ShardGroup with its replica), here against an in-process
server (LocalClient): Ray's wheel does not travel to the GPU machine. Images are random uint8 of the shape
asked for (throughput does not depend on their content); digits (8x8, real) is the default small case.

    python benchmarks/gpu_check.py --out /tmp/gpu --shape 1x28x28            # on the GPU machine
    python benchmarks/gpu_check.py --out /tmp/gpu --device cpu --quick       # a dry run of the script
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from common import epoch_batches, plain_loop  # noqa: E402

from noprop_dist.config import load_config  # noqa: E402
from noprop_dist.data import ImageDataset, load_dataset  # noqa: E402
from noprop_dist.training import ShardGroup, model_spec  # noqa: E402
from noprop_dist.training.shared_state import LocalClient, SharedStateServer  # noqa: E402


def dataset(shape: str, n: int) -> ImageDataset:
    if shape == "digits":
        return load_dataset("digits")
    c, h, w = (int(v) for v in shape.split("x"))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int64)
    return ImageDataset("synthetic", x, y, x[:256], y[:256], 10, (0.5,) * c, (0.25,) * c)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_rate(cfg, data: ImageDataset, blocks: list[int], device: torch.device, epochs: int) -> tuple[float, dict]:
    """Block-samples/s of the shard loop (epochs after the first), and its last worker-style report."""
    spec = model_spec(cfg, data.image_shape, data.num_classes)
    server = SharedStateServer(spec, 0, sources=["w0"], mode=cfg.train.sync_mode)
    group = ShardGroup(spec, blocks, cfg.train, data.train_x, data.train_y, data.mean, data.std,
                       LocalClient(server), device=device)
    group.train_epoch(0)
    sync(device)
    samples0 = sum(st.samples for st in group.stats.values())
    t0 = time.perf_counter()
    for e in range(1, epochs + 1):
        group.train_epoch(e)
    sync(device)
    rate = (sum(st.samples for st in group.stats.values()) - samples0) / (time.perf_counter() - t0)
    step = sum(st.compute_seconds + st.sync_seconds for st in group.stats.values())
    return rate, {"data_on_device": group.data.on_device, "sync_share": group.replica.stats.seconds / step,
                  "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def _process(args: tuple) -> float:
    """One of several processes sharing the device: trains its own blocks; returns its block-samples/s."""
    overrides, shape, n, blocks, device, epochs, start_at = args
    torch.set_num_threads(1)
    cfg = load_config(None, overrides)
    data = dataset(shape, n)
    while time.time() < start_at:  # all processes start their timed part together
        time.sleep(0.01)
    return loop_rate(cfg, data, blocks, torch.device(device), epochs)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="1x28x28", help="CxHxW of synthetic images, or 'digits'")
    p.add_argument("--images", type=int, default=12_800)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs of the shard loop (after one warm-up)")
    p.add_argument("--sync-every", type=int, default=1)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of the script")
    args = p.parse_args()
    if args.quick:
        args.images, args.blocks, args.epochs, args.processes = 512, 2, 1, [1, 2]
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (use --device cpu for a dry run)")
    data = dataset(args.shape, args.images)
    blocks = list(range(1, args.blocks + 1))
    per_epoch = sum(len(b) for b in epoch_batches(load_config(None, []), len(data.train_y), 0)) * len(blocks)
    result: dict = {"args": vars(args), "torch": torch.__version__, "python": platform.python_version(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "date": time.strftime("%Y-%m-%d %H:%M"), "rows": []}
    print(f"{result['gpu'] or 'cpu'}, torch {torch.__version__}, images {data.image_shape}, T = {args.blocks}",
          flush=True)
    for precision in ("fp32", "bf16"):
        overrides = [f"model.num_blocks={args.blocks}", f"train.precision={precision}",
                     f"train.sync_every={args.sync_every}"]
        cfg = load_config(None, overrides)
        seconds = plain_loop(cfg, data, args.epochs + 1, blocks, device)  # the first epoch warms up
        plain = per_epoch / (sum(seconds[1:]) / args.epochs)
        loop, info = loop_rate(cfg, data, blocks, device, args.epochs)
        row = {"precision": precision, "plain": plain, "loop": loop, "of_plain": loop / plain, **info}
        result["rows"].append(row)
        print(f"{precision}: plain {plain:,.0f} block-samples/s, shard loop {loop:,.0f} ({loop / plain:.2f} of plain), "
              f"protocol {100 * info['sync_share']:.2f} % of step time, data on device {info['data_on_device']}",
              flush=True)
    shares = {}
    ctx = mp.get_context("spawn")
    for k in args.processes:
        overrides = [f"model.num_blocks={args.blocks}", "train.precision=bf16", f"train.sync_every={args.sync_every}"]
        # Each process trains the blocks one worker of k would own; the device is shared.
        groups = np.array_split(np.array(blocks), k)
        start_at = time.time() + 20 + 5 * k
        with ctx.Pool(k) as pool:
            rates = pool.map(_process, [(overrides, args.shape, args.images, [int(t) for t in g], args.device,
                                         args.epochs, start_at) for g in groups])
        shares[k] = {"aggregate": sum(rates), "per_process": rates}
        print(f"{k} process{'es' if k > 1 else ''} sharing the device (bf16): {sum(rates):,.0f} block-samples/s "
              f"({', '.join(f'{r:,.0f}' for r in rates)})", flush=True)
    result["processes"] = shares
    with open(os.path.join(args.out, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print("written:", os.path.join(args.out, "gpu_check.json"))


if __name__ == "__main__":
    main()

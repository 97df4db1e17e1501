"""One DT block's training step (model.block's: fig6 by default) at 1 torch thread: fp32 against bf16 autocast, NCHW against channels_last,
batch 128 and 256 (Fashion-MNIST's 28x28 shape), side by side in one process. Prints ms per step and
samples/s and writes benchmarks/results/<name>.json (default block_step), with the CPU's bf16 flags.

    python benchmarks/block_step.py
    python benchmarks/block_step.py --steps 3 --batches 128 --name block_step_avx2   # emulated bf16 is slow
    python benchmarks/block_step.py --config fashion_mnist --batches 128   # the block that config trains
    python benchmarks/block_step.py --config fashion_mnist --set model.block=resnet --name block_step_resnet
"""
from __future__ import annotations

import argparse
import datetime
import time

import torch
import torch.nn.functional as F
from common import write_result

from noprop_dist.config import load_config
from noprop_dist.core.blocks import ModelSpec, make_shard
from noprop_dist.training import model_spec, resolve_precision

MODES = ("fp32", "bf16", "fp32_cl", "bf16_cl")  # _cl: weights and images channels_last


def step_seconds(spec: ModelSpec, batch: int, mode: str, steps: int) -> float:
    """Mean seconds of one AdamW step of a fresh block on random (B, 1, 28, 28) images, after 3 warm-up steps."""
    torch.manual_seed(0)
    block = make_shard(spec, 1)
    optimizer = torch.optim.AdamW(block.parameters(), 1e-3)
    x, z, y = torch.randn(batch, 1, 28, 28), torch.randn(batch, spec.embed_dim), torch.randint(0, 10, (batch,))
    if mode.endswith("_cl"):
        block = block.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("bf16")):
            logits = block(z, x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode (after 3 warm-up steps)")
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--name", default="block_step", help="results file name")
    parser.add_argument("--config", help="a packaged config's name or a YAML path whose block to time (default: "
                                         "the defaults, dropout 0.2)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    caps = torch.cpu.get_capabilities()
    native = {k: bool(caps.get(k)) for k in ("avx512_bf16", "amx_bf16")}
    print(f"CPU {caps.get('cpu_name')}: {native}; train.precision=auto picks "
          f"{resolve_precision('auto', torch.device('cpu'))}", flush=True)
    cfg = load_config(args.config, args.overrides)  # the block's config; the images are 28x28 whatever it names
    spec = model_spec(cfg, image_shape=(1, 28, 28), num_classes=10)
    rows = []
    for batch in args.batches:
        for mode in MODES:
            dt = step_seconds(spec, batch, mode, args.steps)
            print(f"batch {batch} {mode:8s} {dt * 1e3:6.1f} ms/step {batch / dt:6.0f} samples/s", flush=True)
            rows.append({"batch": batch, "mode": mode, "ms_per_step": dt * 1e3, "samples_per_second": batch / dt})
    print(write_result(args.name, {"date": datetime.date.today().isoformat(), "steps": args.steps,
                                   "cpu": caps.get("cpu_name"), "native_bf16": native, "config": args.config,
                                   "set": args.overrides, "block": spec.block, "dropout": spec.dropout,
                                   "rows": rows}))


if __name__ == "__main__":
    main()

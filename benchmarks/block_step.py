"""One DT block's training step at 1 torch thread: fp32 against bf16 autocast, NCHW against channels_last,
batch 128 and 256 (Fashion-MNIST's 28x28 shape), side by side in one process. Prints ms per step and
samples/s and writes benchmarks/results/block_step.json. ``python benchmarks/block_step.py``"""
from __future__ import annotations

import datetime
import time

import torch
import torch.nn.functional as F
from common import write_result

from noprop_dist.config import Config
from noprop_dist.core.blocks import DTBlock, ModelSpec
from noprop_dist.training import model_spec

MODES = ("fp32", "bf16", "fp32_cl", "bf16_cl")  # _cl: weights and images channels_last
STEPS = 10


def step_seconds(spec: ModelSpec, batch: int, mode: str) -> float:
    """Mean seconds of one AdamW step of a fresh block on random (B, 1, 28, 28) images, after 3 warm-up steps."""
    torch.manual_seed(0)
    block = DTBlock(spec)
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
    for _ in range(STEPS):
        step()
    return (time.perf_counter() - start) / STEPS


def main() -> None:
    torch.set_num_threads(1)
    spec = model_spec(Config(), image_shape=(1, 28, 28), num_classes=10)  # the default block: learned d = 20
    rows = []
    for batch in (128, 256):
        for mode in MODES:
            dt = step_seconds(spec, batch, mode)
            print(f"batch {batch} {mode:8s} {dt * 1e3:6.1f} ms/step {batch / dt:6.0f} samples/s", flush=True)
            rows.append({"batch": batch, "mode": mode, "ms_per_step": dt * 1e3, "samples_per_second": batch / dt})
    print(write_result("block_step", {"date": datetime.date.today().isoformat(), "steps": STEPS, "rows": rows}))


if __name__ == "__main__":
    main()

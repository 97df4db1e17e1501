"""How fast the chain's evaluation runs on one CPU thread: a trained run's chain scored by ``count_stages`` (the
function the workers' evaluation calls) over the first test images of its dataset, with the stages.

Side by side in one process, the same chain and images:
- pool: the Fig. 6 max pool as shipped (``core.blocks.MaxPool``: a CPU NCHW batch pooled through channels-last)
  against ``nn.MaxPool2d`` (PyTorch's NCHW kernel, what the chain ran before);
- piece: the networks run on pieces of ``EVAL_PIECE_CPU`` images of each evaluation batch, or on the whole batch;
- layout: NCHW activations (shipped) or channels-last ones, the training loop's layout;
- images: the test images, or as many images of uniform noise.
Every NCHW case must give the same counts on the same images, stage by stage (the script exits non-zero where
one differs); the channels-last case says whether its counts are the same. The chain's GFLOP/s beside each
figure says how close a core runs to its compute peak.

    python -m noprop_dist.run --config fashion_mnist --set data.train_limit=30000 --set train.epochs=1 \
        --set run.dir=runs/fm_1x30k
    python benchmarks/eval_speed.py runs/fm_1x30k [--images 2000] [--repeats 3]

A trained chain, not a fresh one: NCHW max pooling on the CPU branches on every comparison, so its speed
depends on the activations it pools (a fresh chain's on real images pool about as fast in either layout).
Writes benchmarks/results/eval_speed.json.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common import write_result

from noprop_dist.config import load_config
from noprop_dist.core import blocks as core_blocks
from noprop_dist.core import StageCounts, count_stages, scoring
from noprop_dist.data import load_dataset
from noprop_dist.evaluate import load_chain

EVAL_PIECE = scoring.EVAL_PIECE_CPU  # as shipped


def nchw_pools(chain: nn.Module) -> nn.Module:
    """The chain with every Fig. 6 MaxPool replaced by nn.MaxPool2d of the same settings, in place."""
    for module in list(chain.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, core_blocks.MaxPool):
                setattr(module, name, nn.MaxPool2d(child.kernel_size, child.stride, child.padding))
    return chain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a finished run's directory (the command above makes one)")
    p.add_argument("--images", type=int, default=2000, help="test images scored per case")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per case; the fastest is reported")
    args = p.parse_args()
    torch.set_num_threads(1)  # a worker's evaluation runs on its one CPU

    trained = load_chain(args.run_dir)
    cfg = load_config(os.path.join(args.run_dir, "config.yaml"), [])
    ds = load_dataset(cfg.data.name, cfg.data.root, test_limit=args.images)
    x, y = torch.from_numpy(ds.test_x), torch.from_numpy(ds.test_y)
    noise = torch.randint(0, 256, x.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    flops = _flops_per_image(trained, x[:EVAL_PIECE], cfg.eval.sampler)
    print(f"{cfg.data.name}: {len(y)} test images, {trained.spec.num_shards} blocks, {cfg.eval.sampler}; "
          f"{flops / 1e9:.3f} GFLOP per image", flush=True)

    # (images, pool, piece, layout): as shipped; each of its choices undone in turn; channels-last activations
    # (the training loop's layout), where oneDNN sums in another order, so that the counts may differ; and the
    # pools on noise images, whose activations have no structure (NCHW pooling branches on every comparison).
    runs = [("test", "MaxPool", EVAL_PIECE, "NCHW"), ("test", "MaxPool", cfg.eval.batch_size, "NCHW"),
            ("test", "nn.MaxPool2d", EVAL_PIECE, "NCHW"), ("test", "nn.MaxPool2d", cfg.eval.batch_size, "NCHW"),
            ("test", "MaxPool", EVAL_PIECE, "channels_last"),
            ("noise", "MaxPool", EVAL_PIECE, "NCHW"), ("noise", "nn.MaxPool2d", EVAL_PIECE, "NCHW")]
    cases, reference = {}, {}
    for images, pool, piece, layout in runs:
        chain = copy.deepcopy(trained.chain)
        if pool == "nn.MaxPool2d":
            nchw_pools(chain)
        if layout == "channels_last":
            chain = chain.to(memory_format=torch.channels_last)
        seconds, counts = _time_counts(chain, noise if images == "noise" else x, y, cfg, trained.normalize,
                                       piece, layout == "channels_last", args.repeats)
        figures = (counts.n, counts.correct, counts.table())
        same = reference.setdefault(images, figures) == figures
        key = f"images={images} pool={pool} piece={piece} layout={layout}"
        cases[key] = {"seconds": seconds, "images_per_s": len(y) / seconds,
                      "block_images_per_s": len(y) * trained.spec.num_shards / seconds,
                      "gflop_per_s": flops * len(y) / seconds / 1e9, "accuracy": counts.accuracy(),
                      "same_counts": same}
        print(f"{key:62s} {len(y) / seconds:5.0f} images/s {flops * len(y) / seconds / 1e9:5.0f} GFLOP/s  "
              f"accuracy {counts.accuracy():.4f}  same counts: {same}", flush=True)
    # The run directory's path is this machine's: its name only.
    shown = vars(args) | {"run_dir": os.path.basename(os.path.normpath(args.run_dir))}
    path = write_result("eval_speed", {"args": shown, "dataset": cfg.data.name, "images": len(y),
                                       "blocks": trained.spec.num_shards, "sampler": cfg.eval.sampler,
                                       "eval_batch_size": cfg.eval.batch_size, "gflop_per_image": flops / 1e9,
                                       "cases": cases})
    print(f"wrote {path}")
    if not all(c["same_counts"] for key, c in cases.items() if key.endswith("NCHW")):
        sys.exit("the NCHW cases' counts differ: the shipped evaluation's figures would change")


def _flops_per_image(trained, x: torch.Tensor, sampler: str) -> float:
    """Floating-point operations of the chain's forward pass per image (torch's FlopCounterMode: 2 per
    multiply-add of the convolutions and matrix products)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        trained.chain.eval()
        trained.chain(trained.normalize(x), torch.Generator().manual_seed(0), sampler=sampler)
    return counter.get_total_flops() / x.shape[0]


def _time_counts(chain: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, normalize, piece: int,
                 channels_last: bool, repeats: int) -> tuple[float, StageCounts]:
    """The fastest of ``repeats`` passes of count_stages over uint8 ``x`` (N, C, H, W), the networks run on
    pieces of ``piece`` images; and its counts."""
    def norm(b: torch.Tensor) -> torch.Tensor:
        b = normalize(b)
        return b.contiguous(memory_format=torch.channels_last) if channels_last else b

    scoring.EVAL_PIECE_CPU = piece
    try:
        seconds = []
        for _ in range(repeats):
            t = time.perf_counter()
            counts, _ = count_stages(chain, x, y, cfg.eval.batch_size, cfg.eval.seed, norm, "cpu",
                                     sampler=cfg.eval.sampler)
            seconds.append(time.perf_counter() - t)
    finally:
        scoring.EVAL_PIECE_CPU = EVAL_PIECE
    return min(seconds), counts


if __name__ == "__main__":
    main()

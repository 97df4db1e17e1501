"""Why the backprop and adjoint baselines start slowly: the same steps for the model and diagnostic variants.

    python benchmarks/baseline_start.py --method backprop --steps 60 --every 20
    python benchmarks/baseline_start.py --method adjoint --dataset digits --steps 240 --every 60 \
        --embedding one_hot --set model.inference_steps=20

One torch thread, batch 128, the method's config for the dataset (Table 3's optimiser and learning rate),
the same seed and batches for every variant. Backprop (Fashion-MNIST by default, the first --train-limit
training images):

- ``chain``: the backprop baseline exactly as ``model.method=backprop`` trains it (head widened by
  ``baselines.head.widen_head``).
- ``chain, default head``: the same with PyTorch's default Linear init for the head (the widening undone),
  as the baseline was built before. The chain's output z_T is a convex mixture of class embeddings (norm
  about 1), so the head's logits can span no more than its weights allow; the default init (|w| <= 1/sqrt(d))
  keeps them within about +-1, and AdamW at 1e-3 widens them by about 1e-3 per step. If this variant learns
  much more slowly, that bound is what slows the chain, not a gradient that fails to arrive.
- ``block T alone``: the chain's last block trained as a plain classifier, cross-entropy on its own
  logits (z_0 noise as its z input): what the same convolutional network learns in the same steps.

Adjoint: ``model`` (as ``model.method=adjoint`` trains it), ``default head`` (as above: its z_1 is also a
convex mixture of embeddings plus leftover noise), ``rate 1`` (the initial rate r of dz/dt = r (u_hat - z) at 1,
which lets e^-1 of z_0's noise reach z_1, instead of ``adjoint.initial_rate``, which leaves 2^-10 as the backprop
chain's a_t = 0.5 does after 10 blocks), and both, which is the model as it was built before.

Writes benchmarks/results/baseline_start_<method>.json.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from common import write_result
from torch import nn

from noprop_dist.baselines.learner import GradientLearner, accuracy, build_learner
from noprop_dist.config import CONFIG_DIR, load_config
from noprop_dist.data import load_dataset
from noprop_dist.paper.harness import config_path

VARIANTS = {"backprop": ("chain", "chain, default head", "block T alone"),
            "adjoint": ("model", "default head", "rate 1", "rate 1, default head")}


class LastBlockAlone(nn.Module):
    """Block T of a BackpropChain as a classifier: logits = block_T(z_0, x). Same call as the chain."""

    def __init__(self, chain: nn.Module) -> None:
        super().__init__()
        self.block = chain.blocks[-1]
        self.embed_dim = chain.embed_dim

    def forward(self, x: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        return self.block(z0, x)


def make_learner(variant: str, cfg, dataset) -> GradientLearner:
    learner = build_learner(cfg, dataset, torch.device("cpu"))
    with torch.no_grad():
        if "default head" in variant:  # undo baselines.head.widen_head
            learner.module.shared.head.weight.div_(learner.module.head_gain)
        if "rate 1" in variant:
            learner.module.log_rate.fill_(0.0)
    if variant == "block T alone":
        module = LastBlockAlone(learner.module)
        optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        learner = GradientLearner(module, module, optimizer, dataset.mean, dataset.std, torch.device("cpu"))
    return learner


def run_variant(variant: str, cfg, dataset, steps: int, every: int) -> list[dict]:
    """Train ``steps`` batches (the same ones for every variant); test accuracy every ``every`` steps."""
    torch.manual_seed(cfg.train.seed)
    learner = make_learner(variant, cfg, dataset)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    points, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        idx = rng.choice(len(dataset.train_y), cfg.train.batch_size, replace=False)
        loss = learner.train_step(torch.from_numpy(dataset.train_x[idx]), torch.from_numpy(dataset.train_y[idx]), gen)
        if step % every == 0 or step == steps:
            acc = accuracy(learner, dataset.test_x, dataset.test_y, 256, cfg.eval.seed)
            points.append({"step": step, "loss": loss, "test_accuracy": acc,
                           "seconds": time.perf_counter() - start})
            print(f"{variant:<22} step {step:>4}  loss {loss:.3f}  test {100 * acc:.2f}%", flush=True)
    return points


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=tuple(VARIANTS), default="backprop")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--train-limit", type=int, default=6000)
    p.add_argument("--test-limit", type=int, default=1000)
    p.add_argument("--embedding", default="learned", help="learned (d = 20), one_hot or prototype")
    p.add_argument("--variants", nargs="+", help=f"default: all of the method's: {VARIANTS}")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    variants = args.variants or list(VARIANTS[args.method])
    unknown = [v for v in variants if v not in VARIANTS[args.method]]
    if unknown:
        p.error(f"unknown variants for {args.method}: {unknown}; allowed: {VARIANTS[args.method]}")
    torch.set_num_threads(1)
    dim = ["model.embedding_dim=10"] if args.embedding == "one_hot" else []
    config_dataset = "mnist" if args.dataset == "digits" else args.dataset  # digits has no baseline configs
    cfg = load_config(config_path(args.method, config_dataset, CONFIG_DIR),
                      [f"data.name={args.dataset}", f"model.embedding={args.embedding}", *dim, *args.overrides])
    limits = {} if args.dataset == "digits" else {"train_limit": args.train_limit, "test_limit": args.test_limit}
    dataset = load_dataset(args.dataset, cfg.data.root, **limits)
    results = {v: run_variant(v, cfg, dataset, args.steps, args.every) for v in variants}
    print(f"\n{'variant':<22} " + " ".join(f"{'step ' + str(pt['step']):>9}" for pt in next(iter(results.values()))))
    for v, pts in results.items():
        print(f"{v:<22} " + " ".join(f"{100 * pt['test_accuracy']:>8.2f}%" for pt in pts))
    print("written:", write_result(f"baseline_start_{args.method}", {"args": vars(args), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

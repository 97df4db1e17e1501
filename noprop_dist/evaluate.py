"""Evaluate or use a saved chain without Ray: ``python -m noprop_dist.evaluate RUN_DIR [--predict FILE.npy]``.

Prints the test accuracy of ``RUN_DIR/chain.pt`` on the dataset it was trained on (same noise seed and
batch size as at the end of training, hence the same predictions), or writes predicted classes for
the uint8 images (N, C, H, W) in a ``.npy`` file. NoProp-CT / FM chains take ``--steps N`` (and CT
``--sampler chain|ode``) to measure accuracy against the number of inference steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import torch

from .config import CT_INFERENCE
from .core import evaluate_chain, variants
from .data import DatasetNotFoundError, load_dataset, normalize


def load_chain(run_dir: str, steps: int | None = None, sampler: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The run's chain and its extra info; steps / sampler override a CT / FM chain's inference settings."""
    path = os.path.join(run_dir, "chain.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no chain.pt in {run_dir}: has the run finished?")
    chain, extra = variants.load_chain(path)
    if steps is None and sampler is None:
        return chain, extra
    method = chain.spec.method
    if method == "noprop_dt" or (sampler is not None and method != "noprop_ct"):
        raise ValueError(f"--steps applies to noprop_ct / noprop_fm chains and --sampler to noprop_ct; "
                         f"{path} is {method}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if sampler is not None and sampler not in CT_INFERENCE:
        raise ValueError(f"--sampler {sampler!r} is not allowed; allowed: {', '.join(CT_INFERENCE)}")
    chain.spec = dataclasses.replace(chain.spec, inference_steps=steps or chain.spec.inference_steps,
                                     ct_inference=sampler or chain.spec.ct_inference)
    return chain, extra


def evaluate_run(run_dir: str, seed: int | None = None, steps: int | None = None,
                 sampler: str | None = None) -> float:
    """Test accuracy of the run's saved chain, measured again from scratch.

    seed: the noise seed of z_0 and the chain's steps; None = the one saved with the run (the same
    predictions as at the end of training). Other seeds give the spread over inference runs.
    steps / sampler: CT / FM inference settings (None: those the run was trained with).
    """
    chain, extra = load_chain(run_dir, steps, sampler)
    data = load_dataset(extra["dataset"], extra["data_root"], test_limit=extra["test_limit"])
    acc, _ = evaluate_chain(
        chain, torch.from_numpy(np.ascontiguousarray(data.test_x)), torch.from_numpy(data.test_y),
        extra["eval_batch_size"], extra["eval_seed"] if seed is None else seed,
        lambda xb: normalize(xb, extra["mean"], extra["std"]),
    )
    return acc


def predict(run_dir: str, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Predicted classes (N,) for uint8 images (N, C, H, W)."""
    chain, extra = load_chain(run_dir)
    x = normalize(torch.from_numpy(np.ascontiguousarray(images)), extra["mean"], extra["std"])
    return chain.predict(x, torch.Generator().manual_seed(seed)).numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m noprop_dist.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--predict", metavar="IMAGES.npy", help="write predictions for these images instead")
    p.add_argument("--out", default="predictions.npy", help="where --predict writes (default: %(default)s)")
    p.add_argument("--steps", type=int, help="CT / FM: inference steps (default: model.inference_steps of the run)")
    p.add_argument("--sampler", help="CT: chain or ode (default: model.ct_inference of the run)")
    p.add_argument("--seed", type=int, help="noise seed of the inference (default: the run's eval.seed)")
    args = p.parse_args(argv)
    try:
        if args.predict:
            preds = predict(args.run_dir, np.load(args.predict))
            np.save(args.out, preds)
            print(f"{len(preds)} predictions written to {args.out}")
        else:
            acc = evaluate_run(args.run_dir, args.seed, args.steps, args.sampler)
            print(json.dumps({"run_dir": args.run_dir, "test_accuracy": acc, "steps": args.steps,
                              "sampler": args.sampler, "seed": args.seed}))
    except (FileNotFoundError, DatasetNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

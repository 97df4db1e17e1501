"""Evaluate or use a saved chain without Ray: ``python -m noprop_dist.evaluate RUN_DIR [--predict FILE.npy]``.

Prints the test accuracy of ``RUN_DIR/chain.pt`` on the dataset it was trained on (same noise seed and
batch size as at the end of training, hence the same predictions), or writes predicted classes for
the uint8 images (N, C, H, W) in a ``.npy`` file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from .core import DTChain, evaluate_chain
from .data import DatasetNotFoundError, load_dataset, normalize


def load_chain(run_dir: str) -> tuple[DTChain, dict]:
    path = os.path.join(run_dir, "chain.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no chain.pt in {run_dir}: has the run finished?")
    return DTChain.load(path)


def evaluate_run(run_dir: str, seed: int | None = None) -> float:
    """Test accuracy of the run's saved chain, measured again from scratch.

    seed: the noise seed of z_0 and the chain's steps; None = the one saved with the run (the same
    predictions as at the end of training). Other seeds give the spread over inference runs.
    """
    chain, extra = load_chain(run_dir)
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
    args = p.parse_args(argv)
    try:
        if args.predict:
            preds = predict(args.run_dir, np.load(args.predict))
            np.save(args.out, preds)
            print(f"{len(preds)} predictions written to {args.out}")
        else:
            acc = evaluate_run(args.run_dir)
            print(json.dumps({"run_dir": args.run_dir, "test_accuracy": acc}))
    except (FileNotFoundError, DatasetNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

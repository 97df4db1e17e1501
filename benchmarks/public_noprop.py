"""The best public NoProp-DT code, run on this machine for a side-by-side time to accuracy.

    git clone https://github.com/eoghanf/NoProp /tmp/eoghanf-noprop        # e05bbb3 was measured
    python benchmarks/public_noprop.py --repo /tmp/eoghanf-noprop --epochs 1 --name public_noprop_fashion

That code (its ``train_mnist.py`` with ``experiment_configs/mnistdiffusion.yaml``: T = 10 blocks, batch 128,
Adam 1e-3, one process) trains MNIST; here it reads Fashion-MNIST instead (torchvision's FashionMNIST reads the
same IDX files, written from this project's loader into a temporary directory), with no data-loader worker
processes (one process, its torch threads on every core), as it was measured when the targets were set.
Nothing of it is copied here: it runs from the checkout given.

Its per-batch log (``training_logs/*_metrics.csv``) gives the training time of each epoch, from its first
batch's start to its last batch's end, so its own evaluation between epochs is left out as ours is. Writes
benchmarks/results/<name>.json with a ``curve`` like a run's summary; ``time_to_accuracy.py --reference`` shows
it beside our runs.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import glob
import os
import subprocess
import sys
import tempfile

import numpy as np
import yaml
from common import write_result

from noprop_dist.data import load_dataset

# Run inside the checkout: its MNIST script, with torchvision's MNIST class swapped for FashionMNIST.
BOOTSTRAP = """
import runpy, sys
import torchvision.datasets as datasets
datasets.MNIST = datasets.FashionMNIST
sys.argv = ["train_mnist.py", "--config", sys.argv[1], "--epochs", sys.argv[2]]
runpy.run_path("train_mnist.py", run_name="__main__")
"""


def write_idx(path: str, array: np.ndarray) -> None:
    """An uncompressed IDX file of uint8 values (magic 0x08 = unsigned byte, then the dimension count)."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]))
        f.write(np.asarray(array.shape, dtype=">u4").tobytes())
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def fashion_idx_dir(root: str) -> str:
    """``root``/FashionMNIST/raw with the four IDX files torchvision's FashionMNIST looks for; returns root."""
    ds = load_dataset("fashion_mnist")
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for split, x, y in (("train", ds.train_x, ds.train_y), ("t10k", ds.test_x, ds.test_y)):
        write_idx(os.path.join(raw, f"{split}-images-idx3-ubyte"), x.reshape(x.shape[0], *x.shape[2:]))
        write_idx(os.path.join(raw, f"{split}-labels-idx1-ubyte"), y.astype(np.uint8))
    return root


def epoch_curve(metrics_csv: str) -> list[dict]:
    """Per epoch: {"epoch", "train_seconds" (cumulative, batches only), "test_accuracy"} from its metrics log,
    whose batch rows carry wall_time_seconds and batch_time_seconds and whose row with batch -1 closes an
    epoch with its validation accuracy (%)."""
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    curve, spent = [], 0.0
    for epoch in sorted({int(r["epoch"]) for r in rows if int(r["epoch"]) > 0}):
        batches = [r for r in rows if int(r["epoch"]) == epoch and r["batch"] != "-1"]
        closing = [r for r in rows if int(r["epoch"]) == epoch and r["batch"] == "-1"]
        if not batches or not closing:
            continue
        start = float(batches[0]["wall_time_seconds"]) - float(batches[0]["batch_time_seconds"])
        spent += float(batches[-1]["wall_time_seconds"]) - start
        curve.append({"epoch": epoch, "train_seconds": spent,
                      "test_accuracy": float(closing[-1]["val_accuracy"]) / 100})
    return curve


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True, help="a checkout of github.com/eoghanf/NoProp")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--name", default="public_noprop_fashion", help="results file name")
    p.add_argument("--from-log", metavar="CSV", help="read the curve from this metrics log of an earlier run of it "
                                                     "instead of training again")
    args = p.parse_args()
    script = os.path.join(args.repo, "train_mnist.py")
    base_config = os.path.join(args.repo, "experiment_configs", "mnistdiffusion.yaml")
    if not (os.path.isfile(script) and os.path.isfile(base_config)):
        p.error(f"--repo {args.repo}: no train_mnist.py and experiment_configs/mnistdiffusion.yaml there")
    commit = subprocess.run(["git", "-C", args.repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    metrics = args.from_log or train(args, base_config, commit)
    if metrics is None:
        return 2
    curve = epoch_curve(metrics)
    for point in curve:
        print(f"epoch {point['epoch']}: test accuracy {100 * point['test_accuracy']:.2f} % after "
              f"{point['train_seconds']:.1f} s of training")
    print(write_result(args.name, {
        "date": datetime.date.today().isoformat(), "method": "public_dt", "workers": 1,
        "label": f"public NoProp-DT (eoghanf/NoProp {commit[:7] or '?'}), 1 process", "repo": "github.com/eoghanf/NoProp",
        "commit": commit, "epochs": len(curve), "curve": curve,
    }))
    return 0


def train(args: argparse.Namespace, base_config: str, commit: str) -> str | None:
    """Run its training on Fashion-MNIST; returns the metrics log it wrote (None, with a message, if none)."""
    with tempfile.TemporaryDirectory() as tmp:
        with open(base_config, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        config.update(data_path=fashion_idx_dir(os.path.join(tmp, "data")), num_workers=0, epochs=args.epochs,
                      early_stopping=False, save_best=False, save_final=False)
        config_path = os.path.join(tmp, "fashion.yaml")
        with open(config_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f)
        before = set(glob.glob(os.path.join(args.repo, "training_logs", "*_metrics.csv")))
        print(f"public NoProp-DT ({commit[:7] or 'unknown commit'}): {args.epochs} epoch(s) on Fashion-MNIST", flush=True)
        done = subprocess.run([sys.executable, "-c", BOOTSTRAP, config_path, str(args.epochs)], cwd=args.repo)
        if done.returncode != 0:
            print(f"error: the public code exited with {done.returncode}", file=sys.stderr)
            return None
    new = sorted(set(glob.glob(os.path.join(args.repo, "training_logs", "*_metrics.csv"))) - before)
    if not new:
        print("error: the public code wrote no training_logs/*_metrics.csv", file=sys.stderr)
        return None
    return new[-1]


if __name__ == "__main__":
    sys.exit(main())

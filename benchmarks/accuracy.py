"""Fashion-MNIST test accuracy of NoProp-DT (T = 10, 2 workers) with learned (d = 20) and one-hot embeddings.

    python benchmarks/accuracy.py --epochs 1 --variants learned one_hot
"""
from __future__ import annotations

import argparse
import tempfile

from common import ray_run, write_result

from noprop_dist.config import load_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--variants", nargs="+", default=["learned", "one_hot"])
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            overrides = ["data.name=fashion_mnist", f"train.epochs={args.epochs}", f"model.embedding={variant}",
                         f"cluster.num_workers={args.workers}", f"run.dir={tmp}/{variant}"]
            if args.train_limit:
                overrides.append(f"data.train_limit={args.train_limit}")
            s = ray_run(load_config(None, overrides))
            results[variant] = {"test_accuracy": s["test_accuracy"], "train_seconds": s["train_seconds"],
                                "epochs": args.epochs, "peak_rss_mb": [w["peak_rss_mb"] for w in s["workers"]]}
            print(f"{variant:<10} epochs {args.epochs}: test accuracy {100 * s['test_accuracy']:.2f}% "
                  f"in {s['train_seconds'] / 60:.1f} min on {args.workers} workers", flush=True)
    print("written:", write_result(f"accuracy_e{args.epochs}", {"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()

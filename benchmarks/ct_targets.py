"""NoProp-CT and NoProp-FM against their targets (issue: CT / FM that learn like the paper), on Ray.

    python benchmarks/ct_targets.py --dataset digits --epochs 10
    python benchmarks/ct_targets.py --dataset fashion_mnist --train-limit 8000 --test-limit 2000 --epochs 10 \
        --dt-epochs 2

Trains, with the dataset's configs (noprop_dist/configs/<dataset>_ct.yaml, _fm.yaml and, for the wall-time comparison,
<dataset>.yaml for NoProp-DT, ``--dt-epochs`` epochs), K = ``--shards`` time-shards on 2 workers, the test
accuracy of the chain after every epoch (``curve``, with the training seconds at each point), and each CT / FM
chain re-evaluated with 10, 100 and 1000 inference steps.
``--paper`` adds CT and FM runs with ``--preset paper`` (the paper's loss weight, dropout, sampler) beside
them. digits and MNIST read the MNIST configs. Writes benchmarks/results/ct_targets_<dataset>.json and
prints one line per run: the curve, its largest drop after epoch 3, the steps a user needs for within
0.2 points of 1000.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from common import ray_run, write_result

from noprop_dist.config import CONFIG_DIR, load_config
from noprop_dist.evaluate import evaluate_run
from noprop_dist.registry import get_method

CONFIGS = CONFIG_DIR
STEPS = (10, 100, 1000)


def config_file(dataset: str, method: str) -> str:
    base = "mnist" if dataset in ("digits", "mnist") else dataset
    return os.path.join(CONFIGS, f"{base}{get_method(method).config_suffix}.yaml")


def largest_drop(curve: list[float], after: int = 3) -> float:
    """Largest fall of the test accuracy from one epoch to the next, from epoch ``after`` on (curve[0] is epoch 1;
    the fall from epoch 3 to 4 counts)."""
    return max([0.0] + [curve[i - 1] - curve[i] for i in range(after, len(curve))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--paper", action="store_true", help="also train CT and FM with --preset paper")
    ap.add_argument("--dt-epochs", type=int, default=0,
                    help="also train NoProp-DT (T = 10) for this many epochs, for the wall-time comparison")
    ap.add_argument("--set", action="append", default=[], help="more config overrides, key=value")
    args = ap.parse_args()
    common = [f"data.name={args.dataset}", "data.root=null", f"train.epochs={args.epochs}", "metrics.enabled=false",
              "eval.every_epochs=1", "cluster.num_workers=2", "cluster.threads_per_worker=1",
              *([f"data.train_limit={args.train_limit}"] if args.train_limit else []),
              *([f"data.test_limit={args.test_limit}"] if args.test_limit else [])]
    runs = [(m, None) for m in ("noprop_ct", "noprop_fm")]
    runs += [(m, "paper") for m in ("noprop_ct", "noprop_fm")] if args.paper else []
    runs += [("noprop_dt", None)] if args.dt_epochs else []
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, preset in runs:
            name = f"{method}{'_paper' if preset else ''}"
            steps = get_method(method).takes_steps  # CT and FM: K shards and the steps of their solve
            shards = ([f"model.num_shards={args.shards}", "model.inference_steps=1000"] if steps
                      else [f"train.epochs={args.dt_epochs}"])
            cfg = load_config(config_file(args.dataset, method), common + shards + [f"run.dir={tmp}/{name}", *args.set],
                              preset)
            s = ray_run(cfg)
            curve = [p["test_accuracy"] for p in s["curve"]]  # one point per epoch, the last one included
            row = {"test_accuracy": s["test_accuracy"], "sampler": s.get("sampler"),
                   "train_seconds": s["train_seconds"],
                   "curve": curve, "curve_seconds": [p["train_seconds"] for p in s["curve"]],
                   "largest_drop_after_epoch_3": largest_drop(curve)}
            if steps:
                row["steps"] = {n: (s["test_accuracy"] if n == 1000 else evaluate_run(f"{tmp}/{name}", steps=n))
                                for n in STEPS}
                within = [n for n in STEPS if row["steps"][n] >= row["steps"][1000] - 0.002]
                row["steps_within_0.2_points_of_1000"] = within[0]
            rows[name] = row
            print(f"{name:<16} {100 * s['test_accuracy']:.2f}% ({row['sampler']}) after {cfg.train.epochs} epochs, "
                  f"{s['train_seconds']:.0f}s training; curve " + " ".join(f"{100 * a:.1f}" for a in curve)
                  + f"; largest drop after epoch 3 {100 * row['largest_drop_after_epoch_3']:.2f} pt"
                  + ("" if not steps else "; by steps " + ", ".join(
                      f"{n}: {100 * a:.2f}%" for n, a in row["steps"].items())
                     + f"; {row['steps_within_0.2_points_of_1000']} steps are within 0.2 pt of 1000"), flush=True)
    print("written:", write_result(f"ct_targets_{args.dataset}", {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()

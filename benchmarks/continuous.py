"""NoProp-CT and NoProp-FM: accuracy, accuracy against inference steps, and time-shard scaling.

    python benchmarks/continuous.py accuracy --dataset fashion_mnist --epochs 1
    python benchmarks/continuous.py shards --dataset digits --epochs 20 --shards 1 2 4
    python benchmarks/continuous.py scaling --train-limit 3840 --epochs 2
    python benchmarks/continuous.py partitions --dataset fashion_mnist --train-limit 4000 --epochs 3 --shards 2 4

accuracy: CT and FM with one-hot and learned (d = 20) embeddings, K = 1 on one worker, test accuracy after
``--epochs`` with 10, 100 and 1000 inference steps (CT: Eq. 3 with its noise (eq3), without it (mean), and the
probability-flow ODE).
shards: test accuracy for K = 1, 2, 4 time-shards, everything else equal (one worker per shard at most).
scaling: epoch wall time of K = 1 on 1 worker and K = 2 on 1 and 2 workers, side by side.
partitions: test accuracy of every model.shard_partition (uniform, log_snr, equal_mass) for each K, CT and FM,
on min(K, 2) workers, everything else equal (the method's dataset config; ``--set`` for more overrides).
Each writes benchmarks/results/continuous_<mode>.json.
"""
from __future__ import annotations

import argparse
import tempfile

from common import ray_run, write_result

from noprop_dist.config import SHARD_PARTITIONS, load_config
from noprop_dist.core import load_chain_file
from noprop_dist.evaluate import evaluate_run
from noprop_dist.registry import get_method

STEPS = (10, 100, 1000)


def _base(args: argparse.Namespace) -> list[str]:
    out = [f"data.name={args.dataset}", f"train.epochs={args.epochs}", "model.eta=1", "metrics.enabled=false",
           "eval.every_epochs=0", "cluster.threads_per_worker=1"]
    if args.train_limit:
        out.append(f"data.train_limit={args.train_limit}")
    if args.test_limit:
        out.append(f"data.test_limit={args.test_limit}")
    return out + list(args.set)


def accuracy(args: argparse.Namespace, tmp: str) -> dict:
    rows = {}
    for method in ("noprop_ct", "noprop_fm"):
        for embedding in args.embeddings:
            name = f"{method}_{embedding}"
            run_dir = f"{tmp}/{name}"
            s = ray_run(load_config(None, _base(args) + [
                f"model.method={method}", "model.num_shards=1", "cluster.num_workers=1",
                f"model.embedding={embedding}", "model.inference_steps=1000", f"run.dir={run_dir}"]))
            row = {"train_seconds": s["train_seconds"], "epochs": args.epochs, "steps": {}}
            # The method's one-pass samplers (ensemble averages draws of them); FM has one, its Euler solve.
            one_pass = tuple(s for s in get_method(method).samplers if s != "ensemble")
            samplers = one_pass if len(one_pass) > 1 else (None,)
            for sampler in samplers:
                for steps in STEPS:
                    measured = s["test_accuracy_by_sampler"].get(sampler or "mean") if steps == 1000 else None
                    acc = measured if measured is not None else evaluate_run(run_dir, steps=steps, sampler=sampler)
                    row["steps"][f"{sampler or 'euler'}_{steps}"] = acc
            rows[name] = row
            print(f"{name:<22} {s['train_seconds'] / 60:.1f} min training; test accuracy by inference steps: "
                  + ", ".join(f"{k} {100 * v:.2f}%" for k, v in row["steps"].items()), flush=True)
    return rows


def shards(args: argparse.Namespace, tmp: str) -> dict:
    rows = {}
    for method in ("noprop_ct", "noprop_fm"):
        for k in args.shards:
            s = ray_run(load_config(None, _base(args) + [
                f"model.method={method}", f"model.num_shards={k}", f"cluster.num_workers={min(k, 2)}",
                "model.inference_steps=100", f"run.dir={tmp}/{method}_{k}"]))
            rows[f"{method}_K{k}"] = {"test_accuracy": s["test_accuracy"], "train_seconds": s["train_seconds"]}
            print(f"{method} K={k} on {min(k, 2)} worker(s): test accuracy {100 * s['test_accuracy']:.2f}% "
                  f"(100 steps), {s['train_seconds']:.1f}s training", flush=True)
    return rows


def partitions(args: argparse.Namespace, tmp: str) -> dict:
    rows = {}
    for method in ("noprop_ct", "noprop_fm"):
        for k in args.shards:
            for partition in SHARD_PARTITIONS:
                name = f"{method}_K{k}_{partition}"
                s = ray_run(load_config(None, _base(args) + [
                    f"model.method={method}", f"model.num_shards={k}", f"cluster.num_workers={min(k, 2)}",
                    f"model.shard_partition={partition}", "model.inference_steps=100", f"run.dir={tmp}/{name}"]))
                bounds = chain_bounds(f"{tmp}/{name}")
                rows[name] = {"test_accuracy": s["test_accuracy"], "train_seconds": s["train_seconds"],
                              "bounds": bounds}
                print(f"{method} K={k} {partition:<10} bounds {[round(b, 3) for b in bounds]}: test accuracy "
                      f"{100 * s['test_accuracy']:.2f}% (100 steps), {s['train_seconds']:.1f}s training", flush=True)
    return rows


def chain_bounds(run_dir: str) -> list[float]:
    """The partition boundaries of a finished run's chain (CT's follow its learned schedule)."""
    chain, _ = load_chain_file(f"{run_dir}/chain.pt")
    return chain.shard_bounds()


def scaling(args: argparse.Namespace, tmp: str) -> dict:
    rows = {}
    for k, workers in ((1, 1), (2, 1), (2, 2)):
        s = ray_run(load_config(None, _base(args) + [
            "model.method=noprop_ct", f"model.num_shards={k}", f"cluster.num_workers={workers}",
            "model.inference_steps=10", f"run.dir={tmp}/K{k}_W{workers}"]))
        rows[f"K{k}_W{workers}"] = {"epoch_seconds": s["epoch_seconds"],
                                    "samples_per_second": [b["samples_per_second"] for b in s["blocks"]]}
        print(f"K={k} W={workers}: epochs {['%.1f' % t for t in s['epoch_seconds']]} s", flush=True)
    last = {k: v["epoch_seconds"][-1] for k, v in rows.items()}
    ratios = {"K2_2_workers_vs_1": last["K2_W1"] / last["K2_W2"],
              "K2_on_2_workers_vs_K1_on_1": last["K2_W2"] / last["K1_W1"]}
    print(f"K = 2: 2 workers vs 1: {ratios['K2_2_workers_vs_1']:.2f}x faster; "
          f"K = 2 on 2 workers takes {ratios['K2_on_2_workers_vs_K1_on_1']:.2f}x the epoch time of K = 1 on 1")
    rows["ratios"] = ratios
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("accuracy", "shards", "scaling", "partitions"))
    p.add_argument("--dataset", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--set", action="append", default=[], help="more config overrides, key=value")
    p.add_argument("--embeddings", nargs="+", default=["one_hot", "learned"])
    p.add_argument("--shards", type=int, nargs="+", default=None)
    args = p.parse_args()
    defaults = {"accuracy": ("fashion_mnist", 1, None), "shards": ("digits", 20, None),
                "scaling": ("fashion_mnist", 2, 3840), "partitions": ("fashion_mnist", 3, 4000)}[args.mode]
    args.dataset = args.dataset or defaults[0]
    args.epochs = args.epochs or defaults[1]
    args.train_limit = args.train_limit or defaults[2]
    args.shards = args.shards or ([2, 4] if args.mode == "partitions" else [1, 2, 4])
    with tempfile.TemporaryDirectory() as tmp:
        rows = {"accuracy": accuracy, "shards": shards, "scaling": scaling, "partitions": partitions}[args.mode](args, tmp)
    print("written:", write_result(f"continuous_{args.mode}", {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()

"""NoProp-DT accuracy under a shared-state protocol: 1 and 2 workers, several seeds, Ray runs side by side.

Run it once with the code to test and once with the code to compare against (``--label`` tags the result
file), on the same grid; the spread over seeds is the noise a protocol change must stay within.

    python benchmarks/protocol_accuracy.py --label new --dataset digits --epochs 20 --seeds 0 1 2
    python benchmarks/protocol_accuracy.py --label new --dataset fashion_mnist --epochs 3 \
        --train-limit 10000 --test-limit 2000 --seeds 0 1
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

from common import ray_run, write_result

from noprop_dist.config import load_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True, help="tag of the result file, e.g. the protocol's name")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--set", nargs="*", default=[], help="extra KEY=VALUE overrides for every run")
    args = p.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            for seed in args.seeds:
                overrides = [f"data.name={args.dataset}", f"train.epochs={args.epochs}", f"train.seed={seed}",
                             f"cluster.num_workers={workers}", "cluster.cpus_per_worker=1",
                             f"run.dir={tmp}/w{workers}s{seed}", "eval.every_epochs=0", *args.set]
                if args.train_limit:
                    overrides.append(f"data.train_limit={args.train_limit}")
                if args.test_limit:
                    overrides.append(f"data.test_limit={args.test_limit}")
                s = ray_run(load_config(None, overrides))
                runs.append({"workers": workers, "seed": seed, "test_accuracy": s["test_accuracy"],
                             "train_seconds": s["train_seconds"], "shared_state_version": s["shared_state_version"],
                             "sync_fraction_of_step_time": s["sync_fraction_of_step_time"]})
                print(f"{args.label}: {workers} worker{'s' if workers > 1 else ''}, seed {seed}: test accuracy "
                      f"{100 * s['test_accuracy']:.2f} % in {s['train_seconds']:.0f} s, sync "
                      f"{100 * s['sync_fraction_of_step_time']:.1f} % of step time", flush=True)
    for workers in args.workers:
        accs = [100 * r["test_accuracy"] for r in runs if r["workers"] == workers]
        spread = f", spread {max(accs) - min(accs):.2f} pt, sd {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        print(f"{args.label}: {workers} worker{'s' if workers > 1 else ''}: mean {statistics.mean(accs):.2f} %{spread}")
    name = f"protocol_accuracy_{args.dataset}_{args.label}"
    print("written:", write_result(name, {"args": vars(args), "runs": runs}))


if __name__ == "__main__":
    main()

"""The fault matrix, measured: the same run clean and with a fault injected, side by side, per seed.

    python benchmarks/faults.py --seeds 0 1 2 --epochs 10 --blocks 4

Faults (see noprop_dist/distributed/faults.py): a worker SIGKILLed mid-epoch, the parameter server
SIGKILLed mid-epoch, NaN weights in one block. Reports test accuracy against the clean run of the
same seed, and the training time lost. Writes benchmarks/results/faults_e<epochs>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from common import ray_run, write_result

from noprop_dist.config import load_config
from noprop_dist.distributed.faults import ENV_VAR


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fault-epoch", type=int, default=3, help="epoch (1-based) the faults hit, at step 5")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--train-limit", type=int, default=None)
    args = p.parse_args()
    e = args.fault_epoch
    # clean_again: the same clean run once more. With 2+ workers the order in which their pushes reach the
    # server depends on timing, so even two clean runs of one seed differ: this is the noise floor.
    faults = {"clean": "", "clean_again": "", "worker_killed": f"kill:{args.workers - 1}@{e}.5", "server_killed": f"kill_ps:0@{e}.5",
              "nan_block": f"nan:0:1@{e}.5"}
    rows: dict[str, list[dict]] = {k: [] for k in faults}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, plan in faults.items():
                os.environ[ENV_VAR] = plan
                overrides = [f"data.name={args.dataset}", f"train.epochs={args.epochs}", f"train.seed={seed}",
                             f"model.num_blocks={args.blocks}", f"cluster.num_workers={args.workers}",
                             "metrics.enabled=false", f"run.dir={tmp}/{name}_{seed}"]
                if args.train_limit:
                    overrides.append(f"data.train_limit={args.train_limit}")
                s = ray_run(load_config(None, overrides))
                # The fault epoch's wall time over the median of the run's other epochs (not the first, which
                # starts the actors): the time a fault costs, measured inside one run, so shared load that
                # shifts whole runs cancels out.
                epochs = s["epoch_seconds"]
                others = sorted(t for i, t in enumerate(epochs) if i not in (0, e - 1))
                extra = epochs[e - 1] - others[len(others) // 2] if others else float("nan")
                rows[name].append({"seed": seed, "test_accuracy": s["test_accuracy"],
                                   "train_seconds": s["train_seconds"], "restarts": len(s["restarts"]),
                                   "epoch_seconds": epochs, "fault_epoch_extra_seconds": extra})
                clean = rows["clean"][-1]
                print(f"seed {seed} {name:<14} acc {100 * s['test_accuracy']:.2f}% "
                      f"(clean {100 * clean['test_accuracy']:.2f}%, diff {100 * (s['test_accuracy'] - clean['test_accuracy']):+.2f} pt) "
                      f"train {s['train_seconds']:.1f}s (clean {clean['train_seconds']:.1f}s, "
                      f"lost {s['train_seconds'] - clean['train_seconds']:+.1f}s; fault epoch {extra:+.1f}s "
                      f"over the run's median epoch)", flush=True)
    os.environ.pop(ENV_VAR, None)
    table = {}
    for name in faults:
        diffs = [100 * (r["test_accuracy"] - c["test_accuracy"]) for r, c in zip(rows[name], rows["clean"])]
        lost = [r["train_seconds"] - c["train_seconds"] for r, c in zip(rows[name], rows["clean"])]
        extra = [r["fault_epoch_extra_seconds"] for r in rows[name]]
        table[name] = {"mean_diff_pt": statistics.mean(diffs), "max_abs_diff_pt": max(map(abs, diffs)),
                       "mean_seconds_lost": statistics.mean(lost), "mean_fault_epoch_extra_s": statistics.mean(extra)}
        print(f"{name:<14} accuracy diff mean {table[name]['mean_diff_pt']:+.2f} pt, "
              f"max |diff| {table[name]['max_abs_diff_pt']:.2f} pt, train time vs clean run "
              f"{table[name]['mean_seconds_lost']:+.1f}s, fault epoch vs median epoch "
              f"{table[name]['mean_fault_epoch_extra_s']:+.1f}s")
    print("written:", write_result(f"faults_e{args.epochs}", {"args": vars(args), "runs": rows, "table": table}))


if __name__ == "__main__":
    main()

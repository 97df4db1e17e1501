"""Layer-parallel scaling: epoch wall time of T = 10 NoProp-DT blocks on Fashion-MNIST.

Side by side in one invocation: the in-process sequential reference, Ray with 1 worker and Ray with
2 workers, one torch thread per process. Each trains ``--epochs`` epochs over the first
``--train-limit`` training images; the last epoch (actors warm) is the steady-state figure, and the
full-epoch time is that scaled by 60000 / train-limit.

    python benchmarks/scaling.py --train-limit 3840 --epochs 2
"""
from __future__ import annotations

import argparse
import tempfile
import time

from common import ray_run, write_result

from noprop_dist.config import load_config
from noprop_dist.data import load_dataset
from noprop_dist.training import train_in_process

FULL_EPOCH = 60_000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-limit", type=int, default=3840)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    base = ["data.name=fashion_mnist", f"data.train_limit={args.train_limit}", "data.test_limit=2000",
            f"train.epochs={args.epochs}", "cluster.cpus_per_worker=1", "cluster.threads_per_worker=1"]
    scale = FULL_EPOCH / args.train_limit
    rows = {}

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, base + ["cluster.num_workers=1", f"run.dir={tmp}/inproc"])
        data = load_dataset("fashion_mnist", train_limit=args.train_limit, test_limit=2000)
        times: list[float] = []
        t0 = [time.perf_counter()]

        def on_epoch(epoch: int, group: object, server: object) -> None:
            times.append(time.perf_counter() - t0[0])
            t0[0] = time.perf_counter()

        _, _, group = train_in_process(cfg, data, on_epoch)
        rows["in_process"] = {"epoch_seconds": times, "sync_fraction": None, "peak_rss_mb": [None],
                              "samples_per_second": [st.samples_per_second for st in group.stats.values()]}
        print(f"in-process: epochs {['%.1f' % t for t in times]} s", flush=True)
        for workers in (1, 2):
            cfg = load_config(None, base + [f"cluster.num_workers={workers}", f"run.dir={tmp}/ray{workers}"])
            s = ray_run(cfg)
            rows[f"ray_{workers}_worker"] = {
                "epoch_seconds": s["epoch_seconds"], "sync_fraction": s["sync_fraction_of_step_time"],
                "peak_rss_mb": [w["peak_rss_mb"] for w in s["workers"]],
                "samples_per_second": [b["samples_per_second"] for b in s["blocks"]],
                "test_accuracy": s["test_accuracy"],
            }
            print(f"ray {workers} worker(s): epochs {['%.1f' % t for t in s['epoch_seconds']]} s, "
                  f"sync {100 * s['sync_fraction_of_step_time']:.2f}% of step time", flush=True)

    steady = {k: v["epoch_seconds"][-1] for k, v in rows.items()}
    print(f"\nFashion-MNIST, T = 10 blocks, {args.train_limit} images per epoch, steady-state (last) epoch:")
    print(f"{'run':<16}{'epoch s':>10}{'full epoch s (est.)':>22}{'block samples/s (mean)':>25}{'peak RSS MiB/worker':>22}")
    for k, v in rows.items():
        sps = sum(v["samples_per_second"]) / len(v["samples_per_second"])
        rss = "-" if v["peak_rss_mb"][0] is None else " / ".join(f"{r:.0f}" for r in v["peak_rss_mb"])
        print(f"{k:<16}{steady[k]:>10.1f}{steady[k] * scale:>22.0f}{sps:>25.0f}{rss:>22}")
    ratios = {
        "speedup_2_workers_vs_1": steady["ray_1_worker"] / steady["ray_2_worker"],
        "ray_1_worker_overhead_vs_in_process": steady["ray_1_worker"] / steady["in_process"] - 1,
        "sync_fraction_1_worker": rows["ray_1_worker"]["sync_fraction"],
        "sync_fraction_2_worker": rows["ray_2_worker"]["sync_fraction"],
    }
    print(f"\n2 workers vs 1 worker: {ratios['speedup_2_workers_vs_1']:.2f}x faster (target >= 1.8x)")
    print(f"1-worker Ray vs in-process: {100 * ratios['ray_1_worker_overhead_vs_in_process']:+.1f}% (target within 5%)")
    print(f"parameter-server sync, share of step time: {100 * ratios['sync_fraction_1_worker']:.2f}% (1 worker), "
          f"{100 * ratios['sync_fraction_2_worker']:.2f}% (2 workers) (target <= 5%)")
    print("written:", write_result("scaling", {"args": vars(args), "rows": rows, "ratios": ratios}))


if __name__ == "__main__":
    main()

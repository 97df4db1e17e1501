"""Step overhead: per-block throughput of the training loop against a plain-torch loop of the same blocks.

One worker process, one torch thread, digits by default: 8x8 images give the shortest block steps, the
regime of an accelerator, where a fixed cost per step shows. Side by side in one invocation:

- ``plain``: the same T blocks in a plain torch loop, no framework: per mini-batch and block, the block
  loss plus the shared CE, backward, the block's AdamW step and the shared-state AdamW step: the ceiling.
- ``in_process``: ``train_in_process``, the shard loop with its replica and an in-process server, no Ray.
- ``ray``: ``run_training`` with 1 worker of 1 thread: the worker actor, the parameter-server actor, the
  driver's progress polling and the Prometheus metrics, as a user runs it.

Each reports block-samples/s over the epochs after the first (warm-up); the framework's figures come with
their share of step time spent on the shared-state protocol. The three run in ``--rounds`` rounds, in a
rotating order; each framework run is compared with the plain loop of its round, and the table gives the
median and the range over rounds (single epochs vary by +-10 % on a shared machine).

    python benchmarks/step_overhead.py                    # digits, T = 10, 6 epochs per run, 3 rounds
    python benchmarks/step_overhead.py --sync-every 4 --epochs 8
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from common import epoch_batches, plain_loop, ray_run, write_result

from noprop_dist.config import Config, load_config
from noprop_dist.data import ImageDataset, load_dataset
from noprop_dist.training import ShardGroup, train_in_process


def in_process(cfg: Config, data: ImageDataset) -> tuple[list[float], float]:
    """(epoch seconds, sync share of step time) of the in-process reference run."""
    seconds: list[float] = []
    t0 = [time.perf_counter()]

    def on_epoch(epoch: int, group: ShardGroup, server: object) -> None:
        seconds.append(time.perf_counter() - t0[0])
        t0[0] = time.perf_counter()

    _, _, group = train_in_process(cfg, data, on_epoch, device="cpu")
    step = sum(s.compute_seconds + s.sync_seconds for s in group.stats.values())
    return seconds, sum(s.sync_seconds for s in group.stats.values()) / step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--sync-every", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="rounds of plain, in-process, Ray, in rotating order")
    args = p.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        sets = [f"data.name={args.data}", f"model.num_blocks={args.blocks}", f"train.epochs={args.epochs}",
                f"train.sync_every={args.sync_every}", "cluster.num_workers=1", "cluster.cpus_per_worker=1",
                "cluster.threads_per_worker=1", "eval.every_epochs=0"]
        if args.train_limit:
            sets.append(f"data.train_limit={args.train_limit}")
        cfg = load_config(None, sets)
        data = load_dataset(args.data, train_limit=args.train_limit)
        n = sum(len(b) for b in epoch_batches(cfg, len(data.train_y), 0))
        per_epoch = n * args.blocks  # block-samples in an epoch

        def rate(seconds: list[float]) -> float:
            return per_epoch / statistics.mean(seconds[1:])

        def run_plain() -> dict:
            return {"epoch_seconds": plain_loop(cfg, data, args.epochs)}

        def run_in_process() -> dict:
            seconds, sync = in_process(cfg, data)
            return {"epoch_seconds": seconds, "sync_share": sync}

        def run_ray() -> dict:
            s = ray_run(load_config(None, sets + [f"run.dir={tmp}/ray{len(rounds)}"]))  # a fresh run.dir each
            w = s["workers"][0]
            return {"epoch_seconds": s["epoch_seconds"], "sync_share": s["sync_fraction_of_step_time"],
                    "exchanges": w["exchanges"], "exchange_seconds": w["exchange_seconds"]}

        kinds = {"plain": run_plain, "in_process": run_in_process, "ray": run_ray}
        order = list(kinds)
        rounds: list[dict[str, dict]] = []
        for i in range(args.rounds):  # a rotating order: no run always follows the same one
            done: dict[str, dict] = {}
            for name in order[i % 3:] + order[:i % 3]:
                done[name] = kinds[name]()
                done[name]["block_samples_per_second"] = rate(done[name]["epoch_seconds"])
                print(f"round {i + 1} {name}: {done[name]['block_samples_per_second']:,.0f} block-samples/s", flush=True)
            for name in ("in_process", "ray"):  # against the plain loop of the same round
                done[name]["of_plain"] = done[name]["block_samples_per_second"] / done["plain"]["block_samples_per_second"]
            rounds.append(done)
    print(f"\n{args.data}, T = {args.blocks}, batch {cfg.train.batch_size}, sync_every {args.sync_every}, one thread; "
          f"epochs 2-{args.epochs}, {args.rounds} rounds (median; range over rounds):")
    print(f"{'run':<14}{'block-samples/s':>17}{'per block':>11}{'of plain':>20}{'sync share':>12}")
    summary: dict[str, dict] = {}
    for name in kinds:
        rates = [r[name]["block_samples_per_second"] for r in rounds]
        med = statistics.median(rates)
        row = {"block_samples_per_second": med}
        ratio = "1.00"
        if name != "plain":
            ratios = [r[name]["of_plain"] for r in rounds]
            row |= {"of_plain": statistics.median(ratios), "of_plain_range": [min(ratios), max(ratios)],
                    "sync_share": statistics.median(r[name]["sync_share"] for r in rounds)}
            ratio = f"{row['of_plain']:.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        share = f"{100 * row['sync_share']:.2f}%" if "sync_share" in row else "-"
        print(f"{name:<14}{med:>17,.0f}{med / args.blocks:>11,.0f}{ratio:>20}{share:>12}")
        summary[name] = row
    print("targets: ray >= 0.90 of plain, sync share <= 2 %")
    out = {"args": vars(args), "summary": summary, "rounds": rounds}
    print("written:", write_result(f"step_overhead_{args.data}_sync{args.sync_every}", out))


if __name__ == "__main__":
    main()

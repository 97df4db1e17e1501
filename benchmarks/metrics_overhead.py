"""Cost of the Prometheus metrics: steps/s of one block with metrics on vs off, in the same worker process.

One Ray actor (1 CPU, 1 torch thread) trains one NoProp-DT block through the real worker code
(ShardGroup and its replica, RayClient to a ParameterServer actor). Segments of a few epochs alternate between metrics
on (a WorkerTelemetry recording every step, push and pull, its once-a-second thread, and a server that
times every push) and metrics off (neither), in the order on-off-off-on so that a slow drift of the
machine weighs on both alike. Digits by default: its steps are the shortest (8x8 images), so the fixed
cost per step weighs most there.

    python benchmarks/metrics_overhead.py                 # digits, 10 rounds
    python benchmarks/metrics_overhead.py --data fashion_mnist --train-limit 2560 --rounds 4
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import ray
import torch
from common import write_result

from noprop_dist.config import TrainConfig, load_config
from noprop_dist.core import ModelSpec
from noprop_dist.data import load_dataset
from noprop_dist.distributed.cluster import connect
from noprop_dist.distributed.param_server import ParameterServer
from noprop_dist.distributed.telemetry import WorkerTelemetry
from noprop_dist.distributed.worker import RayClient
from noprop_dist.training import ShardGroup, model_spec

BLOCK = 1


@ray.remote(num_cpus=1)
class Bench:
    """One block's training loop, with the worker's telemetry attached for some segments only."""

    def __init__(self, spec: ModelSpec, train: TrainConfig, x, y, mean, std, servers: dict) -> None:
        torch.set_num_threads(1)
        self.servers, self.train = servers, train
        self.client = RayClient(servers[False], train.sync_mode)
        self.group = ShardGroup(spec, [BLOCK], train, x, y, mean, std, self.client)
        self.epoch = 0

    def segment(self, metrics: bool, epochs: int) -> tuple[int, float]:
        """Train ``epochs`` epochs; returns (block steps, seconds)."""
        # The two servers' states differ; their values do not change the cost of a step. Each epoch starts
        # with a fetch, which takes the state (and the incarnation) of the server switched to.
        self.client.server = self.servers[metrics]
        tel = (WorkerTelemetry("overhead", 0, self.group.stats, 10**6, torch.device("cpu"),
                               exchange=self.group.replica.stats) if metrics else None)
        self.client.on_push, self.client.on_pull = (tel.on_push, tel.on_pull) if tel else (None, None)
        steps0, t0 = self.group.stats[BLOCK].total_steps, time.perf_counter()
        for _ in range(epochs):
            self.group.train_epoch(self.epoch, tel.on_step if tel else None)
            self.epoch += 1
        if tel:
            tel.flush()
            tel.close()
        return self.group.stats[BLOCK].total_steps - steps0, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs-per-segment", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10, help="each round: on, off, off, on")
    args = p.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cfg = load_config(None, [f"data.name={args.data}", f"train.batch_size={args.batch_size}", "model.num_blocks=10"])
    data = load_dataset(args.data, train_limit=args.train_limit)
    spec = model_spec(cfg, data.image_shape, data.num_classes)
    started = connect(1, quiet=True, dashboard=False)  # the nodes export metrics either way; no Prometheus here
    try:
        t = cfg.train
        servers = {on: ParameterServer.remote(spec, t.seed, None, None, ["w0"], t.sync_mode,
                                              run_id="overhead" if on else None) for on in (True, False)}
        bench = Bench.remote(spec, t, ray.put(data.train_x), ray.put(data.train_y), data.mean, data.std, servers)
        ray.get(bench.segment.remote(False, 1))  # warm-up: first-call costs out of the figures
        rates: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for on in (True, False, False, True):
                steps, seconds = ray.get(bench.segment.remote(on, args.epochs_per_segment))
                rates[on].append(steps / seconds)
    finally:
        if started:
            ray.shutdown()
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    ratio = on / off
    steps = len(range(0, len(data.train_y), args.batch_size)) * args.epochs_per_segment
    print(f"{args.data}, 1 block, batch {args.batch_size}, {args.rounds * 2} segments of ~{steps} steps per mode")
    print(f"steps/s, median of segments: metrics on {on:.1f}, off {off:.1f}")
    print(f"ratio on/off: {ratio:.4f} (cost {100 * (1 - ratio):+.2f}%; target <= 2%)")
    print("written:", write_result("metrics_overhead", {
        "args": vars(args), "steps_per_second": {"on": rates[True], "off": rates[False]},
        "median_on": on, "median_off": off, "ratio": ratio}))


if __name__ == "__main__":
    main()

"""Parameter-server capacity: the block-step rate one server sustains, driven by synthetic workers.

N worker actors run the real protocol (``SharedReplica`` and ``RayClient`` against one ``ParameterServer``
actor) with real-sized shared state, but skip the block compute: between two exchanges a worker only
changes its replica (a stand-in for its shards' updates) and counts ``--steps-per-push`` block steps (its
shards times ``train.sync_every``). Each worker does the same number of exchanges; the rate is the
server's version (block steps applied) over the wall time. Also printed: the server process's CPU time per
exchange (its Ray threads included), from which the rate one server core sustains follows, and the
staleness the protocol gave (sync: exchanges behind; the other workers' block steps a refresh brought).

    python benchmarks/server_capacity.py                       # three states, N = 1 2 4, 20 steps per push
    python benchmarks/server_capacity.py --workers 2 4 --steps-per-push 5 20 --exchanges 400
"""
from __future__ import annotations

import argparse
import os
import time

import ray
import torch
from common import write_result

from noprop_dist.config import TrainConfig
from noprop_dist.core import ModelSpec, SharedState
from noprop_dist.distributed.cluster import connect
from noprop_dist.distributed.param_server import ParameterServer
from noprop_dist.distributed.worker import RayClient
from noprop_dist.training.shared_state import SharedReplica

# (name, image shape, classes, embedding, d): the shared states of Table 1's settings.
STATES = {
    "mnist_learned20": ((1, 28, 28), 10, "learned", 20),
    "cifar100_learned20": ((3, 32, 32), 100, "learned", 20),
    "cifar100_prototype": ((3, 32, 32), 100, "prototype", 3 * 32 * 32),
}


def spec_of(name: str) -> ModelSpec:
    shape, m, embedding, d = STATES[name]
    return ModelSpec(image_shape=shape, num_classes=m, num_shards=10, embedding=embedding, embed_dim=d,
                     dropout=0.0, class_prob="softmax", radial_sigma=0.1, eta=0.1, abar_max=0.999)


@ray.remote(num_cpus=0)
class SyntheticWorker:
    """A worker without blocks: its replica changes a little between exchanges, as its shards' steps would."""

    def __init__(self, rank: int, spec: ModelSpec, server: "ray.actor.ActorHandle", mode: str) -> None:
        torch.set_num_threads(1)
        self.client = RayClient(server, mode, rank=rank, log=lambda s: None)
        self.replica = SharedReplica(spec, TrainConfig(sync_mode=mode), self.client, torch.device("cpu"),
                                     log=lambda s: None)

    def run(self, exchanges: int, steps_per_push: int) -> dict:
        self.replica.begin_epoch()
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for j in range(1, exchanges + 1):
            with torch.no_grad():
                for p in self.replica.params.values():
                    p.add_(torch.randn(p.shape, generator=gen), alpha=1e-6)
            self.replica.exchange((0, j), steps_per_push, last=j == exchanges)
        st = self.replica.stats
        return {"seconds": time.perf_counter() - t0, "exchange_seconds": st.seconds, "max_lag": st.max_lag,
                "max_stale_exchanges": st.max_stale_exchanges, "polls": self.client.polls}


def measure(name: str, workers: int, steps_per_push: int, exchanges: int, mode: str) -> dict:
    spec = spec_of(name)
    sources = [f"w{w}" for w in range(workers)]
    server = ParameterServer.remote(spec, 0, None, None, sources, mode)
    actors = [SyntheticWorker.remote(w, spec, server, mode) for w in range(workers)]
    ray.get([a.run.remote(2, steps_per_push) for a in actors])  # warm up: imports, first calls
    server = ParameterServer.remote(spec, 0, None, None, sources, mode)
    actors = [SyntheticWorker.remote(w, spec, server, mode) for w in range(workers)]
    ray.get([a.__ray_ready__.remote() for a in actors])
    before = ray.get(server.identity.remote())
    t0 = time.perf_counter()
    runs = ray.get([a.run.remote(exchanges, steps_per_push) for a in actors])
    wall = time.perf_counter() - t0
    after = ray.get(server.identity.remote())
    pushes = after["pushes"] - before["pushes"]
    cpu = after["cpu_seconds"] - before["cpu_seconds"]
    for a in actors:
        ray.kill(a)
    ray.kill(server)
    state_floats = sum(p.numel() for p in SharedState(spec).parameters())
    return {
        "state": name, "floats": state_floats, "workers": workers, "steps_per_push": steps_per_push, "mode": mode,
        "block_steps_per_second": after["version"] / wall, "pushes_per_second": pushes / wall,
        "server_cpu_ms_per_exchange": 1e3 * cpu / pushes,
        "one_core_block_steps_per_second": pushes / cpu * steps_per_push if cpu > 0 else None,
        "worker_exchange_ms": 1e3 * sum(r["exchange_seconds"] for r in runs) / (workers * exchanges),
        "max_stale_exchanges": max(r["max_stale_exchanges"] for r in runs),
        "max_lag_block_steps": max(r["max_lag"] for r in runs), "polls": sum(r["polls"] for r in runs),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--states", nargs="+", default=list(STATES), choices=list(STATES))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps-per-push", type=int, nargs="+", default=[20])
    p.add_argument("--exchanges", type=int, default=300, help="per worker")
    p.add_argument("--mode", default="sync", choices=["sync", "async"])
    args = p.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    started = connect(max(args.workers), quiet=True, dashboard=False)
    rows = []
    try:
        print(f"{'state':<20}{'floats':>9}{'N':>4}{'steps/push':>11}{'block steps/s':>15}{'pushes/s':>10}"
              f"{'server ms/exch':>16}{'1-core steps/s':>16}{'worker ms/exch':>16}{'stale':>6}{'lag':>6}", flush=True)
        for name in args.states:
            for k in args.steps_per_push:
                for n in args.workers:
                    r = measure(name, n, k, args.exchanges, args.mode)
                    rows.append(r)
                    print(f"{name:<20}{r['floats']:>9,}{n:>4}{k:>11}{r['block_steps_per_second']:>15,.0f}"
                          f"{r['pushes_per_second']:>10,.0f}{r['server_cpu_ms_per_exchange']:>16.3f}"
                          f"{r['one_core_block_steps_per_second']:>16,.0f}{r['worker_exchange_ms']:>16.3f}"
                          f"{r['max_stale_exchanges']:>6}{r['max_lag_block_steps']:>6}", flush=True)
    finally:
        if started:
            ray.shutdown()
    print("targets: >= 20,000 block steps/s for the learned states, >= 2,000 for CIFAR-100 prototypes")
    print("written:", write_result(f"server_capacity_{args.mode}", {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()

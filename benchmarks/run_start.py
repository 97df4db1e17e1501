"""What a run costs beside its few steps: tiny runs (2 blocks, 2 workers, 300 digits, one epoch) one after the
other on one local Ray cluster, so that each run's time is its actors' start, its epoch, its final evaluation and
its files. The test suite is made of such runs.

    python benchmarks/run_start.py --label after --rounds 3
    python benchmarks/run_start.py --label ab --rounds 3 --pythonpath /path/to/an/older/checkout

With ``--pythonpath`` each round runs the installed code, then that checkout's (its driver and, through the
inherited environment, the Ray workers of the cluster it starts), side by side. Writes
benchmarks/results/run_start_<label>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import user_command, write_result

# One process per round and code: a local cluster, then RUNS tiny runs on it, each timed.
CHILD = """
import json, sys, tempfile, time
from noprop_dist.config import load_config
from noprop_dist.distributed.cluster import connect, disconnect
from noprop_dist.distributed.driver import run_training

started = connect(2, quiet=True)
seconds = []
for i in range({runs}):
    cfg = load_config(None, ["data.train_limit=300", "data.test_limit=120", "train.batch_size=64",
                             "model.num_blocks=2", "cluster.num_workers=2", "train.epochs=1",
                             "metrics.enabled=false", "run.dir=" + tempfile.mkdtemp()])
    t0 = time.perf_counter()
    run_training(cfg, log=lambda s: None)
    seconds.append(time.perf_counter() - t0)
disconnect(started)
print("SECONDS " + json.dumps(seconds))
"""


def one_round(runs: int, pythonpath: str | None) -> list[float]:
    """The seconds of ``runs`` tiny runs on one fresh local cluster."""
    done, _ = user_command([sys.executable, "-c", CHILD.format(runs=runs)], tempfile.gettempdir(), pythonpath)
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("SECONDS "))
    return json.loads(line.removeprefix("SECONDS "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True, help="names the result file: run_start_<label>.json")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=3, help="tiny runs per round, on one cluster")
    p.add_argument("--pythonpath", help="an older checkout, run beside the installed code in every round")
    args = p.parse_args()
    codes = {"installed": None} | ({"pythonpath": args.pythonpath} if args.pythonpath else {})
    rows: dict[str, list[list[float]]] = {name: [] for name in codes}
    for r in range(args.rounds):
        for name, path in codes.items():
            rows[name].append(one_round(args.runs, path))
            print(f"round {r + 1} {name}: " + " ".join(f"{s:.2f}" for s in rows[name][-1]) + " s", flush=True)
    for name, rounds in rows.items():
        later = sorted(s for one in rounds for s in one[1:])
        print(f"{name}: first run of a round {min(one[0] for one in rounds):.2f}-{max(one[0] for one in rounds):.2f} s, "
              f"the others {later[0]:.2f}-{later[-1]:.2f} s (median {later[len(later) // 2]:.2f} s)")
    print(write_result(f"run_start_{args.label}", {"args": vars(args), "seconds": rows}))


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    main()

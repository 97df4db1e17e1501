"""What a run spends beside training: the whole command against its training time, and the workers' wait between
epochs (summary.json ``epoch_boundary_seconds``), on the Fashion-MNIST configs as a user runs them
(``python -m noprop_dist.run --config ...``, 2 workers for DT, the packaged 1 worker for CT and FM).

Cases (issue targets in brackets):
- ``dt_1x30k``: NoProp-DT, one epoch on 30,000 images [whole command <= 1.25x training];
- ``dt_2x15k``: two epochs on 15,000 images, the chain evaluated after the first [boundaries <= 2 % of training];
- ``ct_2x15k``, ``fm_2x15k``: the CT and FM configs, two epochs on 15,000 images [whole command <= 1.5x training];
- ``ct_20x15k``: the CT config, twenty epochs on 15,000 images, its evaluations (1,000 steps each) beside them;
- ``quickstart``: the default command (digits, 20 short epochs, each evaluated): where the boundaries weigh most.

    python benchmarks/epoch_overhead.py --label after
    python benchmarks/epoch_overhead.py --label before --pythonpath /path/to/an/older/checkout

``--pythonpath`` runs another checkout's code (its driver and, through the inherited environment, the Ray
workers of the local cluster it starts). Writes benchmarks/results/epoch_overhead_<label>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import user_command, write_result

CASES = {
    "dt_1x30k": ("fashion_mnist", ["data.train_limit=30000", "train.epochs=1"]),
    "dt_2x15k": ("fashion_mnist", ["data.train_limit=15000", "train.epochs=2", "eval.every_epochs=1"]),
    "ct_2x15k": ("fashion_mnist_ct", ["data.train_limit=15000", "train.epochs=2"]),
    "fm_2x15k": ("fashion_mnist_fm", ["data.train_limit=15000", "train.epochs=2"]),
    "ct_20x15k": ("fashion_mnist_ct", ["data.train_limit=15000", "train.epochs=20"]),
    "quickstart": ("quickstart", []),
}


def run_case(name: str, config: str, overrides: list[str], work: str, pythonpath: str | None) -> dict:
    """One whole command in a fresh directory: its wall time and what its summary.json says."""
    run_dir = os.path.join(work, name)
    cmd = [sys.executable, "-m", "noprop_dist.run", "--config", config,
           *[a for kv in [*overrides, f"run.dir={run_dir}"] for a in ("--set", kv)]]
    _, wall = user_command(cmd, work, pythonpath)
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        s = json.load(f)
    boundaries = s.get("epoch_boundary_seconds") or []
    shown = ["python", *cmd[1:-2]]  # without the interpreter's path and the temporary run.dir
    return {"command": " ".join(shown), "wall_seconds": wall, "train_seconds": s["train_seconds"],
            "wall_over_training": wall / s["train_seconds"], "epoch_seconds": s.get("epoch_seconds"),
            "epoch_boundary_seconds": boundaries,
            "boundaries_share_of_training": sum(boundaries) / s["train_seconds"],
            "test_accuracy": s["test_accuracy"], "train_accuracy": s.get("train_accuracy"),
            "test_accuracy_by_sampler": s.get("test_accuracy_by_sampler"), "curve": s.get("curve")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True, help="names the result file: epoch_overhead_<label>.json")
    p.add_argument("--pythonpath", help="a checkout whose noprop_dist to run instead of the installed one")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = p.parse_args()
    results = {}
    # Which code ran: the commit of the checkout given, else of this one (never a path of this machine).
    where = args.pythonpath or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or None
    with tempfile.TemporaryDirectory() as work:
        for name in args.cases:
            config, overrides = CASES[name]
            r = results[name] = run_case(name, config, overrides, work, args.pythonpath)
            print(f"{args.label} {name}: whole command {r['wall_seconds']:.1f} s, training {r['train_seconds']:.1f} s "
                  f"({r['wall_over_training']:.2f}x), boundaries {sum(r['epoch_boundary_seconds']):.2f} s "
                  f"({100 * r['boundaries_share_of_training']:.2f} % of training), test {r['test_accuracy']:.4f}",
                  flush=True)
            print(write_result(f"epoch_overhead_{args.label}", {"label": args.label, "code": code, "cases": results}))


if __name__ == "__main__":
    main()

"""Peak training memory per method (paper Table 2), one worker, one-hot embeddings, side by side.

    python benchmarks/memory.py --dataset fashion_mnist --train-limit 1280

Every method trains one epoch over the same images through the run entry point's code and reports its
summary's ``peak_memory_mb``: GPU memory (torch.cuda.max_memory_allocated) on a GPU, the training
process's peak RSS on a CPU. On a CPU the RSS includes about 565 MiB of torch and Ray themselves, so the
differences between methods matter more than the totals. Writes benchmarks/results/memory.json.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from common import write_result

from noprop_dist.storage.summary import read_summary

METHODS = ("noprop_dt", "noprop_ct", "noprop_fm", "backprop", "adjoint", "dtp")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--train-limit", type=int, default=1280)
    p.add_argument("--steps", type=int, default=100, help="CT/FM/adjoint solver steps (paper: 1000)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            over = [f"data.name={args.dataset}", f"data.train_limit={args.train_limit}", "data.test_limit=1000",
                    "train.epochs=1", f"model.method={method}", "model.embedding=one_hot", "cluster.num_workers=1",
                    f"model.inference_steps={args.steps}", "metrics.enabled=false", f"run.dir={tmp}/{method}"]
            # A process per run: peak RSS is a process's lifetime maximum (baselines train in that process).
            cmd = [sys.executable, "-m", "noprop_dist.run", *[a for kv in over for a in ("--set", kv)]]
            env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            s = read_summary(f"{tmp}/{method}")
            rows[method] = {"peak_memory_mb": s["peak_memory_mb"], "kind": s["peak_memory_kind"],
                            "train_seconds": s["train_seconds"]}
            print(f"{method:<10} peak {s['peak_memory_kind']} {s['peak_memory_mb']:.0f} MiB, "
                  f"{s['train_seconds']:.1f}s for {args.train_limit} images", flush=True)
    print("written:", write_result("memory", {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()

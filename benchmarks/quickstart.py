"""The quickstart as a new user runs it (``python -m noprop_dist.run``, no arguments, in a fresh directory):
its whole-command time, training time, test accuracy and output. Writes benchmarks/results/quickstart.json,
which the README's sample output and quickstart figures come from (tests/test_readme.py checks them).

    python benchmarks/quickstart.py
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile

from common import user_command, write_result

COMMAND = [sys.executable, "-m", "noprop_dist.run"]


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        done, wall = user_command(COMMAND, work, timeout=1800)
        run_dir = done.stdout.split("run saved in ")[1].split()[0]
        with open(os.path.join(work, run_dir, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    # The progress lines start with a clock time: keep the block lines of the last epoch and the closing lines.
    lines = [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "[hh:mm:ss] ", line) for line in done.stdout.splitlines()]
    payload = {
        "command": "python -m noprop_dist.run", "wall_seconds": wall, "train_seconds": summary["train_seconds"],
        "test_accuracy": summary["test_accuracy"], "train_accuracy": summary["train_accuracy"],
        "test_accuracy_by_sampler": summary.get("test_accuracy_by_sampler"), "sampler": summary.get("sampler"),
        "epochs": summary["epochs"], "epoch_seconds": summary["epoch_seconds"], "run_dir": run_dir,
        "output": lines,
    }
    print(f"whole command {wall:.1f} s, training {summary['train_seconds']:.1f} s, "
          f"test accuracy {summary['test_accuracy']:.4f}")
    print(write_result("quickstart", payload))


if __name__ == "__main__":
    main()

"""GPU check without Ray and without network: one run answers the open questions about the shard loop on a GPU.
Run by ``benchmarks/gpu_check.sh`` on a machine with one GPU and torch; the measurements are in
``benchmarks/gpu_check_parts.py``.

Parts, in order (``--parts`` picks some, by number or name), with each part's time cap on one H100 and the time
it is expected to take there (estimates from the CPU dry run and the step's kernel counts, not yet measured on a
GPU; torch's import and CUDA's start, about 5 s per invocation, come on top):

1. ``environment`` (cap 10 s, ~2 s): torch / CUDA / cuDNN versions, the GPU, its memory, native bf16
   (``torch.cuda.is_bf16_supported(including_emulation=False)``), the CPU count.
2. ``portability`` (cap 30 s, ~8 s): a ShardGroup trained a few steps on the device; its ``state_dicts()``, its
   replica's and the server's ``state_dict()`` saved with torch.save and loaded in a subprocess with
   ``CUDA_VISIBLE_DEVICES=""`` (weights_only=True, no map_location), every tensor's device listed. A control file
   holding a trainer's own state_dict (not copied to the host) must fail to load there on a GPU.
3. ``sync_audit`` (cap 30 s, ~8 s): synchronising CUDA calls (``torch.cuda.set_sync_debug_mode("warn")``, its
   warnings counted with the project line that caused each) in one epoch of the shard loop after a warm-up epoch,
   for NoProp-DT, CT and FM (2 shards, batch 64, sync_every 3); also single-value reads, uploads and copies to
   the host counted by a dispatch mode.
4. ``graphs`` (cap 70 s, ~40 s): one Fig. 6 block step eager (ShardTrainer.step, the project's) against a
   whole-step CUDA graph (forward, backward, both optimizer steps; the project's step with its optimizers made
   capturable, else a plain-torch step of the same block, the reason recorded), fp32 and bf16, batch 128 / 32 /
   512, images 1x28x28 and 3x32x32: GPU time per step (CUDA events) and kernels per step (torch.profiler).
5. ``shard_loop`` (cap 55 s, ~40 s): the shard loop against the plain torch loop (benchmarks/common.py), 10
   blocks, train.sync_every 1 and 8 (and ``auto`` where this version of the package has it), bf16 then fp32.
6. ``fashion_mnist`` (cap 60 s, ~30 s): one real Fashion-MNIST epoch (--fashion-root), configs/fashion_mnist.yaml
   as shipped (10 blocks), one process, ShardGroup on the device, then the assembled chain evaluated on the device:
   training seconds, evaluation seconds, test accuracy (should the configured sync_every fail, the epoch is
   trained again with sync_every 1, the error recorded). Skipped with one line when the files are not there.
7. ``processes`` (cap 70 s, ~45 s): 1, 10, 2 and 5 processes (spawned, aligned by a multiprocessing Barrier after
   their warm-up) sharing the GPU, 10 blocks split among them, sync_every 8: aggregate block-samples/s.
8. ``vmap`` (cap 30 s, ~15 s): B = 5 and 10 Fig. 6 blocks forward+backward with ``torch.func.vmap`` over their
   stacked weights against one after another, batch 128 and 32, bf16 and fp32, checked to compute the same.

Total: caps 355 s; gpu_check.sh runs the parts in 6 invocations under ``timeout`` values that add up to 445 s and
cuts them to a deadline, so that with its environment lines and the closing summary it ends within 470 s (7.8
min) whatever happens; about 4 minutes are expected on one H100. A part stops itself at its cap (what it measured
stays), an exception in a part is recorded and the next part runs, and the JSON file is rewritten after every
result, so a run cut short still leaves what was done. No sleeps: processes are aligned by a barrier.

    bash benchmarks/gpu_check.sh                                          # on the GPU machine: all parts
    python benchmarks/gpu_check.py --out /tmp/gpu --fashion-root data/fashion_mnist   # the same, one process
    python benchmarks/gpu_check.py --device cpu --quick --out gpucheck_dry   # dry run, tests/test_gpu_defaults.py

On the CPU (``--device cpu``, ``--quick``: tiny sizes) the same code runs as a dry run; what needs CUDA (sync
debug mode, graphs, kernel counts, GPU bf16) reports "skipped: no CUDA". Figures go to OUT/gpu_check.json
(``--summary`` prints its result lines again).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: noprop_dist without installing it
sys.path.insert(0, HERE)  # benchmarks/: common.py and gpu_check_parts.py

import gpu_check_parts as parts  # after the sys.path lines above: it imports noprop_dist and common
import torch

RESULT_FILE = "gpu_check.json"


class Killed(BaseException):
    """SIGTERM from gpu_check.sh's ``timeout``: recorded against the part under way before exiting."""


def _on_term(signum: int, frame: Any) -> None:
    raise Killed(f"signal {signum} (the invocation's timeout)")


class Report:
    """The JSON document: written whole, atomically, after every result, so that a kill leaves a readable file."""

    def __init__(self, path: str, append: bool) -> None:
        self.path = path
        self.doc: dict = {"runs": [], "parts": {}}
        if append and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                self.doc = json.load(f)

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.doc, f, indent=1, default=str)
        os.replace(tmp, self.path)


def pick(names: list[str]) -> list[tuple[str, Any, float]]:
    """--parts: numbers (1-based) or names, in the order the parts run."""
    if not names:
        return parts.PARTS
    wanted = set()
    for n in names:
        if n.isdigit() and 1 <= int(n) <= len(parts.PARTS):
            wanted.add(parts.PARTS[int(n) - 1][0])
        elif any(n == p[0] for p in parts.PARTS):
            wanted.add(n)
        else:
            sys.exit(f"gpu_check: unknown part {n!r}; parts: "
                     + ", ".join(f"{i} {p[0]}" for i, p in enumerate(parts.PARTS, 1)))
    return [p for p in parts.PARTS if p[0] in wanted]


def run_part(number: int, name: str, fn: Any, cap: float, ctx: parts.Ctx, report: Report) -> None:
    """Run one part under its time cap; record ok / skipped / cut / error / killed and its duration."""
    entry: dict = {"status": "running", "cap_s": cap, "lines": [], "result": {}}
    report.doc["parts"][name] = entry
    report.save()
    label = f"[{number} {name}]"

    def emit(line: str) -> None:
        entry["lines"].append(line)
        print(f"{label} {line}", flush=True)

    ctx.emit, ctx.save = emit, report.save
    t0 = time.monotonic()
    try:
        fn(ctx, parts.Budget(cap), entry["result"])
        entry["status"] = "ok"
    except parts.Skipped as e:
        entry["status"] = f"skipped: {e}"
        emit(f"skipped: {e}")
    except parts.Cut as e:
        entry["status"] = f"cut: {e}"
        emit(f"cut short: {e}")
    except Killed as e:
        entry["status"] = f"killed: {e}"
        emit(f"killed: {e}")
        raise
    except Exception as e:  # recorded; the next part runs
        import traceback

        entry["status"] = f"error: {parts.brief(e)}"
        entry["traceback"] = traceback.format_exc()[-3000:]
        emit(f"error: {parts.brief(e, 300)}")
    finally:
        entry["seconds"] = time.monotonic() - t0
        report.save()
        print(f"{label} {entry['status'].split(':')[0]} in {entry['seconds']:.1f} s (cap {cap:.0f} s)", flush=True)


def summary(path: str) -> None:
    """Every part's status and result lines from the JSON file (the last lines of a device run's output)."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    print(f"=== gpu_check summary ({path}) ===")
    for i, (name, _, _) in enumerate(parts.PARTS, 1):
        entry = doc["parts"].get(name)
        if entry is None:
            print(f"[{i} {name}] not run")
            continue
        print(f"[{i} {name}] {entry['status'][:200]} ({entry.get('seconds', 0):.1f} s)")
        for line in entry["lines"]:
            print(f"    {line}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of the script")
    p.add_argument("--parts", nargs="*", default=[], help="numbers or names of the parts to run (default: all)")
    p.add_argument("--fashion-root", default=os.path.join("data", "fashion_mnist"),
                   help="folder holding Fashion-MNIST's four IDX .gz files (part 6 is skipped without them)")
    p.add_argument("--append", action="store_true",
                   help="add to OUT/gpu_check.json instead of starting it anew (gpu_check.sh's later invocations)")
    p.add_argument("--summary", action="store_true", help="print OUT/gpu_check.json's result lines and exit")
    args = p.parse_args()
    path = os.path.join(args.out, RESULT_FILE)
    if args.summary:
        summary(path)
        return
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (use --device cpu --quick for a dry run)")
    signal.signal(signal.SIGTERM, _on_term)
    report = Report(path, args.append)
    chosen = pick(args.parts)
    report.doc["runs"].append({"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "parts": [c[0] for c in chosen]})
    report.save()
    ctx = parts.Ctx(device=device, quick=args.quick, fashion_root=args.fashion_root, emit=print, save=report.save)
    numbers = {p[0]: i for i, p in enumerate(parts.PARTS, 1)}
    try:
        for name, fn, cap in chosen:
            # A dry run's caps are doubled: on a loaded 2-core CPU it should still go through every part's code.
            run_part(numbers[name], name, fn, cap * (2 if args.quick else 1), ctx, report)
    except Killed:
        sys.exit(124)
    report.doc["runs"][-1]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report.save()
    print(f"written: {path}", flush=True)


if __name__ == "__main__":
    main()

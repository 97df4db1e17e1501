"""Inference latency and throughput of an exported chain: torch eager (the chain load_chain returns) against
onnxruntime running the file ``python -m noprop_dist.export`` writes, at batch 1 and batch 256, on this CPU.

    python benchmarks/export_latency.py                      # trains a DT and a CT run on digits in process
    python benchmarks/export_latency.py --run-dir runs/quickstart --threads 2

Without --run-dir it trains two short runs in process (no Ray; latency does not depend on how well a chain is
trained): NoProp-DT with T = 10 blocks (the quickstart's shape) and NoProp-CT with one network and 1,000 inference
steps (the paper's), and exports each with the exporter's own code (so the export time and file size of a
1,000-step graph are measured too). Both engines get the same uint8 images and z0, the same number of threads
(--threads, default 1: the machine is shared), and run the same work: normalisation included. Prints a table and
writes benchmarks/results/export_latency.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import write_result  # noqa: E402

from noprop_dist.config import load_config  # noqa: E402
from noprop_dist.data import load_dataset  # noqa: E402
from noprop_dist.evaluate import draw_z0, load_chain  # noqa: E402
from noprop_dist.export import export_chain  # noqa: E402

RUNS = {  # name -> config overrides of the runs trained when no --run-dir is given
    "digits_dt_T10": ["model.num_blocks=10", "train.epochs=3"],
    "digits_ct_1000_steps": ["model.method=noprop_ct", "model.num_shards=1", "train.epochs=3",
                             "model.inference_steps=1000"],
}
BATCHES = (1, 256)


def train_run(name: str, overrides: list[str], folder: str) -> str:
    """A run directory with a chain trained in process on digits, saved with the extra the driver writes."""
    from noprop_dist.training import evaluate_states, model_spec, train_in_process

    ds = load_dataset("digits")
    cfg = load_config(None, [*overrides, "cluster.num_workers=1"])
    blocks, shared, _ = train_in_process(cfg, ds, device="cpu")
    chain, acc = evaluate_states(model_spec(cfg, ds.image_shape, ds.num_classes), ds, blocks, shared, 1000, 1234)
    run_dir = os.path.join(folder, name)
    os.makedirs(run_dir)
    chain.save(os.path.join(run_dir, "chain.pt"), extra={
        "dataset": "digits", "data_root": None, "test_limit": None, "data_path": None, "image_size": None,
        "class_names": None, "mean": list(ds.mean), "std": list(ds.std), "test_accuracy": acc,
        "eval_seed": 1234, "eval_batch_size": 1000})
    print(f"{name}: trained in process, test accuracy {acc:.4f}", flush=True)
    return run_dir


def timed(fn: Callable[[], object], min_reps: int, budget_s: float) -> list[float]:
    """Seconds of each call of fn after two warm-up calls: at least min_reps calls, more while within budget_s."""
    for _ in range(2):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def measure(run_dir: str, threads: int, budget_s: float, folder: str) -> dict:
    """Export the run to ONNX, then time both engines at each batch size: one row per (engine, batch)."""
    import onnxruntime

    path = os.path.join(folder, os.path.basename(run_dir.rstrip("/")) + ".onnx")
    result = export_chain(run_dir, path, "onnx")
    print(result.line(), flush=True)
    trained = load_chain(run_dir)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    t0 = time.perf_counter()
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    session_seconds = time.perf_counter() - t0
    c, h, w = trained.spec.image_shape
    rows = []
    for batch in BATCHES:
        images = np.random.default_rng(batch).integers(0, 256, (batch, c, h, w), dtype=np.uint8)
        z0 = draw_z0(batch, trained.spec.embed_dim, 0)
        feed = {"images": images, "z0": z0.numpy()}
        engines = {
            "torch eager": lambda images=images, z0=z0: trained(images, z0=z0),
            "onnxruntime": lambda feed=feed: session.run(None, feed),
        }
        with torch.no_grad():
            for engine, fn in engines.items():
                times = timed(fn, min_reps=5, budget_s=budget_s)
                median = statistics.median(times)
                row = {"engine": engine, "batch": batch, "reps": len(times), "median_ms": 1e3 * median,
                       "p90_ms": 1e3 * float(np.quantile(times, 0.9)), "images_per_s": batch / median}
                rows.append(row)
                print(f"  {engine:<12} batch {batch:>3}: median {row['median_ms']:9.2f} ms, p90 "
                      f"{row['p90_ms']:9.2f} ms, {row['images_per_s']:9.1f} images/s ({len(times)} reps)", flush=True)
    return {"run": os.path.basename(run_dir.rstrip("/")), "method": result.method, "sampler": result.sampler,
            "steps": result.steps, "onnx_bytes": result.size_bytes, "export_seconds": result.export_seconds,
            "onnxruntime_session_seconds": session_seconds, "max_logit_difference": result.max_logit_difference,
            "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", nargs="*", help="finished runs to measure (default: train the two of RUNS)")
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    p.add_argument("--budget", type=float, default=5.0, help="seconds of timed calls per engine and batch size")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        run_dirs = args.run_dir or [train_run(name, overrides, folder) for name, overrides in RUNS.items()]
        results = [measure(run_dir, args.threads, args.budget, folder) for run_dir in run_dirs]
    command = "python benchmarks/export_latency.py " + " ".join(sys.argv[1:])
    print(write_result("export_latency", {"command": command.strip(), "threads": args.threads,
                                          "onnxruntime": __import__("onnxruntime").__version__,
                                          "results": results}))


if __name__ == "__main__":
    main()

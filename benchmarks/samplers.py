"""Inference samplers on trained chains: test accuracy with Eq. 3's noise (the paper, several noise seeds), without
it (mean), averaged over n noisy runs (ensemble), DT's read-outs averaged over the stages (stage_average), CT's
ODE, and the accuracy along the chain.

    python benchmarks/samplers.py --name digits_dt                          # the quickstart: digits, DT, 20 epochs
    python benchmarks/samplers.py --name fashion_dt --set data.name=fashion_mnist data.train_limit=8000 \\
        data.test_limit=2000 train.epochs=5
    python benchmarks/samplers.py --name digits_ct --config mnist_ct --set data.name=digits \\
        model.num_shards=2 train.epochs=20 --steps 10 100 1000
    python benchmarks/samplers.py --name digits_dt --run-dir DIR            # re-measure a finished run

Trains the run on a local Ray cluster (2 workers unless --set says otherwise) unless --run-dir names a finished
one, then re-evaluates its chain.pt with every sampler that applies. Writes benchmarks/results/samplers_<name>.json
and samplers_<name>.png (accuracy along the chain, one line per sampler).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ray_run, write_result  # noqa: E402

from noprop_dist.config import load_config  # noqa: E402
from noprop_dist.evaluate import evaluation, load_chain  # noqa: E402
from noprop_dist.registry import get_method  # noqa: E402


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def measure(run_dir: str, seeds: int, draws: list[int], steps: list[int]) -> list[dict]:
    """One row per (sampler, steps, seed or draws): test accuracy, stage table, seconds."""
    chain = load_chain(run_dir).chain
    method = get_method(chain.spec.method)
    step_list = steps if method.takes_steps else [None]
    rows = []
    for n_steps in step_list:
        for sampler in method.samplers:
            settings = [{"seed": 1234 + i} for i in range(seeds if sampler == "eq3" else 1)] if sampler != "ensemble" \
                else [{"draws": n} for n in draws]
            for extra in settings:
                t0 = time.perf_counter()
                r = evaluation(run_dir, seed=extra.get("seed"), steps=n_steps, sampler=sampler,
                               draws=extra.get("draws"), stages=True)
                r["seconds"] = time.perf_counter() - t0
                rows.append(r)
                tag = f"draws={r['draws']}" if "draws" in r else f"seed={r['seed']}"
                along = " ".join(_pct(st["chain_accuracy"]) for st in r["stages"])
                own = " ".join(_pct(st["own_accuracy"]) for st in r["stages"])
                print(f"{sampler:<9} steps={n_steps or '-':<5} {tag:<10} test {_pct(r['test_accuracy'])} %  "
                      f"along the chain: {along}  own: {own}  ({r['seconds']:.1f} s)", flush=True)
    return rows


def plot(rows: list[dict], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    most = max((r["steps"] or 0) for r in rows)
    for r in (r for r in rows if (r["steps"] or 0) == most):  # CT / FM: the largest step count only
        key = (r["sampler"], r.get("draws"), r["steps"])
        if key in seen:  # eq3's further seeds: one line per sampler
            continue
        seen.add(key)
        k = list(range(1, len(r["stages"]) + 1))
        label = r["sampler"] + (f" ({r['draws']} draws)" if "draws" in r else "") + \
            (f", {r['steps']} steps" if r["steps"] else "")
        line, = ax.plot(k, [100 * s["chain_accuracy"] for s in r["stages"]], marker="o", label=label)
        if r["sampler"] in ("eq3", "mean") and r["stages"][0]["own_accuracy"] is not None:
            ax.plot(k, [100 * s["own_accuracy"] for s in r["stages"]], linestyle=":", color=line.get_color(),
                    label=f"{label}: the stage's own prediction")
    ax.set_xticks(range(1, len(rows[0]["stages"]) + 1))
    ax.set_xlabel("stage (DT block t / CT shard k): the chain stopped there")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"written: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="result file suffix")
    p.add_argument("--config", help="config file (default: the built-in defaults, the quickstart)")
    p.add_argument("--set", nargs="*", default=[], help="config overrides KEY=VALUE")
    p.add_argument("--run-dir", help="a finished run to re-measure instead of training one")
    p.add_argument("--replot", action="store_true", help="only redraw the plot from the result file")
    p.add_argument("--seeds", type=int, default=3, help="noise seeds of the eq3 sampler")
    p.add_argument("--draws", type=int, nargs="*", default=[4, 8], help="ensemble sizes")
    p.add_argument("--steps", type=int, nargs="*", default=[1000], help="CT / FM inference steps")
    args = p.parse_args()
    png = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"samplers_{args.name}.png")
    title = f"{args.name}: test accuracy along the chain, by sampler"
    if args.replot:
        path = os.path.join(os.path.dirname(png), f"samplers_{args.name}.json")
        with open(path, encoding="utf-8") as f:
            plot(json.load(f)["rows"], png, title)
        return
    summary = None
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir
        if run_dir is None:
            run_dir = os.path.join(tmp, "run")
            cfg = load_config(args.config, [*args.set, f"run.dir={run_dir}"])
            t0 = time.perf_counter()
            summary = ray_run(cfg)
            print(f"trained in {time.perf_counter() - t0:.0f} s wall ({summary['train_seconds']:.0f} s training); "
                  f"as evaluated at the end: {summary['test_accuracy_by_sampler']}", flush=True)
        rows = measure(run_dir, args.seeds, args.draws, args.steps)
    payload = {"command": " ".join(sys.argv), "rows": rows}
    if summary is not None:
        payload["train"] = {k: summary.get(k) for k in ("dataset", "method", "epochs", "num_workers", "train_seconds",
                                                       "test_accuracy_by_sampler", "curve")}
    print(f"written: {write_result(f'samplers_{args.name}', payload)}")
    plot(rows, png, title)


if __name__ == "__main__":
    main()

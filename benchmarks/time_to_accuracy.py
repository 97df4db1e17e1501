"""Wall time to a test accuracy: NoProp-DT vs DDP backprop (Ray Train), each on 1 and 2 workers.

    python benchmarks/time_to_accuracy.py --dataset digits --epochs 20 --target 0.9
    python benchmarks/time_to_accuracy.py --dataset fashion_mnist --epochs 3 --target 0.8 --train-limit 6000
    python benchmarks/time_to_accuracy.py --dataset fashion_mnist --embedding learned --epochs 2 --workers 2 \
        --target 0.88 0.90 --set train.lr_schedule=cosine --name time_to_accuracy_fashion_mnist_full --keep DIR
    python benchmarks/time_to_accuracy.py --dataset digits --methods noprop_ct noprop_fm adjoint --workers 1 \
        --epochs 40 --target 0.8 --set model.inference_steps=100      # the CT setting, as the paper's Fig. 3
    python benchmarks/time_to_accuracy.py --dataset fashion_mnist --embedding learned --methods noprop_dt \
        --blocks fig6 resnet --workers 2 --epochs 1 5 --target 0.88 0.90 --name blocks_fashion_mnist  # two blocks

All runs go side by side in one invocation, each through the run entry point
(``python -m noprop_dist.run``; backprop is ``model.method=backprop``, which that entry point trains
with DDP through Ray Train). Each run's ``summary.json`` ``curve`` has the test accuracy after every
epoch and the cumulative training seconds at that point; the time to the target is that of the first
epoch whose test accuracy reaches it (so it is resolved to whole epochs, and excludes evaluation and
start-up, which ``train_seconds`` does not count). A run that never reaches it shows '-'. To resolve it
finer, give a fractional budget (``--epochs 0.5``: half an epoch, the cosine rate ending there), one run per
budget, as a time-to-accuracy study picks its schedule. A second table
gives every method's test accuracy after each epoch: the comparison at equal epochs.
Writes benchmarks/results/<name>.json (--name; default time_to_accuracy_<dataset>[_ct], _ct when a
CT-setting method is among --methods) and, with matplotlib, the curves as <name>.png (test accuracy against
training time, the targets drawn in) and <name>_epochs.png (against epochs). With --keep, running the same
command again re-evaluates finished runs instead of retraining them (the entry point does that), so the
tables can be rebuilt, or other targets read, from runs already made.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile

from common import write_result

from noprop_dist.config import CONFIG_DIR
from noprop_dist.paper.harness import (
    HarnessError,
    config_path,
    run_command,
    train_subprocess,
)
from noprop_dist.paper.plots import PlotError, plot_curves, run_label
from noprop_dist.registry import get_method
from noprop_dist.storage.summary import read_summary

# The DT setting (NoProp-DT against DDP backprop, the default) and the CT setting (the paper's Fig. 3:
# NoProp-CT and NoProp-FM against the adjoint method; --workers 1, as K = 1 time-shard has one worker).
DT_SETTING = ("noprop_dt", "backprop")
CT_SETTING = ("noprop_ct", "noprop_fm", "adjoint")
METHODS = DT_SETTING + CT_SETTING


def time_to_accuracy(curve: list[dict], target: float) -> dict | None:
    """{"epoch", "train_seconds", "test_accuracy"} of the first epoch whose test accuracy >= target; else None.

    ``curve``: summary.json's list of {"epoch", "train_seconds" (cumulative), "test_accuracy"}; read in
    epoch order whatever order it was written in (a resumed run appends).
    """
    for point in sorted(curve, key=lambda p: p["epoch"]):
        if point["test_accuracy"] >= target:
            return {k: point[k] for k in ("epoch", "train_seconds", "test_accuracy")}
    return None


def result_row(method: str, workers: int, summary: dict, targets: list[float], label: str | None = None) -> dict:
    """What the tables show of one run: per target, the epoch and training seconds that first reach it.
    ``label`` names the run in the tables and plots (default: its method and workers)."""
    curve = summary.get("curve") or []
    hits = [time_to_accuracy(curve, target) for target in targets]
    return {
        "method": method, "block": summary.get("block", "fig6"), "workers": workers,
        "label": label or run_label({"method": method, "num_workers": workers}),
        "targets": list(targets),
        "epochs_to_target": [hit["epoch"] if hit else None for hit in hits],
        "seconds_to_target": [hit["train_seconds"] if hit else None for hit in hits],
        "final_test_accuracy": summary["test_accuracy"], "epochs": summary["epochs"],
        "train_seconds": summary["train_seconds"], "curve": curve,
        "peak_memory_mb": summary.get("peak_memory_mb"), "peak_memory_kind": summary.get("peak_memory_kind"),
    }


def reference_row(path: str, targets: list[float]) -> dict:
    """A row for another code's run from its result file ({"label", "workers", "epochs", "curve", ...}, as
    benchmarks/public_noprop.py writes it), read like one of ours."""
    try:
        with open(path, encoding="utf-8") as f:
            ref = json.load(f)
        summary = {"curve": ref["curve"], "test_accuracy": ref["curve"][-1]["test_accuracy"], "epochs": ref["epochs"],
                   "train_seconds": ref["curve"][-1]["train_seconds"]}
        return result_row(ref["method"], ref["workers"], summary, targets, ref["label"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise HarnessError(f"--reference {path}: not a result file of benchmarks/public_noprop.py ({e!r:.200})") from None


def _name(row: dict) -> str:
    """A run's method in the tables, with its block when it is not Fig. 6's (noprop_dt/resnet)."""
    block = row.get("block", "fig6")
    return row["method"] if block == "fig6" else f"{row['method']}/{block.rsplit(':', 1)[-1]}"


def format_table(rows: list[dict]) -> str:
    """Plain-text table of the runs: per target (in the header) the epochs and seconds to reach it."""
    targets = rows[0]["targets"] if rows else []
    head = f"{'method':<17} {'workers':>7}"
    for target in targets:
        head += f" {'epochs to ' + format(target, '.0%'):>13} {'seconds to ' + format(target, '.0%'):>14}"
    lines = [head + f" {'final acc':>10} {'train s':>9} {'epochs':>6}"]
    for r in rows:
        line = f"{_name(r):<17} {r['workers']:>7}"
        for epochs, secs in zip(r["epochs_to_target"], r["seconds_to_target"]):
            line += f" {'-' if epochs is None else str(epochs):>13} {'-' if secs is None else f'{secs:.1f}':>14}"
        lines.append(line + f" {100 * r['final_test_accuracy']:>9.2f}% {r['train_seconds']:>9.1f} {r['epochs']:>6g}")
    return "\n".join(lines)


def format_epoch_table(rows: list[dict]) -> str:
    """Test accuracy (%) of every run after each epoch, a column per run: the comparison at equal epochs.
    An epoch a run has no point for (it ran fewer) shows '-'."""
    epochs = sorted({p["epoch"] for r in rows for p in r["curve"]})
    names = [f"{_name(r)} w{r['workers']}" for r in rows]
    if len(set(names)) < len(names):  # one method and worker count run with several budgets: name the budget
        names = [f"{n} e{r['epochs']:g}" for n, r in zip(names, rows)]
    lines = [f"{'epoch':>5} " + " ".join(f"{n:>14}" for n in names)]
    for e in epochs:
        cells = []
        for r in rows:
            acc = next((p["test_accuracy"] for p in r["curve"] if p["epoch"] == e), None)
            cells.append(f"{'-' if acc is None else f'{100 * acc:.2f}%':>14}")
        lines.append(f"{e:>5} " + " ".join(cells))
    return "\n".join(lines)


def method_config(method: str, dataset: str) -> str:
    """The method's config for the dataset. Without one of its own, backprop uses the dataset's NoProp-DT
    config (the paper runs it "in the DT setting": same blocks, batch, optimiser) and a CT-setting method its
    MNIST config (Table 3's settings for it: eta, steps, optimiser; data.name is overridden), with a note."""
    try:
        return config_path(method, dataset, CONFIG_DIR)
    except HarnessError as e:
        if get_method(method).config_suffix == "":  # the dataset's own config (NoProp-DT's): no fallback
            raise
        fallback = config_path(*(("noprop_dt", dataset) if method in DT_SETTING else (method, "mnist")),
                               CONFIG_DIR)
        print(f"note: {e}; using {fallback} with model.method={method}", flush=True)
        return fallback


def overrides_for(args: argparse.Namespace, method: str, workers: int, budget: float, run_dir: str) -> list[str]:
    out = [f"model.method={method}", f"data.name={args.dataset}", f"model.embedding={args.embedding}",
           f"train.epochs={budget:g}", f"cluster.num_workers={workers}", f"run.dir={run_dir}",
           "metrics.enabled=false", *args.overrides]
    if args.train_limit:
        out.append(f"data.train_limit={args.train_limit}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--embedding", default="one_hot")
    p.add_argument("--epochs", type=float, nargs="+", default=[20.0],
                   help="the training budget (train.epochs); a fraction trains part of the last epoch, e.g. 0.5; "
                        "several budgets make one run each")
    p.add_argument("--target", dest="targets", type=float, nargs="+", default=[0.9], metavar="ACC",
                   help="one or more test accuracies in [0, 1]; default %(default)s")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(DT_SETTING))
    p.add_argument("--blocks", nargs="+", default=["fig6"], metavar="BLOCK",
                   help="model.block of each run (a registered block or package.module:factory); several: one run "
                        "of each method with each, side by side (default: fig6)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--reference", metavar="FILE", action="append", default=[],
                   help="a result of another code's run (benchmarks/public_noprop.py writes one), shown beside "
                        "the runs in the tables and plots")
    p.add_argument("--keep", metavar="DIR", help="keep the run directories here (default: a temporary one)")
    p.add_argument("--name", help="result file name under benchmarks/results, without .json "
                                  "(default time_to_accuracy_<dataset>[_ct])")
    args = p.parse_args()
    bad = [t for t in args.targets if not 0.0 <= t <= 1.0]
    if bad:
        p.error(f"--target takes test accuracies in [0, 1], got {bad[0]} (0.88, not 88)")
    if any(e <= 0 for e in args.epochs):
        p.error(f"--epochs takes training budgets > 0, got {min(args.epochs)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or tmp
        several = len(args.epochs) > 1
        try:
            for method, block, workers, budget in itertools.product(args.methods, args.blocks, args.workers,
                                                                    args.epochs):
                config = method_config(method, args.dataset)
                tag = f"_{block.rsplit(':', 1)[-1]}" if len(args.blocks) > 1 else ""
                run_dir = os.path.join(base, f"{method}{tag}_w{workers}" + (f"_e{budget:g}" if several else ""))
                label = run_label({"method": method, "num_workers": workers}) + (
                    f", {block} blocks" if len(args.blocks) > 1 else "") + (
                    f", {budget:g} epoch{'' if budget == 1 else 's'}" if several else "")
                print(f"{label}: training ({run_dir})", flush=True)
                overrides = overrides_for(args, method, workers, budget, run_dir) + [f"model.block={block}"]
                train_subprocess(run_command(config, overrides), f"{run_dir}.log", echo=False)
                rows.append(result_row(method, workers, read_summary(run_dir), args.targets, label))
            rows += [reference_row(path, args.targets) for path in args.reference]
        except HarnessError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(format_table(rows))
    print()
    print("test accuracy after each epoch")
    print(format_epoch_table(rows))
    setting = "_ct" if set(args.methods) & set(CT_SETTING) else ""  # the DT-setting files keep their names
    name = args.name or f"time_to_accuracy_{args.dataset}{setting}"
    # --keep is a local directory: record only whether runs were kept, not this machine's path.
    written = write_result(name, {"args": {**vars(args), "keep": bool(args.keep)}, "results": rows})
    print("written:", written)
    runs = [(r["label"], r["curve"]) for r in rows if r["curve"]]
    targets = " and ".join(format(t, ".0%") for t in args.targets)
    try:
        for x, suffix, title in (("train_seconds", "", f"{args.dataset}: time to {targets} test accuracy"),
                                 ("epoch", "_epochs", f"{args.dataset}: test accuracy at equal epochs")):
            png = plot_curves(runs, written[:-len(".json")] + suffix + ".png", title, targets=args.targets, x=x)
            print("written:", png)
    except PlotError as e:  # matplotlib is an optional extra; the JSON holds the same curves
        print(f"note: no plot ({e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

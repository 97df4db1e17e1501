"""Reproduce one row of the paper's Table 1: ``python -m noprop_dist.reproduce --method M --dataset D ...``.

    python -m noprop_dist.reproduce --method noprop_dt --dataset mnist --embedding one_hot \\
        --seeds 0 1 2 --inference-runs 5 [--set KEY=VALUE ...] [--out runs/reproduce]
    python -m noprop_dist.reproduce --all        # print the command of every Table 1 cell, run nothing

For each seed it runs ``python -m noprop_dist.run`` with ``noprop_dist/configs/<dataset>.yaml`` (NoProp-DT) or
``noprop_dist/configs/<dataset>_<ct|fm|backprop|adjoint|dtp>.yaml`` (digits: ``quickstart[_<suffix>].yaml``) in its
own run directory under ``<out>/runs``; running the same command again resumes unfinished runs and
re-evaluates finished ones (the driver does that). A NoProp chain is stochastic at inference, so each
seed's chain is evaluated ``--inference-runs`` times with different noise seeds; the baselines are
deterministic at inference, one value per seed. Accuracies are reported as mean ± standard error over
all of those values, as the paper does. ``<out>/results.json`` and ``<out>/table.md`` gather the rows of
every invocation with the same ``--out``; ``<out>/fig3_<dataset>_<embedding>.png`` plots test accuracy
against training time for the methods run in that setting.

Standard error: ``std(ddof=1) / sqrt(n)``. With n = 1 there is no spread to estimate it from, so it is
reported as n/a (null in results.json), never as 0, which would claim an exactness one run cannot show.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Callable

from ..config import (
    CONFIG_DIR,
    DATASET_NAMES,
    EMBEDDINGS,
    PRESETS,
    ConfigError,
    load_config,
)
from ..registry import METHODS, get_method
from ..storage.atomic import atomic_write_json
from ..storage.summary import SummaryError, read_summary
from .numbers import (
    EARLIER_METHODS,
    EMBEDDING_LABELS,
    METHOD_LABELS,
    paper_epochs,
    paper_memory_gb,
    paper_test_accuracy,
    table1_cells,
)

RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"
# Keys the harness sets itself: a --set of one of them would contradict --method/--dataset/--seeds/--out.
HARNESS_KEYS = ("model.method", "model.embedding", "data.name", "train.seed", "run.dir")
# Digits has no file of its own: the quickstart config is the digits config.
CONFIG_ALIASES = {"digits": "quickstart"}


class HarnessError(Exception):
    """A problem the user can fix (missing config, bad --set, failed run); printed as one line.

    exit_code: 2 for usage and config errors (as the run entry point), 1 for a run that failed.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------- statistics

def mean_se(values: list[float]) -> tuple[float, float | None]:
    """(mean, standard error = std(ddof=1) / sqrt(n)); the SE is None for n = 1 (not estimable)."""
    if not values:
        raise ValueError("mean_se of no values")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def stats(values: list[float]) -> dict[str, Any] | None:
    """{"mean", "se", "n", "values"} of accuracies in [0, 1]; None when there are none."""
    if not values:
        return None
    mean, se = mean_se(values)
    return {"mean": mean, "se": se, "n": len(values), "values": values}


def format_pct(s: dict[str, Any] | None) -> str:
    """'99.12 ± 0.05' (percent), 'n/a' for a missing SE, '-' for no values."""
    if s is None:
        return "-"
    se = "n/a" if s["se"] is None else f"{100 * s['se']:.2f}"
    return f"{100 * s['mean']:.2f} ± {se}"


# ----------------------------------------------------------------------------- configs and runs

def config_suffix(method: str) -> str:
    """'' for NoProp-DT (the dataset configs are DT's), else '_ct', '_fm', '_backprop', ..."""
    return get_method(method).config_suffix


def config_path(method: str, dataset: str, config_dir: str | None) -> str:
    """The config of this method and dataset: a file of ``config_dir``, or with None the packaged config's
    name (what ``--config`` takes, the same on every machine); HarnessError naming what is missing."""
    suffix, directory = config_suffix(method), config_dir or CONFIG_DIR
    stems = [dataset] + ([CONFIG_ALIASES[dataset]] if dataset in CONFIG_ALIASES else [])
    for stem in stems:
        path = os.path.join(directory, f"{stem}{suffix}.yaml")
        if os.path.isfile(path):
            return path if config_dir else f"{stem}{suffix}"
    expected = os.path.join(directory, f"{stems[-1]}{suffix}.yaml")
    raise HarnessError(f"no config for --method {method} --dataset {dataset}: {expected} does not exist")


def cell_name(method: str, dataset: str, embedding: str) -> str:
    return f"{method}-{dataset}-{embedding}"


def seed_run_dir(out: str, method: str, dataset: str, embedding: str, seed: int) -> str:
    return os.path.join(out, "runs", cell_name(method, dataset, embedding), f"seed{seed}")


def check_user_overrides(overrides: list[str]) -> None:
    """Refuse --set of a key the harness owns (one line naming the key and the flag to use)."""
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key in HARNESS_KEYS:
            raise HarnessError(f"--set {key}: set by the harness; use --method, --embedding, --dataset, "
                               f"--seeds or --out instead")


def run_overrides(method: str, dataset: str, embedding: str, seed: int, run_dir: str,
                  user: list[str]) -> list[str]:
    """The run's --set list: the user's first, then the harness's keys (never overridden, see above)."""
    return [*user, "eval.train_accuracy=true", f"model.method={method}", f"data.name={dataset}",
            f"model.embedding={embedding}", f"train.seed={seed}", f"run.dir={run_dir}"]


def run_command(config: str, overrides: list[str], preset: str | None = None) -> list[str]:
    """``python -m noprop_dist.run --config FILE [--preset P] --set K=V ...`` as an argv list."""
    return [sys.executable, "-m", "noprop_dist.run", "--config", config, *(["--preset", preset] if preset else []),
            *[arg for o in overrides for arg in ("--set", o)]]


def train_subprocess(argv: list[str], log_path: str, echo: bool) -> None:
    """Run one training subprocess, its output into ``log_path`` (and the terminal when ``echo``).

    The log is written line by line, so that ``tail -f`` shows a long run's progress as it comes.
    A config error of the run (exit 2) comes back as its one line; another failure as the log's tail.
    """
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with open(log_path, "w", encoding="utf-8", buffering=1) as log:  # 1: flushed at each newline
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:
            log.write(line)
            lines = (lines + [line])[-20:]
            if echo:
                print(line, end="", flush=True)
        rc = proc.wait()
    if rc == 2 and lines and lines[-1].startswith("error: "):
        raise HarnessError(lines[-1].strip().removeprefix("error: "))
    if rc != 0:
        tail = "".join(lines[-10:])
        raise HarnessError(f"training exited with {rc}; see {log_path}. Last lines:\n{tail}", exit_code=1)


# ----------------------------------------------------------------------------- measurements per seed

def inference_accuracies(run_dir: str, runs: int, base_seed: int,
                         evaluate: Callable[..., float] | None = None, sampler: str | None = None) -> list[float]:
    """Test accuracy of the run's chain under ``runs`` noise seeds base_seed, base_seed + 1, ...

    sampler: None, the run's own (the first value then equals summary.json's test_accuracy), or another one.
    """
    if evaluate is None:
        from ..evaluate import (
            evaluate_run as evaluate,  # torch and data loaders: only when needed
        )
    extra = {} if sampler is None else {"sampler": sampler}
    return [evaluate(run_dir, seed=base_seed + i, **extra) for i in range(runs)]


def peak_memory(summary: dict) -> tuple[float | None, str | None]:
    """(peak training memory in MiB, "gpu" | "rss") from summary.json.

    Runs written before the summary had ``peak_memory_mb``: the largest worker's peak RSS.
    """
    if summary.get("peak_memory_mb") is not None:
        return float(summary["peak_memory_mb"]), summary.get("peak_memory_kind") or "rss"
    rss = [w["peak_rss_mb"] for w in summary.get("workers", []) if w.get("peak_rss_mb") is not None]
    return (max(rss), "rss") if rss else (None, None)


def hardware_note(summaries: list[dict]) -> str:
    """Where the runs trained: GPU name when their memory is GPU memory, else CPU and core count."""
    kinds = {peak_memory(s)[1] for s in summaries}
    if "gpu" in kinds:
        try:
            import torch

            name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "GPU"
        except Exception:  # noqa: BLE001 - the note is informational; never fail a finished row on it
            name = "GPU"
        return f"GPU ({name})"
    return f"CPU ({os.cpu_count()} cores, no GPU)"


def seed_record(seed: int, run_dir: str, summary: dict, test_values: list[float],
                paper_values: list[float] | None = None) -> dict[str, Any]:
    """What results.json keeps of one seed's run. paper_values: the test accuracies under the paper's sampler
    when the run evaluates with another one (None: the same sampler, or a baseline)."""
    mem, kind = peak_memory(summary)
    return {
        "seed": seed, "run_dir": run_dir, "test_accuracies": test_values,
        "sampler": summary.get("sampler"), "paper_sampler_accuracies": paper_values,
        "summary_test_accuracy": summary["test_accuracy"], "train_accuracy": summary.get("train_accuracy"),
        "train_seconds": summary["train_seconds"], "epochs": summary["epochs"],
        "num_workers": summary.get("num_workers"), "peak_memory_mb": mem, "peak_memory_kind": kind,
    }


def build_row(method: str, dataset: str, embedding: str, config: str, user_overrides: list[str],
              inference_runs: int, seeds: list[dict], summaries: list[dict]) -> dict[str, Any]:
    """One results.json row: our statistics beside the paper's numbers for the cell."""
    test = [v for s in seeds for v in s["test_accuracies"]]
    # The paper's sampler beside the run's, so the row still compares like with like with Table 1.
    paper_test = [v for s in seeds for v in (s.get("paper_sampler_accuracies") or s["test_accuracies"])]
    train = [s["train_accuracy"] for s in seeds if s["train_accuracy"] is not None]
    mems = [s["peak_memory_mb"] for s in seeds if s["peak_memory_mb"] is not None]
    kinds = sorted({s["peak_memory_kind"] for s in seeds if s["peak_memory_kind"]})
    return {
        "method": method, "dataset": dataset, "embedding": embedding, "config": config,
        "overrides": user_overrides, "seeds": [s["seed"] for s in seeds],
        "inference_runs": inference_runs if get_method(method).noprop else 1,
        "test": stats(test), "train": stats(train),
        "sampler": "/".join(sorted({s["sampler"] for s in seeds if s.get("sampler")})) or None,
        "paper_sampler": get_method(method).paper_sampler, "test_paper_sampler": stats(paper_test),
        "epochs": sorted({s["epochs"] for s in seeds}),
        "num_workers": sorted({s["num_workers"] for s in seeds if s["num_workers"] is not None}),
        "train_seconds_mean": sum(s["train_seconds"] for s in seeds) / len(seeds),
        # The peak of the seeds: Table 2 is what training needs, and every seed needs the same.
        "peak_memory_mb": max(mems) if mems else None, "peak_memory_kind": "/".join(kinds) or None,
        "hardware": hardware_note(summaries),
        "paper": {"test_accuracy": paper_test_accuracy(method, dataset, embedding),
                  "memory_gb": paper_memory_gb(method, dataset, embedding),
                  "epochs": paper_epochs(method, dataset)},
        "per_seed": seeds, "date": time.strftime("%Y-%m-%d %H:%M"),
    }


# ----------------------------------------------------------------------------- results.json and table.md

def row_key(row: dict) -> str:
    return cell_name(row["method"], row["dataset"], row["embedding"])


def load_results(out: str) -> dict[str, Any]:
    path = os.path.join(out, RESULTS_FILE)
    if not os.path.exists(path):
        return {"rows": {}}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def merge_row(out: str, row: dict) -> dict[str, Any]:
    """Put ``row`` into ``<out>/results.json`` (replacing the same cell's earlier row); returns all rows."""
    results = load_results(out)
    results["rows"][row_key(row)] = row
    os.makedirs(out, exist_ok=True)
    atomic_write_json(os.path.join(out, RESULTS_FILE), results)
    return results


def _sort_key(row: dict) -> tuple[int, int, int]:
    """Table order: dataset, then embedding, then the paper's method order."""
    order = list(METHOD_LABELS)  # Table 1's row order
    return (DATASET_NAMES.index(row["dataset"]), EMBEDDINGS.index(row["embedding"]), order.index(row["method"]))


def _fmt(x: Any, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def table_line(row: dict) -> str:
    """One Markdown table line of a results row."""
    paper = row["paper"]
    epochs = "/".join(str(e) for e in row["epochs"])
    memory = "-" if row["peak_memory_mb"] is None else f"{row['peak_memory_mb']:,.0f} MiB ({row['peak_memory_kind']})"
    return (f"| {METHOD_LABELS.get(row['method'], row['method'])} | {row['dataset']} | "
            f"{EMBEDDING_LABELS.get(row['embedding'], row['embedding'])} | "
            f"{_fmt(paper['test_accuracy'], '.2f')} | {format_pct(row['test'])} | "
            f"{format_pct(row.get('test_paper_sampler')) if row.get('paper_sampler') else '-'} | "
            f"{row['test']['n'] if row['test'] else 0} ({len(row['seeds'])} x {row['inference_runs']}) | "
            f"{format_pct(row['train'])} | {epochs} / {_fmt(paper['epochs'], 'd')} | "
            f"{row['train_seconds_mean']:.0f} | {memory} | {_fmt(paper['memory_gb'], '.2f')} | {row['hardware']} |")


def render_table(results: dict[str, Any], figures: list[str]) -> str:
    """``table.md``: our rows beside the paper's, the notes needed to read them, and the figures."""
    rows = sorted(results["rows"].values(), key=_sort_key)
    lines = [
        "# Table 1 reproduction", "",
        "| method | dataset | embedding | paper test % | ours test % (mean ± SE) | ours test %, paper's sampler "
        "| n (seeds x inference runs) | ours train % (mean ± SE) | epochs ours / paper | train s per seed "
        "| peak train memory (ours) | paper memory GB (Table 2, GPU) | hardware |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[table_line(r) for r in rows], "",
        "- Accuracies: mean ± standard error (std with ddof = 1, over sqrt(n)) over every seed and, for NoProp "
        "methods, every inference run (each with its own noise seed; the chain is stochastic). Baselines are "
        "deterministic at inference: one value per seed. SE n/a: a single value, no spread to estimate it from.",
        "- Samplers: 'ours test %' evaluates with the run's eval.sampler (default `mean`, Eq. 3 without its noise "
        "term); 'paper's sampler' re-evaluates the same chains as Table 1 ran them (Eq. 3 with its noise; FM's "
        "Euler solve), so that column compares like with like.",
        "- Train accuracy is the run's own (summary.json `train_accuracy`), one value per seed; '-' where the "
        "run does not report it.",
        "- Epochs: ours are usually far fewer than the paper's (Table 3) on CPU; compare accuracies with that "
        "in mind. '-' in a paper column: the paper has no number for this cell (e.g. digits, Fashion-MNIST).",
        "- Peak training memory: `gpu` = peak GPU memory allocated by training (what Table 2 measures), "
        "`rss` = peak resident memory of the largest training process (CPU runs; includes torch and Ray, "
        "about 0.5 GiB). Largest over the seeds. Table 2 is one-hot only.",
        "", "Earlier backprop-free methods in the paper (test %): " + "; ".join(
            f"{name} " + " / ".join(f"{v:.2f} ({d})" for d, v in by_dataset.items())
            for name, by_dataset in EARLIER_METHODS.items()) + ".",
    ]
    if figures:
        lines += ["", "## Test accuracy against training time (Fig. 3)", ""]
        lines += [f"![{os.path.splitext(f)[0]}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def write_fig3(out: str, results: dict[str, Any], dataset: str, embedding: str) -> str | None:
    """``<out>/fig3_<dataset>_<embedding>.png`` from every seed run of that setting; None without matplotlib."""
    from .plots import PlotError, plot_curves, run_curve

    runs = []
    for row in sorted(results["rows"].values(), key=_sort_key):
        if row["dataset"] != dataset or row["embedding"] != embedding:
            continue
        for s in row["per_seed"]:
            try:
                runs.append((METHOD_LABELS.get(row["method"], row["method"]), run_curve(read_summary(s["run_dir"]))))
            except SummaryError:
                continue  # a run directory removed since: its numbers stay in the table, its curve goes
    name = f"fig3_{dataset}_{embedding}.png"
    try:
        plot_curves(runs, os.path.join(out, name), f"{dataset}, {EMBEDDING_LABELS.get(embedding, embedding)}")
    except PlotError as e:
        print(f"note: no Fig. 3 plot ({e})", file=sys.stderr)
        return None
    return name


def write_table(out: str, results: dict[str, Any]) -> str:
    figures = sorted(f for f in os.listdir(out) if f.startswith("fig3_") and f.endswith(".png"))
    path = os.path.join(out, TABLE_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_table(results, figures))
    return path


# ----------------------------------------------------------------------------- the command

def all_commands(args: argparse.Namespace, config_dir: str | None) -> list[str]:
    """The reproduce command of every Table 1 cell (marked where its config file does not exist yet)."""
    lines = []
    for method, dataset, embedding in table1_cells():
        cmd = (f"python -m noprop_dist.reproduce --method {method} --dataset {dataset} --embedding {embedding} "
               f"--seeds {' '.join(map(str, args.seeds))} --inference-runs {args.inference_runs} --out {args.out}")
        try:
            config_path(method, dataset, config_dir)
        except HarnessError:
            cmd += f"  # needs {os.path.join(config_dir or CONFIG_DIR, dataset + config_suffix(method) + '.yaml')}"
        lines.append(cmd)
    return lines


def reproduce(args: argparse.Namespace) -> dict[str, Any]:
    """Train every seed, measure, merge the row into results.json, rewrite table.md and the Fig. 3 plot."""
    config_dir = args.config_dir
    config = args.config or config_path(args.method, args.dataset, config_dir)
    method = get_method(args.method)
    check_user_overrides(args.overrides)
    seeds: list[dict] = []
    summaries: list[dict] = []
    for seed in args.seeds:
        run_dir = seed_run_dir(args.out, args.method, args.dataset, args.embedding, seed)
        overrides = run_overrides(args.method, args.dataset, args.embedding, seed, run_dir, args.overrides)
        cfg = load_config(config, overrides, args.preset)  # a bad --set fails here, before anything runs
        log = f"{run_dir}.log"
        print(f"[reproduce] seed {seed}: training ({cfg.train.epochs} epochs) in {run_dir}; log {log}", flush=True)
        train_subprocess(run_command(config, overrides, args.preset), log, echo=not args.quiet)
        try:
            summary = read_summary(run_dir)
        except SummaryError as e:  # training exited 0 but left no readable summary
            raise HarnessError(f"seed {seed}: {e}", exit_code=1) from None
        paper_values = None
        if not method.noprop:
            values = [summary["test_accuracy"]]  # deterministic at inference
        else:
            paper = method.paper_sampler
            try:
                values = inference_accuracies(run_dir, args.inference_runs, cfg.eval.seed)
                paper_values = None if cfg.eval.sampler == paper else \
                    inference_accuracies(run_dir, args.inference_runs, cfg.eval.seed, sampler=paper)
            except (OSError, ValueError) as e:  # no or unreadable chain.pt, data gone since training
                raise HarnessError(f"evaluating {run_dir}: {e}", exit_code=1) from None
        seeds.append(seed_record(seed, run_dir, summary, values, paper_values))
        summaries.append(summary)
        print(f"[reproduce] seed {seed}: test accuracy {', '.join(f'{100 * v:.2f}' for v in values)} %", flush=True)
    row = build_row(args.method, args.dataset, args.embedding, config, args.overrides, args.inference_runs,
                    seeds, summaries) | {"preset": args.preset}
    results = merge_row(args.out, row)
    fig = write_fig3(args.out, results, args.dataset, args.embedding)
    table = write_table(args.out, results)
    print(f"[reproduce] {METHOD_LABELS[args.method]}, {args.dataset}, {args.embedding}: test "
          f"{format_pct(row['test'])} % (paper {_fmt(row['paper']['test_accuracy'], '.2f')}), train "
          f"{format_pct(row['train'])} %; written: {table}, {os.path.join(args.out, RESULTS_FILE)}"
          + (f", {os.path.join(args.out, fig)}" if fig else ""), flush=True)
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m noprop_dist.reproduce", description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=list(METHODS), default="noprop_dt")
    p.add_argument("--dataset", choices=DATASET_NAMES, default="mnist")
    p.add_argument("--embedding", choices=EMBEDDINGS, default="one_hot")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--inference-runs", type=int, default=5,
                   help="noise seeds per NoProp chain (baselines: 1, deterministic); default %(default)s")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides for every seed's run, e.g. --set train.epochs=3 cluster.num_workers=2")
    p.add_argument("--out", default="runs/reproduce", help="results, table and runs go here (default %(default)s)")
    p.add_argument("--config", help="config file instead of noprop_dist/configs/<dataset>[_<method>].yaml")
    p.add_argument("--preset", choices=PRESETS, help="paper: train every seed with the paper's Table 3 settings "
                   "(the configs depart from them where measured better)")
    p.add_argument("--config-dir", help="a directory of <dataset>[_<method>].yaml files (default: the packaged configs)")
    p.add_argument("--quiet", action="store_true", help="training output only into the per-seed logs")
    p.add_argument("--all", action="store_true", help="print the command of every Table 1 cell; run nothing")
    args = p.parse_args(argv)
    if args.inference_runs < 1:
        p.error("--inference-runs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.all:
            print("\n".join(all_commands(args, args.config_dir)))
            return 0
        reproduce(args)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

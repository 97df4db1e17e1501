"""What a run leaves to read afterwards: ``<run.dir>/metrics.jsonl`` over time and ``report.md`` at the end.

The driver already polls every worker's block counters once a second for the progress display;
:class:`MetricsLog` writes the same counters to ``metrics.jsonl`` every ``metrics.write_every_seconds``
and at the end of every epoch, one JSON object per block and line. :func:`write_report` turns that file
and ``summary.json`` into ``report.md``, with ``metrics.png`` (loss and samples/s over time) when
matplotlib is installed (the optional ``report`` extra). Pure Python: no Ray, no Prometheus.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Any, Callable

from ..storage.atomic import (
    append_lines,
    atomic_save_with,
    atomic_write_bytes,
    read_jsonl,
    repair_torn_tail,
)
from ..storage.summary import describe_model
from .tensorboard import TensorBoardLog

METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.md"
PLOT_FILE = "metrics.png"
STAGES_PLOT_FILE = "stages.png"
_ROW_KEYS = ("time", "block", "loss_ema", "samples_per_second")  # what write_report and plot_metrics read


def _finite(x: Any) -> Any:
    """NaN and inf become null: JSON has no NaN (Python writes it, strict parsers refuse it)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


class MetricsLog:
    """Appends the driver's view of every block to ``<run.dir>/metrics.jsonl`` (a resumed run appends).

    Every append is fsynced. A last line torn by a crash (a driver killed mid-append, a full disk) is cut
    off when the log is opened, with one message, so the next append starts on a line of its own.
    """

    def __init__(self, run_dir: str, run: str, every_seconds: float, warn: Callable[[str], None] = print,
                 tensorboard: bool = False, epochs_done: int | None = None) -> None:
        self.path = os.path.join(run_dir, METRICS_FILE)
        # the same rows as TensorBoard event files (metrics.tensorboard)
        self.tensorboard = TensorBoardLog(run_dir) if tensorboard else None
        removed = repair_torn_tail(self.path)
        if removed:
            warn(f"{self.path}: removed a torn last line ({removed} bytes, left by a crash); appending after it")
        if epochs_done is not None:
            self._drop_after(epochs_done, warn)
        self.run, self.every = run, every_seconds
        self.last_write = -math.inf
        self.prev: dict[int, tuple[float, int]] = {}  # block -> (time, samples) of its previous line

    def _drop_after(self, epochs_done: int, warn: Callable[[str], None]) -> None:
        """A run resumed from the checkpoint of ``epochs_done`` epochs trains the epochs after it again: the lines
        a crashed invocation wrote for them go, so that the file holds each epoch once."""
        if not os.path.exists(self.path):
            return
        rows = read_jsonl(self.path, warn)
        kept = [r for r in rows if not isinstance(r.get("epoch"), (int, float)) or r["epoch"] <= epochs_done]
        if len(kept) < len(rows):
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
            warn(f"{self.path}: dropped {len(rows) - len(kept)} lines of epochs after the checkpoint of epoch "
                 f"{epochs_done}, which this run trains again")

    def record(self, blocks: dict[int, dict], workers: dict[int, dict], owner: dict[int, int],
               event: str = "poll") -> bool:
        """One line per block from ``ShardStats.as_dict()`` and its worker's report, if one is due.

        event "poll" lines are written every ``every_seconds``; "epoch" lines (an epoch ended) always.
        Returns whether it wrote.
        """
        now = time.time()
        if event == "poll" and now - self.last_write < self.every:
            return False
        rows = [self._row(now, event, b, workers.get(owner[t], {}), owner[t])
                for t, b in sorted(blocks.items()) if b["steps_per_epoch"] > 0]  # skip blocks not started yet
        if not rows:
            return False
        self.last_write = now
        append_lines(self.path, [json.dumps(r) for r in rows])
        if self.tensorboard is not None:
            self.tensorboard.write_rows(rows)
        return True

    def accuracy(self, epoch: int | float, accuracy: float, train_seconds: float, split: str = "test") -> None:
        """A point of the chain's accuracy curve on ``split`` (curve.json holds them all); TensorBoard gets it too."""
        if self.tensorboard is not None:
            self.tensorboard.write_accuracy(epoch, accuracy, train_seconds, split)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def _row(self, now: float, event: str, b: dict, w: dict, worker: int) -> dict:
        t, spe = b["block"], b["steps_per_epoch"]
        rate = None  # wall-clock samples/s since this block's previous line (a worker restarted from 0: none)
        if t in self.prev and b["samples"] >= self.prev[t][1] and now > self.prev[t][0]:
            rate = (b["samples"] - self.prev[t][1]) / (now - self.prev[t][0])
        self.prev[t] = (now, b["samples"])
        steps = b["total_steps"]
        return {
            "time": round(now, 3), "run": self.run, "event": event, "block": t, "worker": worker,
            "epoch": b["epochs_done"] + (b["step"] / spe if spe else 0.0), "step": b["step"], "steps_per_epoch": spe,
            "total_steps": steps, "samples": b["samples"], "samples_per_second": rate,
            "compute_samples_per_second": b["samples_per_second"],
            "step_seconds_mean": (b["compute_seconds"] + b["sync_seconds"]) / steps if steps else None,
            "loss": _finite(b["loss"]), "loss_ema": _finite(b["loss_ema"]),
            "last_epoch_mean_loss": _finite(b["last_epoch_mean_loss"]),
            "embedding_version_lag": w.get("embedding_version_lag"),
            "push_seconds": w.get("push_seconds"), "pull_seconds": w.get("pull_seconds"),
        }


def read_metrics(run_dir: str, warn: Callable[[str], None] = print) -> list[dict]:
    """The rows of ``<run.dir>/metrics.jsonl``; unreadable lines are skipped with one message."""
    return read_jsonl(os.path.join(run_dir, METRICS_FILE), warn)


def _report_rows(run_dir: str, warn: Callable[[str], None] = print) -> list[dict]:
    """:func:`read_metrics`, less the lines without the fields the report and its plot read (one message)."""
    rows = read_metrics(run_dir, warn)
    good = [r for r in rows if isinstance(r, dict) and all(k in r for k in _ROW_KEYS)]
    if len(good) < len(rows):
        warn(f"{os.path.join(run_dir, METRICS_FILE)}: {len(rows) - len(good)} lines without the fields "
             f"{', '.join(_ROW_KEYS)} skipped")
    return good


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def plot_metrics(rows: list[dict], path: str) -> bool:
    """Loss (EMA) and wall-clock samples/s per block over time into ``path``; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a cluster's head node
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t0 = min(r["time"] for r in rows)
    fig, (ax_loss, ax_rate) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for block in sorted({r["block"] for r in rows}):
        mine = [r for r in rows if r["block"] == block]
        minutes = [(r["time"] - t0) / 60 for r in mine]
        ax_loss.plot(minutes, [r["loss_ema"] if r["loss_ema"] is not None else math.nan for r in mine],
                     label=f"block {block}")
        ax_rate.plot(minutes, [r["samples_per_second"] if r["samples_per_second"] is not None else math.nan
                               for r in mine])
    ax_loss.set_ylabel("loss (EMA)")
    ax_loss.set_yscale("log")  # the blocks' losses differ by orders of magnitude (their SNR weights do)
    ax_rate.set_ylabel("samples/s (wall clock)")
    ax_rate.set_xlabel("minutes")
    ax_loss.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    atomic_save_with(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return True


def plot_stages(stages: list[dict], path: str, title: str) -> bool:
    """Test accuracy along the chain: stopped after each stage, and each stage's own prediction, against
    the stage; False without matplotlib. stages: summary.json's ``stages`` entries."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    k = [s["block"] for s in stages]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(k, [100 * s["chain_accuracy"] for s in stages], marker="o", label="chain stopped after this stage")
    own = [s["own_accuracy"] for s in stages]
    if any(o is not None for o in own):
        ax.plot(k, [math.nan if o is None else 100 * o for o in own], marker="s", linestyle="--",
                label="the stage's own prediction")
    ax.set_xlabel("stage (block t, or time-shard k)")
    ax.set_xticks(k)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_save_with(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return True


def _inference_lines(run_dir: str, s: dict) -> list[str]:
    """report.md's inference section: the accuracy by sampler and along the chain (runs that have them)."""
    if not s.get("stages"):
        return []
    by = s.get("test_accuracy_by_sampler", {})
    lines = ["## Inference", "",
             "Test accuracy by sampler: " + ", ".join(
                 f"`{name}` {acc:.4f}" + (" (the run's)" if name == s.get("sampler") else "")
                 + (" (the paper's)" if name == s.get("paper_sampler") else "") for name, acc in by.items()) + ".",
             "", f"Along the chain (sampler `{s.get('sampler')}`): the chain stopped after each stage and read out "
             "there, and each stage's own prediction.", "",
             "| stage | chain stopped here | stage's own prediction |", "|---|---|---|"]
    lines += [f"| {st['block']} | {_fmt(st['chain_accuracy'], '.4f')} | {_fmt(st['own_accuracy'], '.4f')} |"
              for st in s["stages"]]
    if plot_stages(s["stages"], os.path.join(run_dir, STAGES_PLOT_FILE),
                   f"{s['dataset']}, {s['method']}: accuracy along the chain"):
        lines += ["", f"![accuracy along the chain]({STAGES_PLOT_FILE})"]
    return lines + [""]


def write_report(run_dir: str, summary: dict, run: str) -> str:
    """``<run.dir>/report.md`` from ``summary.json``'s figures and ``metrics.jsonl``; returns its path."""
    rows = _report_rows(run_dir)
    rates: dict[int, list[float]] = {}
    for r in rows:
        if r["samples_per_second"] is not None and r["samples_per_second"] > 0:
            rates.setdefault(r["block"], []).append(r["samples_per_second"])
    s = summary
    lines = [
        f"# Run report: {run}", "",
        f"{s['dataset']}, {describe_model(s.get('method', 'noprop_dt'), s.get('num_shards', s['num_blocks']))} on "
        f"{s['num_workers']} workers, {s['epochs']} epochs "
        f"({s['sync_mode']} mode). Test accuracy of the assembled chain: **{s['test_accuracy']:.4f}**.",
        f"Training took {s['train_seconds']:.1f} s; epoch wall times (this invocation): "
        f"{', '.join(f'{x:.1f}' for x in s['epoch_seconds']) or '-'} s. "
        f"Prometheus / Grafana label: `run=\"{run}\"`.", "",
        "## Blocks", "",
        "| block | worker | steps | samples/s (compute) | samples/s (wall, median) | mean step (ms) | sync share "
        "| last-epoch loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in s["blocks"]:
        step_s = b["compute_seconds"] + b["sync_seconds"]
        wall = statistics.median(rates[b["block"]]) if b["block"] in rates else None
        mean_step_ms = 1000 * step_s / b["steps"] if b["steps"] else None
        sync_share = b["sync_seconds"] / step_s if step_s else None
        lines.append(
            f"| {b['block']} | {b['worker']} | {b['steps']} | {_fmt(b['samples_per_second'], '.0f')} | "
            f"{_fmt(wall, '.0f')} | {_fmt(mean_step_ms, '.2f')} | {_fmt(sync_share, '.1%')} | "
            f"{_fmt(b['last_epoch_mean_loss'], '.4g')} |")
    lines += ["", "## Workers", "", "| worker | device | push (s) | pull (s) | peak RSS (MiB) |",
              "|---|---|---|---|---|"]
    for w in s["workers"]:
        lines.append(f"| {w['rank']} | {w['device']} | {w['push_seconds']:.2f} | {w['pull_seconds']:.2f} | "
                     f"{w['peak_rss_mb']:.0f} |")
    lines += ["", *_inference_lines(run_dir, s), "## Over time", ""]
    plotted = bool(rows) and plot_metrics(rows, os.path.join(run_dir, PLOT_FILE))
    if plotted:
        lines.append(f"![loss and samples/s per block over time]({PLOT_FILE})")
    lines.append(f"{len(rows)} lines in `{METRICS_FILE}` (one per block per poll or epoch)"
                 + ("." if plotted or not rows else
                    "; install matplotlib (`pip install -e \".[report]\"`) for a plot here."))
    path = os.path.join(run_dir, REPORT_FILE)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path

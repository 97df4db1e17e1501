"""The paper's figures from finished runs: ``python -m noprop_dist.paper.plots curves|embeddings ...``.

    python -m noprop_dist.paper.plots curves RUN_DIR [RUN_DIR ...] --out fig3.png   # Fig. 3
    python -m noprop_dist.paper.plots embeddings RUN_DIR --out fig2.png             # Fig. 2

Fig. 3: test accuracy against cumulative training time, one line per run, from each run's
``summary.json`` ``curve``. Fig. 2: the learned class embeddings as images, one tile per class, from
``chain.pt`` (only when the embedding dimension equals the image size, i.e. prototype embeddings).
matplotlib is optional (the ``report`` extra): it is imported only when a figure is drawn.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

import numpy as np

from ..storage.summary import SummaryError, read_summary


class PlotError(ValueError):
    """A figure that cannot be drawn: missing matplotlib, a run without what the figure needs."""


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only: a cluster's head node has no display)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install matplotlib "
                        "(or pip install -e \".[report]\") to draw figures") from None
    return plt


# ----------------------------------------------------------------------------- Fig. 3: accuracy vs time

def _read_summary(run_dir: str) -> dict:
    """``<run_dir>/summary.json``, or PlotError naming the file."""
    try:
        return read_summary(run_dir)
    except SummaryError as e:
        raise PlotError(str(e)) from None


def run_curve(summary: dict) -> list[dict]:
    """The run's (epoch, cumulative train_seconds, test_accuracy) points, in epoch order.

    Runs written before summaries carried a ``curve`` give one point, the final one, so older
    runs still appear in a figure (as a single marker).
    """
    curve = summary.get("curve")
    if curve:
        return sorted(curve, key=lambda p: p["epoch"])
    return [{"epoch": summary["epochs"], "train_seconds": summary["train_seconds"],
             "test_accuracy": summary["test_accuracy"]}]


def run_label(summary: dict) -> str:
    """Legend label of a run: its method, its inference sampler (NoProp runs that record one) and worker
    count; runs of one chain evaluated with two samplers get two lines."""
    method = summary.get("method", "noprop_dt")
    workers = summary.get("num_workers", "?")
    sampler = f" ({summary['sampler']})" if summary.get("sampler") else ""
    return f"{method}{sampler}, {workers} worker{'' if workers == 1 else 's'}"


X_AXES = {"train_seconds": "training time (s, cumulative)", "epoch": "epoch"}


def plot_curves(runs: list[tuple[str, list[dict]]], path: str, title: str | None = None,
                targets: list[float] = (), x: str = "train_seconds") -> str:
    """Fig. 3: test accuracy (%) against cumulative training time (``x="train_seconds"``) or against epochs
    (``x="epoch"``) for each (label, curve); PNG at ``path``.

    Runs that share a label (seeds of one method) share a colour and one legend entry. ``targets`` (test
    accuracies in [0, 1]) draw dashed lines where a time-to-accuracy benchmark reads its times.
    """
    if not runs:
        raise PlotError("no runs to plot")
    if x not in X_AXES:
        raise PlotError(f"x must be one of {sorted(X_AXES)}, got {x!r}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours: dict[str, Any] = {}
    for label, curve in runs:
        xs = [p[x] for p in curve]
        accuracy = [100 * p["test_accuracy"] for p in curve]
        first = label not in colours
        line, = ax.plot(xs, accuracy, marker="o", markersize=3, color=colours.get(label),
                        label=label if first else None)
        colours.setdefault(label, line.get_color())
    for target in targets:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    if x == "epoch":
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, plt, path)
    return path


def plot_curves_from_dirs(run_dirs: list[str], path: str, title: str | None = None,
                          x: str = "train_seconds") -> str:
    """Fig. 3 from run directories (label: :func:`run_label`), against ``x`` as :func:`plot_curves`."""
    summaries = [_read_summary(d) for d in run_dirs]
    if title is None:
        s = summaries[0]
        title = f"{s.get('dataset', '?')}, {s.get('embedding', '?')} embedding"
    return plot_curves([(run_label(s), run_curve(s)) for s in summaries], path, title, x=x)


# ----------------------------------------------------------------------------- Fig. 2: class embeddings

def load_embedding(run_dir: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(W_embed as an (m, d) array, image shape (C, H, W)) from ``<run_dir>/chain.pt``."""
    import torch  # only here: the curves need no torch

    path = os.path.join(run_dir, "chain.pt")
    if not os.path.exists(path):
        raise PlotError(f"no chain.pt in {run_dir}: has the run finished (and is it a NoProp run)?")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    try:
        embed = payload["shared"]["embed"]
        image_shape = tuple(int(v) for v in payload["spec"]["image_shape"])
    except (KeyError, TypeError):
        raise PlotError(f"{path}: has no shared/embed or spec/image_shape") from None
    return embed.detach().float().numpy(), image_shape  # type: ignore[return-value]


def embedding_images(embed: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray:
    """(m, H, W, C) images of the m class embeddings, each scaled to [0, 1] on its own.

    Per-tile scaling because the embeddings live in normalised pixel space, with per-class ranges
    that differ; a shared scale would make faint classes invisible.
    """
    c, h, w = image_shape
    m, d = embed.shape
    if d != c * h * w:
        raise PlotError(f"embedding dimension d = {d} is not the image size {c}x{h}x{w} = {c * h * w}: "
                        "class embeddings can be shown as images only for prototype embeddings")
    images = embed.reshape(m, c, h, w).transpose(0, 2, 3, 1)
    lo = images.min(axis=(1, 2, 3), keepdims=True)
    span = images.max(axis=(1, 2, 3), keepdims=True) - lo
    return (images - lo) / np.where(span > 0, span, 1.0)


def plot_embeddings(run_dir: str, path: str, title: str | None = None) -> str:
    """Fig. 2: one tile per class of the run's learned embedding; PNG at ``path``."""
    embed, image_shape = load_embedding(run_dir)
    images = embedding_images(embed, image_shape)
    plt = pyplot()
    m = len(images)
    cols = math.ceil(math.sqrt(m))
    rows = math.ceil(m / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows + 0.4), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < m:
            # One channel: greyscale; three: colour.
            ax.imshow(images[k, :, :, 0] if images.shape[3] == 1 else images[k], cmap="gray",
                      interpolation="nearest")
            ax.set_title(str(k), fontsize=8)
    fig.suptitle(title or f"class embeddings ({m} classes, {image_shape[1]}x{image_shape[2]})", fontsize=9)
    fig.tight_layout()
    _save(fig, plt, path)
    return path


def _save(fig: Any, plt: Any, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m noprop_dist.paper.plots", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="figure", required=True)
    curves = sub.add_parser("curves", help="Fig. 3: test accuracy against cumulative training time")
    curves.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    curves.add_argument("--out", default="fig3.png")
    curves.add_argument("--title")
    curves.add_argument("--x", choices=sorted(X_AXES), default="train_seconds",
                        help="the x axis: cumulative training time, or epochs (equal-epoch comparisons)")
    emb = sub.add_parser("embeddings", help="Fig. 2: class embeddings as images (prototype embeddings)")
    emb.add_argument("run_dir", metavar="RUN_DIR")
    emb.add_argument("--out", default="fig2.png")
    emb.add_argument("--title")
    args = p.parse_args(argv)
    try:
        if args.figure == "curves":
            path = plot_curves_from_dirs(args.run_dirs, args.out, args.title, args.x)
        else:
            path = plot_embeddings(args.run_dir, args.out, args.title)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

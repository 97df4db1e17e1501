"""Fig. 3 (accuracy against training time) and Fig. 2 (class embeddings as images): noprop_dist.paper.plots."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from noprop_dist.paper import plots
from noprop_dist.paper.plots import PlotError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return head == PNG_MAGIC and os.path.getsize(path) > 1000


def _fake_run(path, method: str, curve: list[dict] | None, workers: int = 1) -> str:
    path.mkdir(parents=True)
    summary = {"method": method, "dataset": "digits", "embedding": "one_hot", "num_workers": workers, "epochs": 3,
               "test_accuracy": 0.9, "train_seconds": 12.0}
    if curve is not None:
        summary["curve"] = curve
    (path / "summary.json").write_text(json.dumps(summary))
    return str(path)


def _fake_chain(path, embed: torch.Tensor, image_shape=(1, 8, 8)) -> str:
    """A chain.pt with the saved layout the figure reads: shared/embed and spec/image_shape."""
    path.mkdir(parents=True)
    torch.save({"format": 1, "spec": {"image_shape": list(image_shape)}, "shared": {"embed": embed}},
               path / "chain.pt")
    return str(path)


CURVE = [{"epoch": 2, "train_seconds": 8.0, "test_accuracy": 0.8},
         {"epoch": 1, "train_seconds": 4.0, "test_accuracy": 0.6},
         {"epoch": 3, "train_seconds": 12.0, "test_accuracy": 0.9}]


def test_run_curve_sorted_and_fallback_for_runs_without_curve():
    assert [p["epoch"] for p in plots.run_curve({"curve": CURVE})] == [1, 2, 3]
    old = {"epochs": 3, "train_seconds": 12.0, "test_accuracy": 0.9}
    assert plots.run_curve(old) == [{"epoch": 3, "train_seconds": 12.0, "test_accuracy": 0.9}]


def test_plot_curves_writes_a_png(tmp_path):
    runs = [("NoProp-DT", CURVE), ("NoProp-DT", CURVE[:2]), ("Backprop", CURVE[::-1])]
    path = plots.plot_curves(runs, str(tmp_path / "sub" / "fig3.png"), "digits")
    assert _is_png(path)
    with_target = plots.plot_curves(runs, str(tmp_path / "tta.png"), "digits", targets=[0.88, 0.9])
    assert _is_png(with_target) and open(with_target, "rb").read() != open(path, "rb").read()
    by_epoch = plots.plot_curves(runs, str(tmp_path / "epochs.png"), "digits", x="epoch")
    assert _is_png(by_epoch) and open(by_epoch, "rb").read() != open(path, "rb").read()
    with pytest.raises(PlotError, match="x must be one of .*got 'seconds'"):
        plots.plot_curves(runs, str(tmp_path / "bad.png"), x="seconds")
    with pytest.raises(PlotError, match="no runs"):
        plots.plot_curves([], str(tmp_path / "empty.png"))


def test_run_label_names_the_sampler_of_a_noprop_run():
    """Two evaluations of one chain (mean, stage_average) must not share a line's label and colour."""
    assert plots.run_label({"method": "noprop_dt", "sampler": "stage_average", "num_workers": 2}) == \
        "noprop_dt (stage_average), 2 workers"
    assert plots.run_label({"method": "backprop", "num_workers": 1}) == "backprop, 1 worker"


def test_curves_cli(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", "noprop_dt", CURVE, workers=2)
    b = _fake_run(tmp_path / "b", "backprop", None)  # an older summary: one point
    out = tmp_path / "fig3.png"
    assert plots.main(["curves", a, b, "--out", str(out)]) == 0
    assert _is_png(out) and f"written: {out}" in capsys.readouterr().out
    by_epoch = tmp_path / "epochs.png"
    assert plots.main(["curves", a, b, "--x", "epoch", "--out", str(by_epoch)]) == 0
    assert _is_png(by_epoch) and by_epoch.read_bytes() != out.read_bytes()
    assert plots.main(["curves", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no summary.json in" in capsys.readouterr().err


def test_embedding_images_one_tile_per_class():
    embed = np.random.default_rng(0).normal(size=(10, 64))
    embed[3] = 1.5  # a constant class: scaled to 0, not NaN
    images = plots.embedding_images(embed, (1, 8, 8))
    assert images.shape == (10, 8, 8, 1) and np.isfinite(images).all()
    assert images.min() == 0.0 and images.max() == 1.0 and (images[3] == 0).all()
    np.testing.assert_allclose(images[0, :, :, 0].ravel(), (embed[0] - embed[0].min()) / np.ptp(embed[0]))
    colour = plots.embedding_images(np.arange(2 * 12, dtype=float).reshape(2, 12), (3, 2, 2))
    assert colour.shape == (2, 2, 2, 3)
    assert colour[0, 0, 0, 1] == pytest.approx(4 / 11)  # channel 1 of pixel (0, 0) is element 4 of 12


def test_embedding_of_other_dimension_is_refused(tmp_path, capsys):
    run = _fake_chain(tmp_path / "learned", torch.randn(10, 20))
    with pytest.raises(PlotError, match="d = 20 is not the image size 1x8x8 = 64"):
        plots.plot_embeddings(run, str(tmp_path / "fig2.png"))
    assert plots.main(["embeddings", run, "--out", str(tmp_path / "fig2.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "d = 20" in err[0]
    assert not (tmp_path / "fig2.png").exists()
    with pytest.raises(PlotError, match="no chain.pt"):
        plots.load_embedding(str(tmp_path))


def test_embeddings_from_a_saved_chain(tmp_path):
    run = _fake_chain(tmp_path / "proto", torch.randn(100, 3 * 4 * 4), image_shape=(3, 4, 4))
    assert _is_png(plots.plot_embeddings(run, str(tmp_path / "fig2.png")))  # 100 classes: a 10 x 10 grid


def test_missing_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(PlotError, match="matplotlib is not installed"):
        plots.plot_curves([("x", CURVE)], str(tmp_path / "f.png"))


@pytest.mark.ray
def test_fig2_of_a_real_prototype_run(ray_head, tmp_path):
    """A tiny prototype-embedding run on digits (8x8), on the session's cluster: d = 64, one 8x8 tile per class."""
    run_dir = tmp_path / "proto"
    p = subprocess.run(
        [sys.executable, "-m", "noprop_dist.run", *[a for o in (
            "model.embedding=prototype", "model.num_blocks=2", "cluster.num_workers=1", "train.epochs=1",
            "data.train_limit=300", "data.test_limit=100", "metrics.enabled=false", f"run.dir={run_dir}")
            for a in ("--set", o)]],
        capture_output=True, text=True, timeout=600, env=ray_head.driver_env())
    assert p.returncode == 0, p.stderr[-3000:]
    embed, shape = plots.load_embedding(str(run_dir))
    assert embed.shape == (10, 64) and shape == (1, 8, 8)
    out = tmp_path / "fig2.png"
    cli = subprocess.run([sys.executable, "-m", "noprop_dist.paper.plots", "embeddings", str(run_dir), "--out", str(out)],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert cli.returncode == 0, cli.stderr
    assert _is_png(out)

"""Export of a finished run (noprop_dist.export) and ``evaluate --predict`` on real runs trained here, no mocks.

The exported file takes uint8 images and z0; with ``z0 = torch.randn((N, d), generator=Generator().manual_seed(s))``
it must give the classes of ``load_chain(run_dir).predict(images, seed=s)`` on every test image, ONNX through
onnxruntime and TorchScript through torch.jit.load.
"""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import one_error_line, run_main

from noprop_dist import evaluate, export
from noprop_dist.config import load_config
from noprop_dist.core import load_chain_file

ort = pytest.importorskip("onnxruntime")

# (name, config overrides): a short NoProp-DT run and smaller CT / FM runs with few inference steps
RUNS = {
    "dt": ["model.num_blocks=3", "train.epochs=4"],
    "ct": ["model.method=noprop_ct", "model.num_shards=1", "train.epochs=3", "model.inference_steps=20"],
    "fm": ["model.method=noprop_fm", "model.num_shards=1", "train.epochs=3", "model.inference_steps=20"],
}






@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """Run directories of chains trained briefly in process on digits, saved with the extra keys the driver
    writes (so the exporter can reload the test images)."""
    from noprop_dist.data import load_dataset
    from noprop_dist.training import evaluate_states, model_spec, train_in_process

    ds = load_dataset("digits")
    out = {}
    for name, overrides in RUNS.items():
        cfg = load_config(None, [*overrides, "cluster.num_workers=1"])
        blocks, shared, _ = train_in_process(cfg, ds, device="cpu")
        chain, acc = evaluate_states(model_spec(cfg, ds.image_shape, ds.num_classes), ds, blocks, shared, 1000, 1234)
        assert acc > 0.3, (name, acc)  # chance is 0.1: agreement below is between real predictions
        run_dir = tmp_path_factory.mktemp(f"run_{name}")
        chain.save(str(run_dir / "chain.pt"), extra={
            "dataset": "digits", "data_root": None, "test_limit": None, "data_path": None, "image_size": None,
            "class_names": None, "mean": list(ds.mean), "std": list(ds.std), "test_accuracy": acc,
            "eval_seed": 1234, "eval_batch_size": 1000})
        out[name] = str(run_dir)
    return out


@pytest.fixture(scope="module")
def test_images(digits) -> np.ndarray:
    return np.ascontiguousarray(digits.test_x)  # uint8 (359, 1, 8, 8)


def _export(run_dir: str, out: str, *options: str) -> str:
    code, err, stdout = run_main(export, [run_dir, "--out", out, *options])
    assert code == 0 and not err, err
    line = stdout.strip()
    assert "\n" not in line and line.startswith(f"wrote {out} "), line
    return line


def _z0(run_dir: str, n: int, seed: int) -> np.ndarray:
    """z0 as docs/export.md says to draw it to reproduce predict(images, seed)."""
    d = evaluate.load_chain(run_dir).spec.embed_dim
    return torch.randn((n, d), generator=torch.Generator().manual_seed(seed)).numpy()


def _onnx(path: str):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda images, z0: session.run(None, {"images": images, "z0": z0})[0]


def _torchscript(path: str):
    module = _jit_load(path)

    def run(images: np.ndarray, z0: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(images), torch.from_numpy(z0)).numpy()

    return run


def _jit_load(path: str, **kwargs) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in torch 2.14, still how TorchScript loads
        return torch.jit.load(path, **kwargs)


LOAD = {"onnx": _onnx, "torchscript": _torchscript}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[tuple[str, str], str]:
    """(run, format) -> the file ``python -m noprop_dist.export RUN --format FORMAT`` wrote."""
    folder = tmp_path_factory.mktemp("exported")
    files = {}
    for name in runs:
        for fmt in LOAD:
            files[name, fmt] = str(folder / f"{name}.{fmt}")
            line = _export(runs[name], files[name, fmt], "--format", fmt)
            assert f"{fmt}," in line and "16 test images of digits" in line and "classes agree on 16/16" in line
    return files


@pytest.mark.parametrize("fmt", list(LOAD))
@pytest.mark.parametrize("name", list(RUNS))
def test_the_exported_file_gives_the_classes_of_predict_on_every_test_image(runs, exported, test_images, name, fmt):
    """Guards the whole path: preprocessing inside the graph (mean / std, uint8 / 255), the sampler, the steps and
    z0 as documented; any of them off moves classes on some of the 359 images."""
    run_dir, n = runs[name], len(test_images)
    trained = evaluate.load_chain(run_dir)
    z0 = _z0(run_dir, n, seed=5)
    logits = LOAD[fmt](exported[name, fmt])(test_images, z0)
    assert logits.shape == (n, 10) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits.argmax(axis=1), trained.predict(test_images, seed=5))
    want = trained(test_images, z0=torch.from_numpy(z0)).numpy()
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("fmt", list(LOAD))
def test_batch_size_is_free_one_image_or_all(runs, exported, test_images, fmt):
    """Guards: a batch size frozen at the traced example's (3) in the graph."""
    run = LOAD[fmt](exported["ct", fmt])
    z0 = _z0(runs["ct"], len(test_images), seed=0)
    full = run(test_images, z0)
    assert full.shape == (359, 10)
    for i in (0, 1, 358):
        np.testing.assert_allclose(run(test_images[i : i + 1], z0[i : i + 1]), full[i : i + 1], rtol=0, atol=1e-5)


def test_the_file_documents_how_to_reproduce_predict(runs, exported):
    import onnx

    model = onnx.load(exported["dt", "onnx"])
    props = {p.key: p.value for p in model.metadata_props}
    assert props["sampler"] == "mean" and props["layout"] == "nchw"
    assert "torch.randn((N, 20), generator=torch.Generator().manual_seed(seed))" in props["reproduce_predict"]
    assert "manual_seed(seed)" in model.doc_string
    extra = {"noprop_dist.json": ""}
    _jit_load(exported["dt", "torchscript"], _extra_files=extra)
    assert b"manual_seed(seed)" in extra["noprop_dist.json"]


def test_layout_nhw_takes_n_h_w(runs, test_images, tmp_path):
    out = str(tmp_path / "nhw.onnx")
    line = _export(runs["dt"], out, "--format", "onnx", "--layout", "nhw")
    assert "images uint8 (N, 8, 8)" in line
    run = _onnx(out)
    z0 = _z0(runs["dt"], len(test_images), seed=0)
    got = run(test_images[:, 0], z0)
    np.testing.assert_array_equal(got.argmax(axis=1), evaluate.load_chain(runs["dt"]).predict(test_images, seed=0))
    with pytest.raises(Exception, match="images"):  # the layout is fixed in the graph
        run(test_images, z0)


def test_output_classes_and_other_samplers(runs, test_images, tmp_path):
    """--output classes returns int64 (N,); --sampler stage_average (DT) and ode (CT) export and agree."""
    for name, sampler, fmt in [("dt", "stage_average", "onnx"), ("ct", "ode", "torchscript")]:
        out = str(tmp_path / f"{name}_{sampler}.{fmt}")
        line = _export(runs[name], out, "--format", fmt, "--output", "classes", "--sampler", sampler)
        assert "output classes int64 (N,)" in line and f"sampler {sampler}" in line
        classes = LOAD[fmt](out)(test_images, _z0(runs[name], len(test_images), seed=2))
        assert classes.shape == (359,) and classes.dtype == np.int64
        want = evaluate.load_chain(runs[name], sampler=sampler).predict(test_images, seed=2)
        np.testing.assert_array_equal(classes, want)


def test_steps_override_is_unrolled_into_the_file(runs, test_images, tmp_path):
    out = str(tmp_path / "fm7.onnx")
    assert "7 steps" in _export(runs["fm"], out, "--format", "onnx", "--steps", "7")
    got = _onnx(out)(test_images, _z0(runs["fm"], len(test_images), seed=0))
    want = evaluate.load_chain(runs["fm"], steps=7).predict(test_images, seed=0)
    np.testing.assert_array_equal(got.argmax(axis=1), want)


def test_a_run_on_arrays_is_checked_on_random_images(runs, tmp_path):
    chain, extra = load_chain_file(os.path.join(runs["dt"], "chain.pt"))
    run_dir = tmp_path / "arrays_run"
    run_dir.mkdir()
    chain.save(str(run_dir / "chain.pt"), extra=extra | {"dataset": "arrays"})
    line = _export(str(run_dir), str(tmp_path / "a.pt"), "--format", "torchscript")
    assert "16 random images" in line and "classes agree on 16/16" in line


def test_a_three_channel_resnet_run_exports_with_layout_nhwc(digits, tmp_path):
    """Another block (resnet) and three channels: --layout nhwc takes (N, H, W, C) and gives the classes of
    predict on the same images in (N, C, H, W); a run on arrays is checked on random images. The channels differ
    (the digit, its transpose, its negative), so a graph that mixed up H, W and C would predict other classes."""
    from noprop_dist.data import ImageDataset
    from noprop_dist.training import evaluate_states, model_spec, train_in_process

    def rgb(x: np.ndarray) -> np.ndarray:  # (N, 1, 8, 8) -> (N, 3, 8, 8)
        return np.concatenate([x, x.transpose(0, 1, 3, 2), 255 - x], axis=1)

    ds = ImageDataset.from_arrays(rgb(digits.train_x), digits.train_y, rgb(digits.test_x), digits.test_y)
    cfg = load_config(None, ["model.block=resnet", "model.num_blocks=2", "train.epochs=2", "cluster.num_workers=1",
                             "data.name=arrays"])
    blocks, shared, _ = train_in_process(cfg, ds, device="cpu")
    chain, acc = evaluate_states(model_spec(cfg, ds.image_shape, ds.num_classes), ds, blocks, shared, 1000, 1234)
    assert acc > 0.2, acc  # chance is 0.1: its classes depend on the images
    chain.save(str(tmp_path / "chain.pt"), extra={"dataset": "arrays", "mean": list(ds.mean), "std": list(ds.std)})
    out = str(tmp_path / "rgb.onnx")
    line = _export(str(tmp_path), out, "--format", "onnx", "--layout", "nhwc")
    assert "images uint8 (N, 8, 8, 3) (layout nhwc)" in line and "16 random images" in line
    nchw = np.ascontiguousarray(ds.test_x)
    got = _onnx(out)(np.ascontiguousarray(nchw.transpose(0, 2, 3, 1)), _z0(str(tmp_path), len(nchw), seed=1))
    np.testing.assert_array_equal(got.argmax(axis=1), evaluate.load_chain(str(tmp_path)).predict(nchw, seed=1))


@pytest.mark.parametrize("args, says", [
    (["dt", "--sampler", "eq3"], ["--sampler eq3", "noprop_dt", "exportable: mean, stage_average"]),
    (["dt", "--sampler", "ensemble"], ["--sampler ensemble", "exportable: mean, stage_average"]),
    (["ct", "--sampler", "eq3"], ["--sampler eq3", "exportable: mean, ode"]),
    (["fm", "--sampler", "ensemble"], ["--sampler ensemble", "exportable: mean"]),
    (["dt", "--format", "tflite"], ["--format tflite", "onnx, torchscript"]),
    (["dt", "--layout", "nhwc"], ["--layout nhwc", "nchw, nhw"]),
    (["dt", "--steps", "5"], ["--steps"]),
    ([None], ["no chain.pt"]),
])
def test_refusals_are_one_line_and_write_nothing(runs, tmp_path, args, says):
    name, *options = args
    run_dir = str(tmp_path / "empty") if name is None else runs[name]
    out = tmp_path / "m.onnx"
    if "--format" not in options:
        options += ["--format", "onnx"]
    one_error_line(*run_main(export, [run_dir, "--out", str(out), *options])[:2], *says)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_onnx_not_installed_names_the_extra(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # how Python marks a module as not importable
    code, lines, _ = run_main(export, [runs["dt"], "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    one_error_line(code, lines, "onnxruntime", "pip install 'noprop_dist[export]'")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- predict in batches


@pytest.mark.parametrize("name, sampler", [("dt", "mean"), ("dt", "stage_average"), ("ct", "ode"), ("fm", "mean")])
def test_predict_in_batches_gives_the_single_batch_predictions(runs, test_images, name, sampler):
    """Guards: batches that draw their own z_0 (from the generator, one batch after the other, or a fresh one
    per batch); 7 images of d = 20 is not a multiple of the 16 normals torch draws at a time, so neither way can
    happen to give the rows of the one (N, d) draw. Either bug fails the stage_average, ode and FM cases; the
    classes of this DT mean chain hardly depend on z_0, and it passes both."""
    trained = evaluate.load_chain(runs[name], sampler=sampler)
    one_call = trained.chain.predict(trained.inputs(test_images), torch.Generator().manual_seed(3)).numpy()
    sizes = _spy_batches(trained.chain)
    np.testing.assert_array_equal(trained.predict(test_images, seed=3, batch_size=7), one_call)
    assert max(sizes) == 7 and sum(sizes) == 359


def _spy_batches(chain: torch.nn.Module) -> list[int]:
    """The batch sizes the chain is called with from now on (the real forward runs)."""
    sizes: list[int] = []
    forward = chain.forward

    def recorded(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        sizes.append(int(x.shape[0]))
        return forward(x, *args, **kwargs)

    chain.forward = recorded
    return sizes


def test_predict_memory_stays_flat_in_n(runs, test_images, tmp_path, monkeypatch):
    """Guards: --predict ran the chain on all N images at once (its activations grow with N): 20,000 images go
    to the chain in batches of at most evaluate.PREDICT_BATCH."""
    images = np.tile(test_images, (56, 1, 1, 1))[:20_000]
    np.save(tmp_path / "many.npy", images)
    sizes: list[int] = []
    chain_class = type(evaluate.load_chain(runs["dt"]).chain)
    forward = chain_class.forward

    def recorded(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        sizes.append(int(x.shape[0]))
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(chain_class, "forward", recorded)
    out = tmp_path / "many_preds.npy"
    code, err, _ = run_main(evaluate, [runs["dt"], "--predict", str(tmp_path / "many.npy"), "--out", str(out)])
    assert code == 0, err
    assert sum(sizes) == 20_000 and max(sizes) <= evaluate.PREDICT_BATCH, sizes
    assert np.load(out).shape == (20_000,)


# ----------------------------------------------------------------------------- evaluate --predict


@pytest.mark.parametrize("option", [["--sampler", "mean"], ["--steps", "5"], ["--draws", "2"], ["--stages"]])
def test_predict_refuses_the_options_it_would_ignore(runs, test_images, tmp_path, option):
    """Guards: --predict --sampler ensemble (or --steps, --draws, --stages) ran the saved sampler and said nothing."""
    np.save(tmp_path / "u8.npy", test_images[:5])
    out = tmp_path / "p.npy"
    code, lines, _ = run_main(evaluate, [runs["dt"], "--predict", str(tmp_path / "u8.npy"), "--out", str(out), *option])
    one_error_line(code, lines, option[0], "--predict")
    assert not out.exists()


def test_predict_writes_exactly_the_named_file(runs, test_images, tmp_path):
    """Guards: np.save(name) wrote out.bin.npy when told --out out.bin."""
    np.save(tmp_path / "u8.npy", test_images)
    out = tmp_path / "out.bin"
    code, err, stdout = run_main(evaluate, [runs["dt"], "--predict", str(tmp_path / "u8.npy"), "--out", str(out)])
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "u8.npy"]
    np.testing.assert_array_equal(np.load(out), evaluate.load_chain(runs["dt"]).predict(test_images, seed=0))
    assert str(out) in stdout
